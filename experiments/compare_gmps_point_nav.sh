#!/usr/bin/env bash
# GMPS (experts mode) against ProMP on point-nav, 3 seeds each: meta-training environment
# steps to reach a post-update return of −20 (5-iteration moving average); the experts'
# own steps are reported apart. Reuses the ProMP runs of compare_point_nav.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
for seed in 0 1 2; do
  out=runs/compare_point_nav/gmps_seed${seed}
  [ -d "$out/checkpoints/40" ] || "$METARL" train --config experiments/gmps_point_nav.yaml \
    --seed "$seed" --out "$out" --force --quiet
  out=runs/compare_point_nav/promp_seed${seed}
  [ -d "$out/checkpoints/100" ] || "$METARL" train --config experiments/promp_point_nav.yaml \
    --seed "$seed" --out "$out" --force --quiet
done
runs=(runs/compare_point_nav/{gmps,promp}_seed{0,1,2})
"$PYTHON" experiments/summarize.py "${runs[@]}" --at-steps 3200000 --threshold -20 \
  | tee experiments/compare_gmps_point_nav.md
"$METARL" plot "${runs[@]}" --no-pre --out experiments/compare_gmps_point_nav.png
