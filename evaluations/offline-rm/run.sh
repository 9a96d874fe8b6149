#!/usr/bin/env bash
# Offline self-alignment on the embedded SmolLM2 (issue 18), on CPUs: DRPO and the ICL stage with the
# synthetic-feedback reward model and judge-free metrics as the reward (no judge model), then
# auto-model-eval of the shipped defaults against the results and against best-of-n, on the shipped
# eval set (where the shipped-defaults rule is applied) and on held-out split 4 (reported beside it).
# Needs the reward model of feedback-runs/embedded-models/run.sh (feedback-runs/embedded-models/rm).
# Usage: bash evaluations/offline-rm/run.sh   (a rerun answers finished requests from the caches)
set -euo pipefail
DIR=evaluations/offline-rm
BIN=${BIN:-.venv/bin}
RM=feedback-runs/embedded-models/rm
REWARD="rm:$RM,metric:refusal,metric:clean_ending@0.5"
COMMON=(--backend vllm --dtype float32 --reward "$REWARD" --disable-tqdm --seed 42)
. "$(dirname "$0")/../steps.sh"

# DRPO on the everyday route (its prompt is the one most requests get; the safety route and the
# routing are kept): 10 levels, beam 2, 3 rewrites, answers as the evaluation asks for them.
step "$BIN/auto-model-train" --route everyday "${COMMON[@]}" --depth 10 --max-depth-increase 0 --beam-size 2 \
    --n-actions 3 --num-training-examples 10 --max-new-tokens 96 --judge-max-new-tokens 384 \
    --log-dir "$DIR/drpo-everyday" --output "$DIR/smollm2-135m-instruct.rm-drpo.json" --resume
# The ICL stage with the same reward: one round of 2 rewrites per example of the shipped pool.
step "$BIN/auto-model-train" icl "${COMMON[@]}" --num-iters 1 --n-actions 2 --judge-max-new-tokens 384 \
    --log-dir "$DIR/icl" --output "$DIR/ICL_examples.rm.json" --resume
for SET in eval heldout4; do
    step "$BIN/auto-model-eval" --configs "$DIR/configs.toml" --eval-set "auto_model/data/eval/$SET.jsonl" \
        --output "$DIR/$SET" --max-new-tokens 96 --judge none
done
