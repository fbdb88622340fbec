#!/usr/bin/env bash
# MAML-TRPO on 2D point navigation under the two choices where ProMP's code (our default)
# and pytorch-maml-rl differ: per-episode averaging of the inner loss, the outer
# surrogate and the KL (`averaging: episodes`), and the KL direction of the trust region
# (`kl_direction: new_old`). 3 seeds each of experiments/maml_trpo_point_nav.yaml
# (100 iterations, 8·10⁶ environment steps per run); writes
# experiments/compare_maml_trpo_options.md (mean over iterations 80–100) and
# experiments/compare_maml_trpo_options.png. Finished runs are skipped.
#   bash experiments/compare_maml_trpo_options.sh [VARIANT ...]
#   VARIANT: default, per_episode, reversed_kl, both (default: the first three)
set -euo pipefail
cd "$(dirname "$0")/.."
METARL=${METARL:-.venv/bin/metarl}
PYTHON=${PYTHON:-.venv/bin/python}
source experiments/seeds.sh
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(default per_episode reversed_kl)

options() {
  case "$1" in
    default) ;;
    per_episode) echo "--set averaging=episodes" ;;
    reversed_kl) echo "--set kl_direction=new_old" ;;
    both) echo "--set averaging=episodes --set kl_direction=new_old" ;;
    *) echo "unknown variant $1 (default, per_episode, reversed_kl, both)" >&2; exit 2 ;;
  esac
}

runs=()
for variant in "${variants[@]}"; do
  flags=$(options "$variant")
  # shellcheck disable=SC2086
  train_seeds "runs/maml_trpo_options/$variant" 100 \
    --config experiments/maml_trpo_point_nav.yaml $flags
  runs+=("runs/maml_trpo_options/$variant"/seed{0,1,2})
done

{
  echo "# MAML-TRPO on point-nav: ProMP's code against pytorch-maml-rl's choices"
  echo
  echo "\`bash experiments/compare_maml_trpo_options.sh ${variants[*]}\`: mean over iterations"
  echo "80–100 of experiments/maml_trpo_point_nav.yaml, 3 seeds per variant."
  echo
  "$PYTHON" - "${variants[@]}" <<'EOF'
import pathlib
import statistics
import sys

sys.path.insert(0, "experiments")
from summarize import window_means  # noqa: E402

options = {"default": "averaging: steps, kl_direction: old_new",
           "per_episode": "averaging: episodes", "reversed_kl": "kl_direction: new_old",
           "both": "averaging: episodes, kl_direction: new_old"}
print("| variant | options | pre_return | post_return | post − pre | post_return per seed |")
print("|---|---|---|---|---|---|")
for variant in sys.argv[1:]:
    rows = [window_means(pathlib.Path(f"runs/maml_trpo_options/{variant}/seed{seed}"), 80, 100)
            for seed in (0, 1, 2)]
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    per_seed = ", ".join(f"{r['post']:.2f}" for r in rows)
    print(f"| {variant} | {options[variant]} | {mean('pre'):.2f} | **{mean('post'):.2f}** | "
          f"{mean('gain'):.2f} | {per_seed} |")
EOF
  echo
  "$PYTHON" experiments/summarize.py "${runs[@]}" --first 80 --last 100
} | tee experiments/compare_maml_trpo_options.md
"$METARL" plot "${runs[@]}" --no-pre --out experiments/compare_maml_trpo_options.png
