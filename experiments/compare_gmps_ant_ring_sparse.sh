#!/usr/bin/env bash
# GMPS against ProMP on the sparse ant ring, at the scale a 2-core CPU allows (the paper's
# is 40 goals, 50 episodes of 200 steps, generalized physics; see gmps_ant_goal_ring*.yaml):
#   8 of the 40 ring goals (evenly spaced), M = 8 tasks, N = 10 episodes, H = 100,
#   the spring backend, 100 meta-iterations each.
# Phase 1 trains PPO experts on the DENSE ring (the information GMPS lets experts have)
# and writes their demonstrations; GMPS meta-trains on the sparse ring from that file with
# DAgger every 5 iterations; ProMP meta-trains on the sparse ring with its reward alone.
# Both are then evaluated on held-out ring goals with the sparse reward.
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=runs/ring
SMALL=(--set env.backend=spring --set meta_batch_size=8 --set episodes_per_task=10
       --set horizon=100 --iterations 100 --force --quiet)
mkdir -p "$OUT"
[ -f "$OUT/demos_dense8.npz" ] || "$METARL" experts --env ant-goal-ring --tasks 8 \
  --iterations 150 --seed 0 --out "$OUT/demos_dense8.npz" --set horizon=100 \
  --set env.backend=spring --set episodes_per_iteration=16
[ -d "$OUT/gmps/checkpoints/100" ] || "$METARL" train \
  --config experiments/gmps_ant_goal_ring_sparse.yaml --out "$OUT/gmps" "${SMALL[@]}" \
  --set gmps.num_train_tasks=8 --set gmps.demos="$OUT/demos_dense8.npz" \
  --set gmps.imitation_steps=100
[ -d "$OUT/promp/checkpoints/100" ] || "$METARL" train --algo promp \
  --env ant-goal-ring-sparse --out "$OUT/promp" "${SMALL[@]}"
for run in gmps promp; do
  "$METARL" eval --run "$OUT/$run" --tasks 16 --adapt-steps 1 --episodes 10 > "$OUT/$run/eval.txt"
done
"$PYTHON" experiments/summarize.py "$OUT/gmps" "$OUT/promp" | tee experiments/compare_gmps_ant_ring_sparse.md
"$METARL" plot "$OUT/gmps" "$OUT/promp" --out experiments/compare_gmps_ant_ring_sparse.png
