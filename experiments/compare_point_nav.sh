#!/usr/bin/env bash
# ProMP against the MAML family on 2D point navigation: 3 seeds each (one compiled
# sweep per algorithm), the same sample
# budget (100 iterations × M·N·H·(K+1) = 8·10⁶ environment steps per run), then the
# table of final returns and the curve PNG in experiments/.
#   bash experiments/compare_point_nav.sh [ALGO ...]
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
source experiments/seeds.sh
algos=("$@")
[ ${#algos[@]} -gt 0 ] || algos=(promp maml-trpo lvc-vpg dice-vpg emaml-trpo)
runs=()
for algo in "${algos[@]}"; do
  config=experiments/$(echo "$algo" | tr - _)_point_nav.yaml
  train_seeds "runs/compare_point_nav/$algo" 100 --config "$config"
  runs+=("runs/compare_point_nav/$algo"/seed{0,1,2})
done
"$PYTHON" experiments/summarize.py "${runs[@]}" --first 80 --last 100 | tee experiments/compare_point_nav.md
"$METARL" plot "${runs[@]}" --no-pre --out experiments/compare_point_nav.png
