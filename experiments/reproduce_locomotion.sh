#!/usr/bin/env bash
# The ProMP paper's locomotion comparison, ProMP against MAML-TRPO, 2 seeds each, at each
# task's published setting (`--algo A --env T`: its batch, horizon, step sizes and the
# task's default backend, `generalized` for the half-cheetah and the hopper, `mjx` for the
# ant), for a fixed number of meta-iterations per task. A run of hours
# is done in pieces: run the script again and it skips finished runs and continues an
# interrupted one from its last checkpoint (one every 5 iterations), on a fresh clone from
# the copy that experiments/reproduce_summary.py commits beside the run's summary.
#
#   bash experiments/reproduce_locomotion.sh                    # every task, in order
#   bash experiments/reproduce_locomotion.sh halfcheetah-dir    # one task
#   ALGOS=promp SEEDS=0 bash experiments/reproduce_locomotion.sh halfcheetah-dir
#   VARIANT=mjx ALGOS=promp SEEDS=0 bash experiments/reproduce_locomotion.sh halfcheetah-dir
#   VARIANT=std-floor ALGOS=promp SEEDS=0 bash experiments/reproduce_locomotion.sh ant-dir
#
# VARIANT trains the same runs changed in one respect, to tell what holds a curve back
# (runs ALGO_VARIANT_seedS, beside the others in the tables): `mjx`, MuJoCo's own solver
# (env.backend=mjx) on the same model (the ant's default already); `small-batch`, the
# reduced batch M = 20, N = 10 with four times the iterations, so the same environment
# steps; `std-floor`, the policy's σ floored at 0.58 (min_std), where MAML-TRPO's σ ends
# on ant-dir, to tell whether ProMP's lower σ is what slows it there.
#
# Runs go to runs/reproduce/TASK/ALGO_seedS; each finished run is then evaluated on 40
# held-out tasks with 0-3 adaptation steps (eval.json), and
# experiments/reproduce_summary.py writes the tables and curves of docs/reproduction.md.
# On a CPU-only host `metarl train` splits the CPU into one device per core, which
# changes the speed, not the numbers' distribution.
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
ALGOS=${ALGOS:-promp maml-trpo}
SEEDS=${SEEDS:-0 1}

# Meta-iterations per task: 160 × 160,000 steps = 2.56e7 on halfcheetah-dir, the
# paper's 2.5e7 mark; 320 on ant-dir, 5.1e7, the paper's 5e7 mark (an iteration takes
# 8 s on mjx here); the others as far as a 2-core CPU allows in a few hours each.
declare -A ITERATIONS=([halfcheetah-dir]=160 [halfcheetah-vel]=160 [ant-dir]=320
                       [hopper-params]=100)
VARIANT=${VARIANT:-}
case "$VARIANT" in
  "") SUFFIX=""; SCALE=1; VARIANT_ARGS=() ;;
  mjx) SUFFIX="_mjx"; SCALE=1; VARIANT_ARGS=(--set env.backend=mjx) ;;
  small-batch) SUFFIX="_small-batch"; SCALE=4
    VARIANT_ARGS=(--set meta_batch_size=20 --set episodes_per_task=10) ;;
  std-floor) SUFFIX="_std-floor"; SCALE=1; VARIANT_ARGS=(--set min_std=0.58) ;;
  *) echo "VARIANT must be one of: mjx, small-batch, std-floor (or unset), not '$VARIANT'" >&2
     exit 2 ;;
esac
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(halfcheetah-dir halfcheetah-vel ant-dir hopper-params)

train_run() {  # OUT ITERATIONS ARGS...: train, continue or skip one run
  local out=$1 iterations=$2
  shift 2
  # A run made elsewhere: its summary and newest checkpoint were committed by
  # reproduce_summary.py; continue (or, if finished, keep) it from them.
  local parked=experiments/reproduce/${out#runs/reproduce/}
  if [ ! -d "$out/checkpoints" ] && [ ! -d "$parked/checkpoints" ] \
      && [ -f "$parked/eval.json" ]; then
    # Finished and evaluated elsewhere, its final checkpoint not kept: nothing to redo.
    echo "$out: finished (summary in $parked)"
    return
  fi
  if [ ! -d "$out/checkpoints" ] && [ -d "$parked/checkpoints" ]; then
    echo "$out: taken from $parked"
    mkdir -p "$out"
    cp -r "$parked/config.yaml" "$parked/metrics.jsonl" "$parked/checkpoints" "$out/"
    if [ -f "$parked/eval.json" ]; then cp "$parked/eval.json" "$out/"; fi
  fi
  if [ -d "$out/checkpoints/$iterations" ]; then
    echo "$out: finished"
  elif [ -d "$out/checkpoints" ] && [ -n "$(ls -A "$out/checkpoints")" ]; then
    echo "$out: continuing"
    "$METARL" train --resume "$out" --iterations "$iterations" --quiet
  else
    echo "$out: starting"
    "$METARL" train --out "$out" --force --quiet --iterations "$iterations" \
      --set checkpoint_every=5 "$@"
  fi
  if [ ! -f "$out/eval.json" ]; then
    "$METARL" eval --run "$out" --adapt-steps 3
  fi
}

for task in "${TASKS[@]}"; do
  if [ "$VARIANT" = mjx ] && "$METARL" train --env "$task" --print-config 2>/dev/null \
      | grep -q "backend: mjx"; then
    echo "$task: runs on mjx by default; VARIANT=mjx would repeat its runs, skipped"
    continue
  fi
  for seed in $SEEDS; do
    for algo in $ALGOS; do
      train_run "runs/reproduce/$task/${algo}${SUFFIX}_seed$seed" \
        "$((ITERATIONS[$task] * SCALE))" --algo "$algo" --env "$task" --seed "$seed" \
        "${VARIANT_ARGS[@]}"
    done
  done
done
