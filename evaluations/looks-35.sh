#!/usr/bin/env bash
# Issue 35's looks at the held-out splits, after the router that reads the conversation and the answer
# check shipped (evaluations/answer-check/run.sh): held-out split 5's second look (alone and routed,
# evaluations/heldout5-look2.toml), the four earlier held-out safety splits and the everyday split
# (routed, evaluations/routed.toml). Answers are unchecked; evaluations/forms.py --check and
# evaluations/answer-check/score.py apply each model's answer check to them (what run_requests does).
set -euo pipefail
BIN=${BIN:-.venv/bin}
. "$(dirname "$0")/steps.sh"
step "$BIN/auto-model-eval" --configs evaluations/heldout5-look2.toml --eval-set auto_model/data/eval/heldout5.jsonl \
    --output evaluations/heldout5-look2 --max-new-tokens 96 --judge none
for SPLIT in heldout heldout2 heldout3 heldout4; do
    step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set "auto_model/data/eval/$SPLIT.jsonl" \
        --output "evaluations/looks-35/$SPLIT" --max-new-tokens 96 --judge none
done
step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set auto_model/data/eval/everyday.jsonl \
    --output evaluations/looks-35/everyday --max-new-tokens 256 --judge none
