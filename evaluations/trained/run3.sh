#!/usr/bin/env bash
# Round 3 (SmolLM2): what the injected context costs, weighed more. From round 1's artifact (the
# one that ships), on other training queries (seed 44), with a cost of 1.0 per 1,000 prompt tokens
# (rounds 1 and 2: 0.2) and no example bank (the examples move changes the count and drops pool
# examples; round 2's bank additions were answers to synthetic prompts that read badly); then its
# check on the everyday development split. Run from the repository root:
#   bash evaluations/trained/run3.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback-runs/embedded-models/rm
MODEL=smollm2-135m-instruct
. "$(dirname "$0")/../steps.sh"
[ -f "runs/trained3-$MODEL/algo_output/checkpoint.json" ] && RESUME=--resume || RESUME=
step "$BIN/auto-model-train" --route everyday --moves decoding,examples,sentences \
    --reward metric:clean_ending,metric:no_loop,metric:refusal --token-cost 1.0 \
    --queries-per-level 8 --depth 8 --beam-size 2 --n-actions 2 --max-depth-increase 0 \
    --num-training-examples 64 --max-new-tokens 256 --backend vllm --dtype float32 --seed 44 --disable-tqdm \
    --base-model-name HuggingFaceTB/SmolLM2-135M-Instruct --log-dir "runs/trained3-$MODEL" $RESUME \
    --prompt-path "$OUT/$MODEL/$MODEL.trained.json" --output "$OUT/$MODEL/$MODEL.trained3.json" \
    2> "$OUT/$MODEL/train3.log"
mkdir -p "$OUT/$MODEL/round3"
cp "runs/trained3-$MODEL/algo_output/output.json" "runs/trained3-$MODEL/algo_output/tree.html" \
    "runs/trained3-$MODEL/algo_output/trace.txt" "$OUT/$MODEL/round3/"
step "$BIN/auto-model-eval" --configs "$OUT/$MODEL/configs3.toml" --eval-set auto_model/data/eval/everyday-dev.jsonl \
    --output "$OUT/$MODEL/everyday-dev" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
