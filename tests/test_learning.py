"""ProMP on point-nav with the default experiment reaches its target on three seeds.

About three minutes on two CPU cores, so it runs in `make test-slow`, not `make test`.
"""

import statistics

import pytest

from metarl_jax import run_config, trainer


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_promp_point_nav_default_experiment_reaches_target(seed):
    config = run_config.resolve_config({**run_config.DEFAULT_EXPERIMENT, "seed": seed})
    history = trainer.train(config, progress=False).history
    window = [r for r in history if 80 <= r["iteration"] <= 100]
    post = statistics.fmean(r["post_return"] for r in window)
    gain = statistics.fmean(r["post_return"] - r["pre_return"] for r in window)
    assert post >= -19.0, post
    assert gain >= 15.0, gain
