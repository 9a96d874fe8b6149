#!/usr/bin/env bash
# Round 4's look (RULE.md, "Round 4" and "Round 4b"), after run4.sh and run4b.sh, for a model whose development check passed:
# configs4.toml (alone, the shipped artifact, round 4's) on the second held-out everyday split
# (256 new tokens, with the reward model's preference over the model alone) and on the four
# held-out safety splits (96 new tokens; the model alone's answers come from the earlier looks' caches). Then:
#   .venv/bin/python evaluations/trained/rule4.py
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/trained
RM=feedback-runs/embedded-models/rm
. "$(dirname "$0")/../steps.sh"
for MODEL in ${MODELS:-smollm2-135m-instruct gemma-3-270m}; do
    CONFIGS=$OUT/$MODEL/configs4.toml
    # Gemma: round 4 is not looked at and round 4b failed its development check (RULE.md), so its look
    # measures the model alone and the shipped artifact on the everyday split only (nothing else changed).
    [ "$MODEL" = gemma-3-270m ] && CONFIGS=$OUT/$MODEL/configs4-shipped.toml
    step "$BIN/auto-model-eval" --configs "$CONFIGS" --eval-set auto_model/data/eval/everyday2.jsonl \
        --output "$OUT/$MODEL/everyday2" --max-new-tokens 256 --judge none --reward-model "$RM" --baseline alone
    [ "$MODEL" = gemma-3-270m ] && continue
    for SPLIT in heldout heldout2 heldout3 heldout4; do
        seed "$OUT/$MODEL/$SPLIT" "$OUT/$MODEL/$SPLIT-4"  # answers to requests that did not change are cached there
        step "$BIN/auto-model-eval" --configs "$CONFIGS" \
            --eval-set "auto_model/data/eval/$SPLIT.jsonl" --output "$OUT/$MODEL/$SPLIT-4" --max-new-tokens 96 --judge none
    done
done
