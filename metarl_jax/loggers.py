"""Experiment trackers: where a run's scalars go besides `metrics.jsonl`.

The run setting `logger` picks one:

    tensorboard  OUT/tensorboard/, event files for `tensorboard --logdir` (the default)
    wandb        a Weights & Biases run; its local files in OUT/wandb/, its id in
                 OUT/wandb_id so that `--resume` continues the same W&B run
    none         nothing but metrics.jsonl

Every logger has the same three calls: `open(run_dir, config_dict, first_iteration,
resume)` (a class method returning the logger), `log(record)` with one metrics record
(its `iteration` is the step) and `close()`. `metarl_jax.run_dir.MetricsLog` writes
metrics.jsonl and hands each record on to the chosen logger.

W&B's own environment variables apply as usual: `WANDB_MODE=offline` keeps everything
in OUT/wandb/ (upload it later with `wandb sync`), `WANDB_PROJECT` and `WANDB_ENTITY`
choose where an online run goes (project `metarl-jax` by default).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import string

from metarl_jax.config import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb_id"
WANDB_PROJECT = "metarl-jax"


def scalars(record: dict) -> dict:
    """The record's values to plot: everything but the step itself."""
    return {name: value for name, value in record.items() if name != "iteration"}


class NoLogger:
    """`logger: none`."""

    @classmethod
    def open(cls, run_dir: str, config_dict: dict, first_iteration: int,
             resume: bool) -> "NoLogger":
        return cls()

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars as TensorBoard events in OUT/tensorboard/, one per metric and iteration."""

    def __init__(self, writer):
        self._writer = writer

    @classmethod
    def open(cls, run_dir: str, config_dict: dict, first_iteration: int,
             resume: bool) -> "TensorBoardLogger":
        from tensorboardX import SummaryWriter

        # purge_step drops the events of iterations a resumed run is about to recompute.
        return cls(SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR),
                                 purge_step=first_iteration))

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, record["iteration"])

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A Weights & Biases run whose config is the resolved configuration and whose step
    is the iteration.

    A new run draws an id and stores it in OUT/wandb_id; `--resume` reads it back and
    continues that W&B run. The iterations a resumed run recomputes (after its
    checkpoint) have the values already logged, so those W&B holds are not sent again.
    """

    def __init__(self, run):
        self._run = run
        self._logged_through = int(run.step or 0)  # the last step W&B holds

    @classmethod
    def open(cls, run_dir: str, config_dict: dict, first_iteration: int,
             resume: bool) -> "WandbLogger":
        import wandb

        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        run_id = None
        if resume and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        continuing = run_id is not None
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))  # as W&B draws its run ids
            with open(id_path + ".tmp", "w") as f:
                f.write(run_id + "\n")
            os.replace(id_path + ".tmp", id_path)
        local_dir = os.path.join(run_dir, WANDB_DIR)
        os.makedirs(local_dir, exist_ok=True)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            name=os.path.basename(os.path.abspath(run_dir)), config=config_dict,
            dir=run_dir, id=run_id, resume="allow" if continuing else None)
        return cls(run)

    def log(self, record: dict) -> None:
        if record["iteration"] > self._logged_through:
            self._run.log(scalars(record), step=record["iteration"])

    def close(self) -> None:
        self._run.finish()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "none": NoLogger}
# The package each logger needs, and how to install it.
REQUIRES = {"tensorboard": ("tensorboardX", "pip install tensorboardX"),
            "wandb": ("wandb", "pip install -e '.[wandb]'")}


def check_available(name: str) -> None:
    """Raises ConfigError (one line) when the package logger `name` needs is missing:
    called before anything is compiled."""
    if name not in LOGGERS:
        raise ConfigError(f"config: logger: unknown logger {name!r}; allowed: "
                          + ", ".join(LOGGERS))
    module, install = REQUIRES.get(name, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"config: logger: {name} is not installed; {install}")


def open_logger(name: str, run_dir: str, config_dict: dict, first_iteration: int,
                resume: bool):
    """The logger `name` (a key of LOGGERS), opened on `run_dir`."""
    check_available(name)
    return LOGGERS[name].open(run_dir, config_dict, first_iteration, resume)
