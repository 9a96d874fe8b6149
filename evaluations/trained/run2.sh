#!/usr/bin/env bash
# Round 2: a longer search that starts from round 1's artifact (run.sh), on other training queries
# (seed 43), with the same moves and reward; then its check on the everyday development split, and
# (if it ships) the rule's measurements on the held-out splits. Run from the repository root:
#   bash evaluations/trained/run2.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback-runs/embedded-models/rm
TRAIN=(--route everyday --moves decoding,examples,sentences
       --reward metric:clean_ending,metric:no_loop,metric:refusal --token-cost 0.2
       --queries-per-level 8 --depth 10 --beam-size 2 --n-actions 2 --max-depth-increase 0
       --num-training-examples 80 --max-new-tokens 256 --backend vllm --dtype float32 --seed 43
       --example-bank feedback-runs/embedded-models/gemma-3-270m-careful-3shot.json --disable-tqdm)
. "$(dirname "$0")/../steps.sh"

for MODEL in smollm2-135m-instruct gemma-3-270m; do
    case $MODEL in
        smollm2-135m-instruct) NAME=HuggingFaceTB/SmolLM2-135M-Instruct ;;
        gemma-3-270m) NAME=google/gemma-3-270m ;;
    esac
    [ -f "runs/trained2-$MODEL/algo_output/checkpoint.json" ] && RESUME=--resume || RESUME=
    step "$BIN/auto-model-train" "${TRAIN[@]}" --base-model-name "$NAME" --log-dir "runs/trained2-$MODEL" $RESUME \
        --prompt-path "$OUT/$MODEL/$MODEL.trained.json" --output "$OUT/$MODEL/$MODEL.trained2.json" \
        2> "$OUT/$MODEL/train2.log"
    mkdir -p "$OUT/$MODEL/round2"
    cp "runs/trained2-$MODEL/algo_output/output.json" "runs/trained2-$MODEL/algo_output/tree.html" \
        "runs/trained2-$MODEL/algo_output/trace.txt" "$OUT/$MODEL/round2/"
    # The development check (everyday-dev.jsonl is what settings may be chosen on).
    step "$BIN/auto-model-eval" --configs "$OUT/$MODEL/configs2.toml" --eval-set auto_model/data/eval/everyday-dev.jsonl \
        --output "$OUT/$MODEL/everyday-dev" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
done
