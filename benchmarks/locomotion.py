"""Seconds per ProMP meta-iteration on the locomotion tasks, for every Brax backend and
CPU split, at the paper's batch and at a reduced one, through `metarl train` as a user
runs it. Prints a table and appends it to benchmarks/RESULTS.md with the machine named.

    python benchmarks/locomotion.py                          # the whole grid (hours)
    python benchmarks/locomotion.py --tasks halfcheetah-dir --batches reduced
    python benchmarks/locomotion.py --backends spring positional --cpu-devices 1 2

Each row is one `metarl train` process (no persistent compilation cache): the time of
its first iteration (the trainer compiles the program ahead of that call, so this is
not compilation), then the median `iteration_s` of the later iterations, and the
environment steps per second that makes. The paper's batch is the
task's published setting (what `--algo promp --env TASK` runs); the reduced batch keeps
its horizon with M = 20 tasks and N = 10 episodes. A process that does not finish within
`--timeout` seconds is reported as such, not waited for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from harness import add_record_arguments, record

TASKS = ("halfcheetah-dir", "ant-dir", "walker-dir", "hopper-params")
BACKENDS = ("generalized", "positional", "spring", "mjx")
REDUCED = {"meta_batch_size": 20, "episodes_per_task": 10}


def run_once(task: str, backend: str, cpu_devices: int, batch: str, iterations: int,
             timeout: float, work: str) -> dict:
    out = os.path.join(work, f"{task}_{backend}_{cpu_devices}_{batch}")
    args = [sys.executable, "-m", "metarl_jax.cli", "train", "--quiet", "--force",
            "--algo", "promp", "--env", task, "--iterations", str(iterations),
            "--set", f"env.backend={backend}", "--out", out,
            "--cpu-devices", str(cpu_devices)]
    if batch == "reduced":
        args += [arg for key, value in REDUCED.items() for arg in ("--set", f"{key}={value}")]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    row = {"task": task, "backend": backend, "cpu_devices": cpu_devices, "batch": batch}
    try:
        subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"no result in {timeout:.0f} s"}
    except subprocess.CalledProcessError as error:
        return {**row, "status": "failed: " + error.stderr.strip().splitlines()[-1][:80]}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steady = statistics.median(r["iteration_s"] for r in records[1:])
    steps = records[0]["env_steps"]
    with open(os.path.join(out, "config.yaml")) as f:
        config = f.read()
    return {**row, "status": "ok", "first_call_s": records[0]["iteration_s"],
            "iteration_s": steady, "steps_per_s": steps / steady,
            "batch_shape": batch_shape(config)}


def batch_shape(config_yaml: str) -> str:
    """"M×N×H" of a run's resolved config.yaml."""
    import yaml

    config = yaml.safe_load(config_yaml)
    return "×".join(str(config[k]) for k in ("meta_batch_size", "episodes_per_task",
                                             "horizon"))


def format_table(rows: list[dict]) -> str:
    lines = ["| task | backend | CPU devices | batch M×N×H | first call (s) | "
             "s per iteration | env steps/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['task']} | {r['backend']} | {r['cpu_devices']} | "
                         f"{r['batch']} | {r['status']} | | |")
            continue
        lines.append(f"| {r['task']} | {r['backend']} | {r['cpu_devices']} | "
                     f"{r['batch_shape']} | {r['first_call_s']:.1f} | "
                     f"{r['iteration_s']:.2f} | {r['steps_per_s']:,.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--cpu-devices", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batches", nargs="+", default=["paper", "reduced"],
                        choices=("paper", "reduced"))
    parser.add_argument("--iterations", type=int, default=3,
                        help="iterations per run; the first is reported apart")
    parser.add_argument("--timeout", type=float, default=1800)
    add_record_arguments(parser)
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations: at least 2 (the first includes compilation)")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks:
            for batch in args.batches:
                for backend in args.backends:
                    for cpu_devices in args.cpu_devices:
                        rows.append(run_once(task, backend, cpu_devices, batch,
                                             args.iterations, args.timeout, work))
                        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    print(table)
    record(args, "ProMP on the locomotion tasks: backend × CPU devices × batch",
           f"`python benchmarks/locomotion.py --tasks {' '.join(args.tasks)} --backends "
           f"{' '.join(args.backends)} --cpu-devices {' '.join(map(str, args.cpu_devices))} "
           f"--batches {' '.join(args.batches)} --iterations {args.iterations}`: each row "
           "a `metarl train` process without a persistent compilation cache.", table)


if __name__ == "__main__":
    main()
