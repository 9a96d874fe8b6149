#!/usr/bin/env bash
# Round 4b (RULE.md): Gemma's round 4 again with at least one example a request (--min-examples 1),
# seed 46; then its development check against the shipped artifact. Run from the repository root.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback-runs/embedded-models/rm
MODEL=gemma-3-270m
. "$(dirname "$0")/../steps.sh"
[ -f "runs/trained4b-$MODEL/algo_output/checkpoint.json" ] && RESUME=--resume || RESUME=
step "$BIN/auto-model-train" --route everyday --moves shorten,examples,decoding --min-examples 1 \
    --reward metric:clean_ending,metric:no_loop,metric:refusal --token-cost 0.5 \
    --queries-per-level 8 --depth 6 --beam-size 2 --n-actions 2 --max-depth-increase 0 \
    --num-training-examples 48 --max-new-tokens 256 --backend vllm --dtype float32 --seed 46 --disable-tqdm \
    --base-model-name google/gemma-3-270m --log-dir "runs/trained4b-$MODEL" $RESUME \
    --prompt-path "$OUT/$MODEL/shipped2.json" --output "$OUT/$MODEL/$MODEL.trained4b.json" 2> "$OUT/$MODEL/train4b.log"
mkdir -p "$OUT/$MODEL/round4b"
cp "runs/trained4b-$MODEL/algo_output/output.json" "runs/trained4b-$MODEL/algo_output/tree.html" \
    "runs/trained4b-$MODEL/algo_output/trace.txt" "$OUT/$MODEL/round4b/"
seed "$OUT/$MODEL/everyday-dev4" "$OUT/$MODEL/everyday-dev4b"  # the model alone's and the shipped answers
step "$BIN/auto-model-eval" --configs "$OUT/$MODEL/configs4b.toml" --eval-set auto_model/data/eval/everyday-dev.jsonl \
    --output "$OUT/$MODEL/everyday-dev4b" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
