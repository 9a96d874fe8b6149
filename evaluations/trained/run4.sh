#!/usr/bin/env bash
# Round 4 (RULE.md, "Round 4"): from the artifacts that ship (round 2's), the shorten move beside
# examples (no bank) and decoding, a cost of 0.5 per 1,000 prompt tokens, other training queries
# (seed 45); then the development check against the shipped artifact (everyday-dev.jsonl).
# Run from the repository root:  bash evaluations/trained/run4.sh   (MODELS=... for one model)
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback-runs/embedded-models/rm
TRAIN=(--route everyday --moves shorten,examples,decoding
       --reward metric:clean_ending,metric:no_loop,metric:refusal --token-cost 0.5
       --queries-per-level 8 --depth 6 --beam-size 2 --n-actions 2 --max-depth-increase 0
       --num-training-examples 48 --max-new-tokens 256 --backend vllm --dtype float32 --seed 45 --disable-tqdm)
. "$(dirname "$0")/../steps.sh"

for MODEL in ${MODELS:-smollm2-135m-instruct gemma-3-270m}; do
    case $MODEL in
        smollm2-135m-instruct) NAME=HuggingFaceTB/SmolLM2-135M-Instruct ;;
        gemma-3-270m) NAME=google/gemma-3-270m ;;
    esac
    [ -f "$OUT/$MODEL/shipped2.json" ] || cp "auto_model/optimized_prompts/$MODEL.json" "$OUT/$MODEL/shipped2.json"
    [ -f "runs/trained4-$MODEL/algo_output/checkpoint.json" ] && RESUME=--resume || RESUME=
    step "$BIN/auto-model-train" "${TRAIN[@]}" --base-model-name "$NAME" --log-dir "runs/trained4-$MODEL" $RESUME \
        --prompt-path "$OUT/$MODEL/shipped2.json" --output "$OUT/$MODEL/$MODEL.trained4.json" \
        2> "$OUT/$MODEL/train4.log"
    mkdir -p "$OUT/$MODEL/round4"
    cp "runs/trained4-$MODEL/algo_output/output.json" "runs/trained4-$MODEL/algo_output/tree.html" \
        "runs/trained4-$MODEL/algo_output/trace.txt" "$OUT/$MODEL/round4/"
    seed "$OUT/$MODEL/everyday-dev" "$OUT/$MODEL/everyday-dev4"  # the model alone's answers are cached there
    step "$BIN/auto-model-eval" --configs "$OUT/$MODEL/configs4.toml" --eval-set auto_model/data/eval/everyday-dev.jsonl \
        --output "$OUT/$MODEL/everyday-dev4" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
done
