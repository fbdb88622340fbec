#!/usr/bin/env bash
# ProMP's inner step size on 2D navigation: α ∈ {0.05, 0.1, 0.2} × seeds 0-2, nine runs
# trained as one compiled sweep (100 iterations each), then the curves (one per α, the
# seeds' mean and range) in docs/sweep_point_nav.png and the table in
# experiments/sweep_point_nav.md. Finished runs are skipped, interrupted ones resumed.
#   bash experiments/sweep_point_nav.sh
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=runs/sweep_point_nav
if [ ! -d "$OUT/inner_lr=0.2_seed2/checkpoints/100" ]; then
  if [ -f "$OUT/sweep.json" ]; then
    "$METARL" train --resume "$OUT" --quiet
  else
    "$METARL" train --config experiments/promp_point_nav.yaml --seeds 0-2 \
      --sweep inner_lr=0.05,0.1,0.2 --out "$OUT" --force --quiet
  fi
fi
"$PYTHON" experiments/summarize.py "$OUT"/inner_lr=*_seed* --first 80 --last 100 \
  | tee experiments/sweep_point_nav.md
"$METARL" plot "$OUT" --no-pre --out docs/sweep_point_nav.png
