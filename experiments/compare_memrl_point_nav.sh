#!/usr/bin/env bash
# MEMRL (sweep defaults) against ProMP and MAML-TRPO on point-nav, 3 seeds each, compared
# at an equal budget of 8·10⁶ environment steps (MEMRL's K = 5 uses 6 phases per
# iteration, ProMP's and MAML-TRPO's 2); also MEMRL's iterations 80–100 for its target.
# Reuses the ProMP and MAML-TRPO runs of compare_point_nav.sh when present.
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
source experiments/seeds.sh
for algo in memrl promp maml-trpo; do
  train_seeds "runs/compare_point_nav/$algo" 100 \
    --config "experiments/$(echo "$algo" | tr - _)_point_nav.yaml"
done
runs=(runs/compare_point_nav/{memrl,promp,maml-trpo}/seed{0,1,2})
{
  echo "At 8·10⁶ environment steps (mean over the last 20 % of that budget):"
  echo
  "$PYTHON" experiments/summarize.py "${runs[@]}" --at-steps 8000000
  echo
  echo "MEMRL, iterations 80–100 (24·10⁶ environment steps per run):"
  echo
  "$PYTHON" experiments/summarize.py runs/compare_point_nav/memrl/seed{0,1,2} --first 80 --last 100
} | tee experiments/compare_memrl_point_nav.md
"$METARL" plot "${runs[@]}" --no-pre --out experiments/compare_memrl_point_nav.png
