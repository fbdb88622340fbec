"""The run directory: what a run writes, how it is read back, and who may write it.

    OUT/config.yaml      the resolved configuration (every key)
    OUT/metrics.jsonl    one JSON record per completed iteration
    OUT/tensorboard/     the same scalars as TensorBoard events (`logger: tensorboard`)
    OUT/wandb/, wandb_id the local files and the id of the W&B run (`logger: wandb`)
    OUT/checkpoints/     the training state every `checkpoint_every` iterations
    OUT/eval.json        written by `metarl eval`
    OUT/.lock            the writer's lock (pid, host, since when)

One process writes a run directory at a time: `RunLock` takes an exclusive `flock` on
OUT/.lock for as long as the run is open, so a second `metarl train --resume OUT` is
refused at once, naming the holder. The kernel drops the lock when its process dies,
however it dies, so a lock left by a killed run is taken over by the next one (which
says so). Evaluation and plotting only read, and take no lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys

import yaml

from metarl_jax import loggers
from metarl_jax.config import ConfigError, load_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = loggers.TENSORBOARD_DIR
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"
SWEEP_INDEX = "sweep.json"  # at the top of a sweep's directory (metarl_jax.sweep)
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, CHECKPOINT_DIR + ".corrupt",
             TENSORBOARD_DIR, loggers.WANDB_DIR, loggers.WANDB_ID_FILE, EVAL_FILE,
             SWEEP_INDEX)


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (held by another process, or holding
    no intact checkpoint); `str()` is one line saying why and what to do."""


class RunLock:
    """An exclusive, non-blocking lock on `run_dir/.lock`, held until `release`."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def acquire(self) -> "RunLock":
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_holder(handle))
            handle.close()
            raise RunDirectoryError(
                f"run directory {os.path.dirname(self.path)} is in use by {holder}; wait "
                "for that run to end or stop it, then resume") from None
        previous = _read_holder(handle)
        if previous:  # written by a process that died holding it: the kernel freed it
            print(f"note: taking over the lock of {_describe_holder(previous)}, which is "
                  "no longer running", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().astimezone()
                                 .isoformat(timespec="seconds")}))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.truncate(0)  # an empty file: released cleanly
            self._file.flush()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(handle) -> dict:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"unreadable": text[:80]}


def _describe_holder(holder: dict) -> str:
    if "pid" not in holder:
        return "another process"
    return (f"pid {holder['pid']} on host {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}")


def prepare_output_dir(out_dir: str, force: bool) -> None:
    """Creates `out_dir`; refuses one holding a run unless `force`, which clears it
    (the caller holds the lock)."""
    os.makedirs(out_dir, exist_ok=True)
    existing = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
    if existing and not force:
        raise ConfigError(f"config: --out: {out_dir} already holds a run ({existing[0]}); "
                          "choose another directory, --resume it, or pass --force to "
                          "overwrite it")
    for name in existing:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def check_new_output_dir(out_dir: str, force: bool) -> None:
    """The refusal of `prepare_output_dir`, without creating or clearing anything."""
    if os.path.isdir(out_dir) and not force:
        existing = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
        if existing:
            prepare_output_dir(out_dir, force)  # raises


def write_config(run_dir: str, config_dict: dict) -> None:
    path = os.path.join(run_dir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(config_dict, f, sort_keys=False)
    os.replace(path + ".tmp", path)


def read_config_dict(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"config: --run/--resume: {run_dir} holds no run (no {CONFIG_FILE})")
    return load_yaml(path)


def load_run_config(run_dir: str):
    """The run's resolved configuration (`run_config.RunConfig`)."""
    from metarl_jax.run_config import resolve_config

    return resolve_config(read_config_dict(run_dir))


def read_metrics(run_dir: str) -> list[dict]:
    """The records of `metrics.jsonl`, up to the first line cut short by a kill."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_metrics(run_dir: str, last_iteration: int) -> None:
    """Keeps the records up to `last_iteration`: the iterations after the checkpoint
    are about to be recomputed, identically, and must not appear twice."""
    kept = [r for r in read_metrics(run_dir) if r["iteration"] <= last_iteration]
    path = os.path.join(run_dir, METRICS_FILE)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """Appends records to `metrics.jsonl` (flushed per record) and hands each to the
    run's experiment tracker (`metarl_jax.loggers`: TensorBoard by default)."""

    def __init__(self, run_dir: str, first_iteration: int, logger: str = "tensorboard",
                 config_dict: dict | None = None, resume: bool = False):
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a")
        try:
            self._logger = loggers.open_logger(logger, run_dir, config_dict or {},
                                               first_iteration, resume)
        except BaseException:
            self._file.close()
            raise

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._logger.log(record)

    def close(self) -> None:
        self._file.close()
        self._logger.close()
