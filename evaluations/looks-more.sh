#!/usr/bin/env bash
# The looks after the rows in more harm categories (232 routing rows, 200 more small-talk pairs, the
# routers refitted): held-out split 7's second look, and the earlier
# held-out splits and the everyday split again (answers unchecked; evaluations/forms.py,
# evaluations/misinformation.py and evaluations/looks-35/splits.py apply each model's answer check).
# Each run starts from the cache of the previous look at its split, so only the requests whose prompt
# changed are answered again.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/looks-more
. "$(dirname "$0")/steps.sh"
seed evaluations/heldout7 "$OUT/heldout7"
step "$BIN/auto-model-eval" --configs evaluations/heldout7.toml --eval-set auto_model/data/eval/heldout7.jsonl \
    --output "$OUT/heldout7" --max-new-tokens 96 --judge none
seed evaluations/looks-misinfo/heldout6 "$OUT/heldout6"
step "$BIN/auto-model-eval" --configs evaluations/heldout6.toml --eval-set auto_model/data/eval/heldout6.jsonl \
    --output "$OUT/heldout6" --max-new-tokens 96 --judge none
seed evaluations/looks-misinfo/heldout5 "$OUT/heldout5"
step "$BIN/auto-model-eval" --configs evaluations/heldout5-look2.toml --eval-set auto_model/data/eval/heldout5.jsonl \
    --output "$OUT/heldout5" --max-new-tokens 96 --judge none
for SPLIT in heldout heldout2 heldout3 heldout4; do
    seed "evaluations/looks-misinfo/$SPLIT" "$OUT/$SPLIT"
    step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set "auto_model/data/eval/$SPLIT.jsonl" \
        --output "$OUT/$SPLIT" --max-new-tokens 96 --judge none
done
seed evaluations/looks-misinfo/everyday "$OUT/everyday"
step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set auto_model/data/eval/everyday.jsonl \
    --output "$OUT/everyday" --max-new-tokens 256 --judge none
