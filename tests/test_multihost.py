"""Two processes on this machine train one run together through jax.distributed (CPU
gloo collectives): they agree on the parameters, and the run's files are written once."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from metarl_jax import distributed, run_config, trainer
    coordinator, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.initialize(coordinator, 2, process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 2
    config = run_config.resolve_config({
        **run_config.DEFAULT_EXPERIMENT, "iterations": 3, "checkpoint_every": 2,
        "meta_batch_size": 4, "episodes_per_task": 3, "horizon": 15, "hidden_sizes": [16, 16]})
    training = trainer.train(config, out, progress=False)
    history, state = training.history, training.state
    flat = np.concatenate([np.ravel(np.asarray(x.addressable_data(0)))
                           for x in jax.tree.leaves(state.params)])
    print(json.dumps({"post": [r["post_return"] for r in history], "params": flat.tolist()}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # one CPU device per process (no virtual devices), the session's other flags kept
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=4", "")
    processes = [subprocess.Popen([sys.executable, "-c", SCRIPT, coordinator, str(rank),
                                   str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for rank in (0, 1)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = results
    np.testing.assert_array_equal(np.array(first["params"]), np.array(second["params"]))
    assert first["post"] == second["post"] and len(first["post"]) == 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "3"]
