"""The task axis sharded over devices: same numbers as one device. Runs in subprocesses
with 4 (virtual) CPU devices, since the device count is fixed at JAX start-up."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from metarl_jax import run_config, trainer
    algo, devices, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    assert len(jax.devices()) == 4, jax.devices()
    config = run_config.resolve_config({
        **run_config.DEFAULT_EXPERIMENT, "algo": algo, "iterations": 3, "devices": devices,
        "meta_batch_size": 4, "episodes_per_task": 3, "horizon": 15, "hidden_sizes": [16, 16],
        **overrides})
    history = trainer.train(config, progress=False).history
    assert all(r["devices"] == devices for r in history), history
    print(json.dumps([{k: v for k, v in r.items() if not k.endswith("_s") and k != "devices"}
                      for r in history]))
""")


# Four virtual CPU devices, fully optimised: the session's unoptimised code generation
# (conftest.py) changes the rounding enough for TRPO's line search to amplify the
# difference between one and four devices past the tolerance.
FOUR_DEVICES = "--xla_force_host_platform_device_count=4"


def run(algo: str, devices: int, **overrides) -> list:
    env = {**os.environ, "XLA_FLAGS": FOUR_DEVICES,
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, algo, str(devices),
                          json.dumps(overrides)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_close(a, b, keys, rel):
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-4), (key, a[key], b[key])


@pytest.mark.slow  # every algorithm's two-device run is in tests/test_algorithm_contract.py
def test_four_devices_match_one_device_maml_trpo():
    """Sums over tasks are reassociated across devices, and TRPO's conjugate gradient
    amplifies those last-bit differences where the Fisher matrix is singular: with the
    [16, 16] policy (356 parameters) and 180 post-update states, the step size came out
    0.9 % apart. With fewer parameters (116) than Fisher rows (2 × 360 states) the first
    iteration agrees to 7e-4 and is compared in full; later iterations still drift
    (the step size 0.3 % apart after three), so only their returns are compared."""
    overrides = {"hidden_sizes": [8, 8], "episodes_per_task": 6}
    single, sharded = run("maml-trpo", 1, **overrides), run("maml-trpo", 4, **overrides)
    assert_close(single[0], sharded[0], single[0].keys(), rel=2e-3)
    for a, b in zip(single[1:], sharded[1:]):
        assert_close(a, b, ("pre_return", "post_return", "env_steps"), rel=1e-2)


def test_meta_batch_must_split_over_the_devices():
    """Asked for 4 devices, 6 tasks are an error; by default a run takes as many of the 4
    as divide its meta-batch."""
    env = {**os.environ, "XLA_FLAGS": FOUR_DEVICES}
    code = textwrap.dedent("""
        from metarl_jax import distributed, run_config, trainer
        print([distributed.sharding_for_tasks(m).mesh.size for m in (8, 6, 5, 2)])
        config = run_config.resolve_config({**run_config.DEFAULT_EXPERIMENT, "devices": 4,
                                         "meta_batch_size": 6, "iterations": 1})
        try:
            trainer.train(config, progress=False)
        except run_config.ConfigError as error:
            print(error)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.splitlines()[0] == "[4, 3, 1, 2]", out.stdout + out.stderr[-2000:]
    assert "meta_batch_size: 6 tasks do not split evenly over 4 devices" in out.stdout


def test_metarl_train_splits_the_host_cpu_one_device_per_core(tmp_path):
    """Without `--cpu-devices`, `metarl train` on a CPU-only host shards the tasks over
    one CPU device per core (as many as divide the meta-batch)."""
    from metarl_jax import host_cores

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run(
        [sys.executable, "-m", "metarl_jax.cli", "train", "--quiet",
         "--algo", "maml-vpg", "--env", "point-nav", "--iterations", "1",
         "--set", "meta_batch_size=4", "--set", "episodes_per_task=2", "--set", "horizon=5",
         "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["devices"] == max(d for d in range(1, min(host_cores(), 4) + 1) if 4 % d == 0)
    out = subprocess.run(
        [sys.executable, "-m", "metarl_jax.cli", "train", "--cpu-devices", "0",
         "--out", str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "cpu_devices: 0; expected at least 1" in out.stderr
