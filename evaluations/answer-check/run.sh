#!/usr/bin/env bash
# The shipped answer check: answers to requests the project tunes on, the check trained from them
# into each artifact, and what it does on the development splits. Run from the repository root.
#   1. train-set.jsonl: the routing and training queries and some of their rewordings (train_set.py);
#   2. the two embedded models alone answer them (greedy, 96 new tokens; alone.toml);
#   3. auto-model-train answer-check fits the check on both models' answers into each shipped artifact;
#   4. the development splits (dev, dev-forms, everyday-dev) answered alone and with the defaults
#      (answers unchecked), and score.py says what the check blocks there.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/answer-check
. "$(dirname "$0")/../steps.sh"
"$BIN/python" $OUT/train_set.py $OUT/train-set.jsonl
step "$BIN/auto-model-eval" --configs $OUT/alone.toml --eval-set $OUT/train-set.jsonl --output $OUT/train \
    --max-new-tokens 96 --judge none
for MODEL in smollm2-135m-instruct gemma-3-270m default; do
    step "$BIN/auto-model-train" answer-check --answers $OUT/train/report.json \
        --prompt-path auto_model/optimized_prompts/$MODEL.json --output auto_model/optimized_prompts/$MODEL.json
done
cat auto_model/data/eval/dev.jsonl auto_model/data/eval/dev-forms.jsonl auto_model/data/eval/everyday-dev.jsonl \
    > $OUT/dev-set.jsonl
step "$BIN/auto-model-eval" --configs $OUT/alone.toml --eval-set $OUT/dev-set.jsonl --output $OUT/dev \
    --max-new-tokens 96 --judge none
step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set auto_model/data/eval/everyday-dev.jsonl \
    --output $OUT/everyday-dev --max-new-tokens 256 --judge none
for MODEL in smollm2-135m-instruct gemma-3-270m; do
    "$BIN/python" $OUT/score.py auto_model/optimized_prompts/$MODEL.json $OUT/dev/report.json \
        $OUT/everyday-dev/report.json
done
