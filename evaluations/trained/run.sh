#!/usr/bin/env bash
# The auto-model-train runs whose artifacts are candidates to ship for the embedded models (everyday
# route; moves that need no writer model; metrics as the reward, with a cost per prompt token), and
# the evaluations that the rule in RULE.md reads. Run from the repository root:
#   bash evaluations/trained/run.sh            # both models
# A rerun answers every finished request from the runs' caches (runs/, not committed).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
TRAIN=(--route everyday --moves decoding,examples,sentences
       --reward metric:clean_ending,metric:no_loop,metric:refusal --token-cost 0.2
       --queries-per-level 8 --depth 6 --beam-size 2 --n-actions 2 --max-depth-increase 0
       --num-training-examples 48 --max-new-tokens 256 --backend vllm --dtype float32 --seed 42
       --example-bank feedback-runs/embedded-models/gemma-3-270m-careful-3shot.json --disable-tqdm)
. "$(dirname "$0")/../steps.sh"

for MODEL in smollm2-135m-instruct gemma-3-270m; do
    case $MODEL in
        smollm2-135m-instruct) NAME=HuggingFaceTB/SmolLM2-135M-Instruct ;;
        gemma-3-270m) NAME=google/gemma-3-270m ;;
    esac
    mkdir -p "$OUT/$MODEL"
    [ -f "runs/trained-$MODEL/algo_output/checkpoint.json" ] && RESUME=--resume || RESUME=
    step "$BIN/auto-model-train" "${TRAIN[@]}" --base-model-name "$NAME" --log-dir "runs/trained-$MODEL" $RESUME \
        --output "$OUT/$MODEL/$MODEL.trained.json" 2> "$OUT/$MODEL/train.log"
    cp "runs/trained-$MODEL/algo_output/output.json" "runs/trained-$MODEL/algo_output/tree.html" \
        "runs/trained-$MODEL/algo_output/trace.txt" "$OUT/$MODEL/"
done

# The rule's measurements (RULE.md): the everyday held-out split (256 new tokens, with the reward
# model's preference over the model alone), and the four held-out safety splits (96 new tokens).
RM=feedback-runs/embedded-models/rm   # trained by feedback-runs/embedded-models/run.sh (its weights are not committed)
[ -f "$RM/reward_model.json" ] || step "$BIN/auto-model-rm" train --data feedback-runs/embedded-models/comparison.json \
    --output "$RM" --epochs 2 --learning-rate 5e-5 > /dev/null
for MODEL in smollm2-135m-instruct gemma-3-270m; do
    step "$BIN/auto-model-eval" --configs "$OUT/$MODEL/configs.toml" --eval-set auto_model/data/eval/everyday.jsonl \
        --output "$OUT/$MODEL/everyday" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
    for SPLIT in heldout4 heldout heldout2 heldout3; do
        step "$BIN/auto-model-eval" --configs "$OUT/$MODEL/configs.toml" --eval-set "auto_model/data/eval/$SPLIT.jsonl" \
            --output "$OUT/$MODEL/$SPLIT" --max-new-tokens 96 --judge none
    done
done
