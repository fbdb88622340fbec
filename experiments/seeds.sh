# Sourced by the compare scripts: `train_seeds OUT ITERATIONS ARGS...` trains seeds 0-2
# of one setting as one compiled sweep in OUT (members OUT/seed0, OUT/seed1, OUT/seed2),
# skips it when finished and resumes it when interrupted.
train_seeds() {
  local out=$1 iterations=$2
  shift 2
  if [ -d "$out/seed2/checkpoints/$iterations" ]; then
    return
  elif [ -f "$out/sweep.json" ]; then
    "$METARL" train --resume "$out" --quiet
  else
    "$METARL" train --seeds 0-2 --out "$out" --force --quiet "$@"
  fi
}
