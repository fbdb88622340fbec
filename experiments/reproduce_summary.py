"""Tables and curves of the locomotion reproduction (experiments/reproduce_locomotion.sh).

    python experiments/reproduce_summary.py            # every task with runs
    python experiments/reproduce_summary.py halfcheetah-dir
    python experiments/reproduce_summary.py ant-dir --blocks 40   # curves in blocks, only
    python experiments/reproduce_summary.py hopper-params --blocks 10 --metric gain

For each run in runs/reproduce/TASK/ALGO_seedS it first copies the run's summary
(config.yaml, metrics.jsonl, eval.json) to experiments/reproduce/TASK/ALGO_seedS, which
is committed, so the tables and figures can be redrawn without the run directories. It
copies the run's newest checkpoint too (checkpoints/N, about 200 kB): of a run not yet
finished, so that reproduce_locomotion.sh can continue it on another machine or a fresh
clone; of a finished one, its final meta-policy, for `metarl eval` and
experiments/halfcheetah_physics.py. Then it
writes, from those copies, experiments/reproduce/TASK.md (one row per run and one per
algorithm: the return at the paper's marks and over the last 10 iterations, the held-out
adaptation), puts the same table into docs/reproduction.md between the task's
`<!-- summary:TASK -->` markers (a new task's section goes before "What differs"), and
draws docs/reproduction_TASK.png (post- and pre-update return against environment
steps, the paper's values as black markers; below, the policy's σ).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "reproduce"
SUMMARIES = ROOT / "experiments" / "reproduce"
FIGURES = ROOT / "docs"
REPORT = ROOT / "docs" / "reproduction.md"
SUMMARY_FILES = ("config.yaml", "metrics.jsonl", "eval.json")

# The ProMP paper's Figure 2 (MuJoCo dynamics), read by eye, about ±10 %:
# (env steps, post-update return, label) per task and algorithm.
PAPER = {
    "halfcheetah-dir": {"promp": [(2.5e7, 250.0), (1.2e8, 310.0)],
                        "maml-trpo": [(1.2e8, 262.0)]},
    "ant-dir": {"promp": [(5e7, 178.0)], "maml-trpo": [(5e7, 162.0)]},
    "hopper-params": {"promp": [(None, 265.0)], "maml-trpo": [(None, 230.0)]},
    "halfcheetah-vel": {},  # not in the ProMP paper (it is MAML's HalfCheetahVel)
}


def last_checkpoint(run: pathlib.Path) -> pathlib.Path | None:
    """The run's newest complete checkpoint directory (orbax marks a complete one with
    its metadata file), or None."""
    done = [d for d in (run / "checkpoints").glob("[0-9]*")
            if (d / "_CHECKPOINT_METADATA").exists()]
    return max(done, key=lambda d: int(d.name)) if done else None


def park_checkpoint(run: pathlib.Path, target: pathlib.Path) -> None:
    """Keeps the run's newest checkpoint beside its summary, replacing any older copy."""
    newest = last_checkpoint(run)
    if newest is None:
        return
    shutil.rmtree(target / "checkpoints", ignore_errors=True)
    shutil.copytree(newest, target / "checkpoints" / newest.name)


def copy_summaries(task: str) -> None:
    for run in sorted((RUNS / task).glob("*_seed*")):
        target = SUMMARIES / task / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in SUMMARY_FILES:
            if (run / name).exists():
                shutil.copy2(run / name, target / name)
        if (run / "config.yaml").exists():
            park_checkpoint(run, target)
        if (target / "eval.json").exists():  # name the run as the repository has it
            result = json.loads((target / "eval.json").read_text())
            result["run"] = str(target.relative_to(ROOT))
            (target / "eval.json").write_text(json.dumps(result, indent=2) + "\n")


def read_records(run: pathlib.Path) -> list[dict]:
    from metarl_jax.run_dir import read_metrics

    return read_metrics(str(run))


def mean_near(records: list[dict], steps: float, key: str) -> float | None:
    """Mean of `key` over the iterations with env steps in (0.9·steps, steps], or None
    when the run has not got that far."""
    if records[-1]["env_steps"] < steps:
        return None
    window = [r[key] for r in records if 0.9 * steps < r["env_steps"] <= steps]
    return statistics.fmean(window) if window else None


