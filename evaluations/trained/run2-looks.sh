#!/usr/bin/env bash
# Round 2's looks at the held-out splits (RULE.md), after run2.sh: configs2.toml (alone, the start,
# the artifacts of rounds 1 and 2) on the everyday split (256 new tokens, with the reward model's
# preference over the model alone) and on the four held-out safety splits (96 new tokens). Round 3's
# artifact (run3.sh) did worse than round 1's on the development split and is not looked at.
# The reports are those of run.sh: each split's cache answers the configurations round 1 measured.
# Then: .venv/bin/python evaluations/trained/rule.py
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback-runs/embedded-models/rm
. "$(dirname "$0")/../steps.sh"
for MODEL in ${MODELS:-smollm2-135m-instruct gemma-3-270m}; do
    CONFIGS=$OUT/$MODEL/configs2.toml
    step "$BIN/auto-model-eval" --configs "$CONFIGS" --eval-set auto_model/data/eval/everyday.jsonl \
        --output "$OUT/$MODEL/everyday" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
    for SPLIT in heldout4 heldout heldout2 heldout3; do
        step "$BIN/auto-model-eval" --configs "$CONFIGS" --eval-set "auto_model/data/eval/$SPLIT.jsonl" \
            --output "$OUT/$MODEL/$SPLIT" --max-new-tokens 96 --judge none
    done
done
