#!/usr/bin/env bash
# The synthetic-feedback run committed here, on the embedded models, on CPUs (see README.md beside it).
# Usage: bash feedback-runs/embedded-models/run.sh [DIR]   (a rerun answers finished requests from DIR/cache)
set -euo pipefail
DIR=${1:-feedback-runs/embedded-models}
BIN=${BIN:-.venv/bin}
SMOL=HuggingFaceTB/SmolLM2-135M-Instruct
GEMMA=google/gemma-3-270m
. "$(dirname "$0")/../../evaluations/steps.sh"

step "$BIN/auto-model-feedback" --mode pg --output_dir "$DIR" --model_name_or_path "$SMOL" --num_generation 250
step "$BIN/auto-model-feedback" --mode rg --output_dir "$DIR" --model_name_or_path "$GEMMA" --prompt_file_path careful --n_shot 3
step "$BIN/auto-model-feedback" --mode rg --output_dir "$DIR" --model_name_or_path "$SMOL" --prompt_file_path careful --n_shot 3
step "$BIN/auto-model-feedback" --mode rg --output_dir "$DIR" --model_name_or_path "$SMOL" --prompt_file_path plain --n_shot 1
step "$BIN/auto-model-feedback" --mode cs --output_dir "$DIR" \
    --rubric gemma-3-270m-careful-3shot smollm2-135m-instruct-careful-3shot smollm2-135m-instruct-plain-1shot
step "$BIN/auto-model-rm" train --data "$DIR/comparison.json" --output "$DIR/rm" --epochs 2 --learning-rate 5e-5 \
    > "$DIR/rm-summary.json"
step "$BIN/auto-model-rm" eval "$DIR/rm" --data "$DIR/comparison.json"

# Is the RM useful as a judge? The embedded model's own answers to the shipped eval set (and to the
# held-out set) against fixed refusals.
for SET in eval heldout; do
    mkdir -p "$DIR/answers-$SET"
    "$BIN/python" -c "import sys; from auto_model.evaluation.eval_set import load_eval_set, packaged_eval_path; \
print('\n'.join(i.query for i in load_eval_set(packaged_eval_path().with_name(sys.argv[1] + '.jsonl'))))" "$SET" \
        > "$DIR/answers-$SET/prompts.txt"
    step "$BIN/auto-model-feedback" --mode rg --output_dir "$DIR/answers-$SET" --model_name_or_path "$SMOL" \
        --prompt_file_path plain --n_shot 1 --temperature 0
    step "$BIN/auto-model-rm" refusals "$DIR/rm" --answers "$DIR/answers-$SET/smollm2-135m-instruct-plain-1shot.json" \
        --eval-set "auto_model/data/eval/$SET.jsonl"
done
