"""What the benchmark scripts share: the machine's description, the RESULTS.md block
every script appends, the standard point-nav and half-cheetah batches, and two ways of
timing compiled programs (repeated calls after the first; interleaved rounds when
variants are compared on a machine whose speed drifts)."""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax

from metarl_jax import run_config

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"

SETTINGS = {
    # name: (env, M, N, H)
    "point-nav": ("point-nav", 20, 20, 100),
    "halfcheetah-dir": ("halfcheetah-dir", 40, 20, 100),
}


def machine_description() -> str:
    """CPU model and core count, JAX version and the device JAX runs on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on "
            f"{device.platform.upper()} ({getattr(device, 'device_kind', device.platform)})")


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--no-record` and `--results` options every script takes."""
    parser.add_argument("--no-record", action="store_true",
                        help="print only; do not append the table to a results file")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS,
                        help="the file the table is appended to "
                             "(default: benchmarks/RESULTS.md)")


def record(args: argparse.Namespace, title: str, method: str, table: str) -> None:
    """Appends the table as `append_results` does, unless `--no-record` was given."""
    if not args.no_record:
        append_results(title, method, table, args.results)


def append_results(title: str, method: str, table: str, path=RESULTS) -> None:
    """Appends a "### title, UTC time" block naming the machine, then how the numbers
    were taken (`method`) and the table."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n### {title}, {stamp}\n\nMachine: {machine_description()}. {method}\n\n"
                f"{table}\n")


def build_algorithm(algo: str, env_name: str, meta_batch: int, episodes: int, horizon: int,
                    backend: str | None = None):
    """(env, policy, algorithm) of one algorithm at one batch, built as `metarl train`
    builds them."""
    config = run_config.resolve_config({
        "algo": algo, "env": {"name": env_name, "backend": backend},
        "meta_batch_size": meta_batch, "episodes_per_task": episodes, "horizon": horizon})
    return run_config.build(config)


def timed(fn: Callable, *args, repeats: int) -> tuple[float, float]:
    """(first-call seconds including compilation, median seconds of later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return first, statistics.median(samples)


def interleaved(programs: dict[str, Callable[[], Any]], rounds: int,
                calls: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each (already compiled) program, taken in `rounds` rounds
    of `calls` calls per program, so that a drift in the machine's speed falls on every
    program alike."""
    seconds: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, program in programs.items():
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(program())
                seconds[name].append(time.perf_counter() - start)
    return seconds
