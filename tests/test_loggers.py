"""Experiment trackers: TensorBoard (the default), none, and Weights & Biases offline."""

import glob
import json
import os
import struct
import sys
import time

import pytest
from click.testing import CliRunner

from metarl_jax import run_config, run_dir, trainer
from metarl_jax.cli import EXIT_CONFIG_ERROR, main
from metarl_jax.config import ConfigError

TINY = {"meta_batch_size": 2, "episodes_per_task": 2, "horizon": 8, "hidden_sizes": [8, 8],
        "iterations_per_call": 1}
MISSING_WANDB = "config: logger: wandb is not installed; pip install -e '.[wandb]'"


def tiny_config(**overrides):
    return run_config.resolve_config({**run_config.DEFAULT_EXPERIMENT, **TINY, **overrides})


def read_wandb_records(path: str) -> list:
    """The protobuf records of a W&B run file (`run-<id>.wandb`): a 7-byte file header,
    then LevelDB log blocks of 32 KiB whose chunks (7-byte header: checksum, length,
    type) join into records."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(path: str) -> dict:
    """What a W&B offline run file holds: its id, its config, and its history as
    {step: {metric: value}}."""
    run_id, config, history = None, {}, {}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json)
                           for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json)
                           for item in record.config.update})
        elif kind == "history":
            values = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                      for item in record.history.item}
            history[int(values["_step"])] = values
    return {"id": run_id, "config": config, "history": history}


def test_metrics_log_hands_records_to_the_chosen_logger(tmp_path):
    record = {"iteration": 1, "pre_return": -3.0, "post_return": -2.5}
    for logger in ("tensorboard", "none"):
        out = tmp_path / logger
        out.mkdir()
        log = run_dir.MetricsLog(str(out), 1, logger)
        log.write(record)
        log.close()
        assert run_dir.read_metrics(str(out)) == [record]
        events = list((out / "tensorboard").glob("events.*"))
        assert bool(events) == (logger == "tensorboard")


def test_wandb_offline_run_holds_config_and_scalars_and_resume_continues_it(
        tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    trainer.train(tiny_config(iterations=2, checkpoint_every=1, logger="wandb"), out,
                  progress=False)
    run_id = open(os.path.join(out, "wandb_id")).read().strip()
    assert not os.path.exists(os.path.join(out, "tensorboard"))
    (first,) = glob.glob(os.path.join(out, "wandb", f"offline-run-*-{run_id}",
                                      f"run-{run_id}.wandb"))
    logged = offline_run(first)
    assert logged["id"] == run_id
    assert logged["config"]["meta_batch_size"] == 2
    assert logged["config"]["logger"] == "wandb"
    assert logged["config"]["env"] == {"name": "point-nav", "backend": "generalized"}
    records = run_dir.read_metrics(out)
    assert sorted(logged["history"]) == [1, 2]
    for record in records:
        step = logged["history"][record["iteration"]]
        for name in ("pre_return", "post_return", "env_steps", "outer_loss"):
            assert step[name] == pytest.approx(record[name])

    # Resumed with more iterations: the same W&B run, continued from iteration 3.
    trainer.train(tiny_config(iterations=3, checkpoint_every=1, logger="wandb"), out,
                  resume=True, progress=False)
    assert open(os.path.join(out, "wandb_id")).read().strip() == run_id
    runs = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    (second,) = [path for path in runs if path != first]
    continued = offline_run(second)
    assert continued["id"] == run_id
    assert sorted(continued["history"]) == [3]
    assert continued["history"][3]["pre_return"] == pytest.approx(
        run_dir.read_metrics(out)[-1]["pre_return"])


def test_missing_wandb_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        trainer.train(tiny_config(iterations=1, logger="wandb"), str(out), progress=False)
    assert str(error.value) == MISSING_WANDB
    assert not out.exists()

    start = time.perf_counter()
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--set", "logger=wandb",
                                       *(f"--set={k}={v}" for k, v in TINY.items())])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert result.output.strip() == f"error: {MISSING_WANDB}"
    assert time.perf_counter() - start < 5.0  # refused before compiling
    assert not out.exists()
