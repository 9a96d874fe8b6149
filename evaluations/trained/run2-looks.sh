#!/usr/bin/env bash
# The looks of rounds 2 and 3 at the held-out splits (RULE.md), after run2.sh and run3.sh: each
# model's last configs file (alone, the start, every round's artifact: configs2.toml for Gemma,
# configs3.toml for SmolLM2) on the everyday split (256 new tokens, with the reward model's
# preference over the model alone) and on the four held-out safety splits (96 new tokens).
# The reports are those of run.sh: each split's cache answers the configurations round 1 measured.
# Then: .venv/bin/python evaluations/trained/rule.py
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback/embedded-models/rm
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; /usr/bin/time -f "   %e s, %M KB max RSS" "$@"; }
for MODEL in ${MODELS:-smollm2-135m-instruct gemma-3-270m}; do
    CONFIGS=$OUT/$MODEL/configs2.toml; [ -f "$OUT/$MODEL/configs3.toml" ] && CONFIGS=$OUT/$MODEL/configs3.toml
    step "$BIN/auto-model-eval" --configs "$CONFIGS" --eval-set auto_model/data/eval/everyday.jsonl \
        --output "$OUT/$MODEL/everyday" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
    for SPLIT in heldout4 heldout heldout2 heldout3; do
        step "$BIN/auto-model-eval" --configs "$CONFIGS" --eval-set "auto_model/data/eval/$SPLIT.jsonl" \
            --output "$OUT/$MODEL/$SPLIT" --max-new-tokens 96 --judge none
    done
done