def blocks_table(runs: list[pathlib.Path], size: int, metric: str = "post") -> str:
    """Mean post-update return (`metric` "post"), or post − pre ("gain"), of each run
    over blocks of `size` iterations, with σ at the block's end; a block the run has not
    finished is left out."""

    def value(record):
        if metric == "gain":
            return record["post_return"] - record["pre_return"]
        return record["post_return"]

    records = {run.name: read_records(run) for run in runs}
    longest = max(len(r) for r in records.values())
    lines = ["| iterations | " + " | ".join(records) + " |",
             "|---" * (len(records) + 1) + "|"]
    for first in range(0, longest - size + 1, size):
        cells = []
        for rows in records.values():
            block = rows[first:first + size]
            cells.append(f"{statistics.fmean(value(r) for r in block):.1f} "
                         f"(σ {block[-1]['policy_std']:.2f})" if len(block) == size else "–")
        lines.append(f"| {first + 1}–{first + size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_row(run: pathlib.Path, marks: list[float]) -> dict:
    records = read_records(run)
    last = records[-10:]
    row = {"run": run.name, "algo": run.name.rsplit("_seed", 1)[0],
           "seed": run.name.rsplit("_seed", 1)[1], "iterations": records[-1]["iteration"],
           "env_steps": records[-1]["env_steps"], "hours": records[-1]["time_s"] / 3600,
           "post_last": statistics.fmean(r["post_return"] for r in last),
           "pre_last": statistics.fmean(r["pre_return"] for r in last),
           "at_marks": {mark: mean_near(records, mark, "post_return") for mark in marks},
           "eval": None}
    if (run / "eval.json").exists():
        row["eval"] = json.loads((run / "eval.json").read_text())
    return row


def fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def task_table(task: str, rows: list[dict], marks: list[float]) -> str:
    mark_heads = "".join(f" post at {mark:.2g} steps |" for mark in marks)
    # Where episodes end early (a body falls), the held-out mean over tasks and the mean
    # over pooled episodes (the training curves' measure) differ: show both.
    pooled = any(row["eval"] and "return_pooled" in row["eval"] for row in rows)
    lines = [f"## {task}", "",
             f"| run | iterations | env steps | hours |{mark_heads} post, last 10 it. | "
             "pre, last 10 it. | post − pre | held-out return after 0 / 1 / 2 / 3 steps |"
             + (" held-out, episodes pooled |" if pooled else ""),
             "|---|---|---|---|" + "---|" * len(marks) + "---|---|---|---|"
             + ("---|" if pooled else "")]

    def held_out(row, key):
        if row["eval"] is None or key not in row["eval"]:
            return "–"
        return " / ".join(f"{m:.1f}" for m in row["eval"][key])

    for row in rows:
        lines.append(
            f"| {row['run']} | {row['iterations']} | {row['env_steps']:,} | "
            f"{row['hours']:.2f} |" + "".join(f" {fmt(row['at_marks'][m])} |" for m in marks)
            + f" {row['post_last']:.1f} | {row['pre_last']:.1f} | "
              f"{row['post_last'] - row['pre_last']:.1f} | {held_out(row, 'return_mean')} |"
            + (f" {held_out(row, 'return_pooled')} |" if pooled else ""))
    lines.append("")
    for algo in sorted({row["algo"] for row in rows}):
        # Finished runs only (their eval.json exists): the last 10 iterations of a run
        # still under way are from earlier in training and would pull the mean down.
        mine = [row for row in rows if row["algo"] == algo and row["eval"] is not None]
        if len(mine) < 2:
            continue
        post = statistics.fmean(row["post_last"] for row in mine)
        pre = statistics.fmean(row["pre_last"] for row in mine)
        at = []
        for mark in marks:
            values = [row["at_marks"][mark] for row in mine]
            at.append(fmt(statistics.fmean(values)) if None not in values else "–")
        lines.append(f"- {algo}, mean of {len(mine)} seeds: post {post:.1f}, pre {pre:.1f}, "
                     f"gain {post - pre:.1f} over the last 10 iterations"
                     + "".join(f"; post at {m:.2g} steps {a}" for m, a in zip(marks, at)))
    paper = PAPER.get(task, {})
    for algo, points in paper.items():
        lines.append(f"- paper, {algo}: " + ", ".join(
            f"≈ {value:.0f}" + (f" at {steps:.2g} steps" if steps else " (final)")
            for steps, value in points))
    return "\n".join(lines) + "\n"


def put_in_report(report: str, task: str, table: str) -> str:
    """The report with the task's table (less its heading) between the task's markers; a
    task without markers gets a section of its own before the "What differs" section."""
    begin, end = f"<!-- summary:{task} -->", f"<!-- /summary:{task} -->"
    body = table.split("\n", 1)[1].strip() if table.startswith("## ") else table.strip()
    block = f"{begin}\n{body}\n{end}"
    if begin in report and end in report:
        head, rest = report.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    section = f"## {task}\n\n{block}\n\n"
    anchor = "## What differs"
    if anchor in report:
        head, rest = report.split(anchor, 1)
        return head + section + anchor + rest
    return report.rstrip() + "\n\n" + section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*")
    parser.add_argument("--blocks", type=int, metavar="N",
                        help="only print the committed runs' mean post-update return over "
                             "blocks of N iterations")
    parser.add_argument("--metric", choices=("post", "gain"), default="post",
                        help="with --blocks: the post-update return, or post − pre")
    args = parser.parse_args()
    tasks = args.tasks or sorted({p.name for p in list(RUNS.glob("*")) +
                                  list(SUMMARIES.glob("*")) if p.is_dir()})
    import yaml

    from metarl_jax.plotting import plot_runs

    for task in tasks:
        if args.blocks:
            runs = sorted((SUMMARIES / task).glob("*_seed*"))
            print(f"{task}\n\n{blocks_table(runs, args.blocks, args.metric)}\n")
            continue
        if (RUNS / task).exists():
            copy_summaries(task)
        runs = sorted((SUMMARIES / task).glob("*_seed*"))
        if not runs:
            continue
        marks = sorted({steps for points in PAPER.get(task, {}).values()
                        for steps, _ in points if steps})
        rows = [run_row(run, marks) for run in runs]
        reached = [m for m in marks if any(row["env_steps"] >= m for row in rows)]
        text = task_table(task, rows, marks)
        (SUMMARIES / f"{task}.md").write_text(text)
        REPORT.write_text(put_in_report(REPORT.read_text(), task, text))
        print(text)
        references = [(steps, value, f"paper, {algo}")
                      for algo, points in PAPER.get(task, {}).items()
                      for steps, value in points if steps in reached]
        backends = sorted({yaml.safe_load((run / "config.yaml").read_text())["env"]["backend"]
                           for run in runs})
        figure = plot_runs([str(r) for r in runs], str(FIGURES / f"reproduction_{task}.png"),
                           references=references,
                           title=f"{task}, Brax {' and '.join(backends)}",
                           show_std=True)
        print(f"written: {figure}")


if __name__ == "__main__":
    main()
