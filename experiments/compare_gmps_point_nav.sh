#!/usr/bin/env bash
# GMPS (experts mode, 101 iterations, 160,000 meta-training environment steps per
# iteration) against ProMP (100 iterations, 80,000) on point-nav, 3 seeds each: the
# post-update return over iterations 80–100, the lowest 5-iteration moving average from
# iteration 40 on, and the steps to reach a post-update return of −20 (5-iteration moving
# average); the experts' own steps are reported apart. Reuses the ProMP runs of
# compare_point_nav.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
source experiments/seeds.sh
train_seeds runs/compare_point_nav/gmps 101 --config experiments/gmps_point_nav.yaml
train_seeds runs/compare_point_nav/promp 100 --config experiments/promp_point_nav.yaml
runs=(runs/compare_point_nav/{gmps,promp}/seed{0,1,2})
{
  "$PYTHON" experiments/summarize.py "${runs[@]}" --first 80 --last 100 --threshold -20
  echo
  "$PYTHON" experiments/gmps_stability.py "${runs[@]}" --first 80 --last 100 --from 40
} | tee experiments/compare_gmps_point_nav.md
"$METARL" plot "${runs[@]}" --no-pre --out experiments/compare_gmps_point_nav.png
