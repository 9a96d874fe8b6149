#!/usr/bin/env bash
# The looks after the misinformation category's data shipped (146 routing rows, 6 refusal examples in
# the pool, the routers refitted): held-out split 6's second look, split 5's third, and the four
# earlier held-out safety splits and the everyday split again (routed, answers unchecked; the scripts
# named in evaluations/looks-misinfo/README.md apply each model's answer check). Each run starts from
# the cache of the previous look at its split, so only the requests whose prompt changed are answered
# again. The same looks at the state before the small-talk pairs (the misinformation data alone) are in
# evaluations/looks-misinfo-b/.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=evaluations/looks-misinfo
. "$(dirname "$0")/steps.sh"
seed evaluations/heldout6 "$OUT/heldout6"
step "$BIN/auto-model-eval" --configs evaluations/heldout6.toml --eval-set auto_model/data/eval/heldout6.jsonl \
    --output "$OUT/heldout6" --max-new-tokens 96 --judge none
seed evaluations/heldout5-look2 "$OUT/heldout5"
step "$BIN/auto-model-eval" --configs evaluations/heldout5-look2.toml --eval-set auto_model/data/eval/heldout5.jsonl \
    --output "$OUT/heldout5" --max-new-tokens 96 --judge none
for SPLIT in heldout heldout2 heldout3 heldout4; do
    seed "evaluations/looks-35/$SPLIT" "$OUT/$SPLIT"
    step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set "auto_model/data/eval/$SPLIT.jsonl" \
        --output "$OUT/$SPLIT" --max-new-tokens 96 --judge none
done
seed evaluations/looks-35/everyday "$OUT/everyday"
step "$BIN/auto-model-eval" --configs evaluations/routed.toml --eval-set auto_model/data/eval/everyday.jsonl \
    --output "$OUT/everyday" --max-new-tokens 256 --judge none
