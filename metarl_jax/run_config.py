"""A run's configuration: the keys that are not hyperparameters (`RunSettings`), the
published setting of every task, the built-in experiment, and `resolve_config`, which
validates a flat dict and fills every default before anything is built or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.maml import MAML_VARIANTS
from metarl_jax.config import (ConfigError, EnvConfig, at_least, build_dataclass, field, merge,
                               one_of, to_dict)
from metarl_jax.envs import TaskSpec, lookup, make_env
from metarl_jax.policies import GaussianPolicy


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The keys of a run that are not the algorithm's hyperparameters."""

    algo: str = "promp"
    seed: int = 0
    iterations: int = field(1001, **at_least(1))
    env: EnvConfig = EnvConfig()
    devices: int | None = field(None, **at_least(1))  # None: every device
    checkpoint_every: int = field(50, **at_least(1))
    # Meta-iterations per compiled call (a `lax.scan`); must divide checkpoint_every.
    # None: `default_iterations_per_call`.
    iterations_per_call: int | None = field(None, **at_least(1))
    keep_checkpoints: int = field(3, **at_least(1))
    # Members of a sweep computed at once (vmapped); None: all on an accelerator, one at
    # a time on a CPU. The numbers are the same either way.
    sweep_batch: int | None = field(None, **at_least(1))
    # Where the scalars go besides metrics.jsonl (`metarl_jax.loggers`).
    logger: str = field("tensorboard", **one_of("tensorboard", "wandb", "none"))
    # Test-only fault injection: θ is replaced by NaN before this iteration.
    debug_nan_at_iteration: int | None = field(None, **at_least(1))


# --- defaults: the task's published setting, the built-in experiment -------------------

# The algorithms of the ProMP paper's experiments, ProMP and its MAML-family baselines:
# they ran at the same per-task settings.
PROMP_PAPER = ("promp", *(variant.name for variant in MAML_VARIANTS))
EVERY = None  # an entry of PUBLISHED_SETTINGS that applies to every algorithm

# Per task distribution, the keys of its published setting that differ from the
# algorithm's own defaults, as (algorithms the entry applies to, keys) in order. The
# horizon is not here: it is the task distribution's own (`TaskEnv.horizon`, filled in
# when `horizon` is null). Everything else (N = 20 episodes, K = 1, α = 0.1, (64, 64)
# tanh policy, 1001 iterations, ProMP's P = 5, ε = 0.3, fixed KL 5e-4, TRPO's δ = 0.01 ...)
# is the algorithm's default.
_RAND_PARAMS = (  # ProMP HopperRandParams, WalkerRandParams
    (PROMP_PAPER, {"inner_lr": 0.05}),
    (("promp",), {"promp_steps": 3, "adaptive_kl": True, "kl_coeff": 1e-3}),  # target 0.01
)
_HUMANOID = ((EVERY, {"hidden_sizes": [128, 128]}),)  # ProMP HumanoidFwdBack, RandDir
_GMPS_RING = (  # GMPS ant locomotion: 40 tasks, 50 episodes per task, 2 × 100 ReLU
    (("gmps",), {"episodes_per_task": 50, "hidden_sizes": [100, 100], "activation": "relu"}),
)
PUBLISHED_SETTINGS: dict[str, tuple] = {
    "point-nav": ((EVERY, {"meta_batch_size": 20}),),  # MAML's and ProMP's 2D navigation
    "halfcheetah-dir": (),  # ProMP HalfCheetahFwdBack
    "halfcheetah-vel": (),  # MAML HalfCheetahVel
    "ant-dir": (),  # ProMP AntFwdBack
    "ant-dir2d": (),  # ProMP AntRandDir
    "ant-goal": ((PROMP_PAPER, {"inner_steps": 2}),),  # ProMP AntRandGoal
    "ant-goal-ring": _GMPS_RING,
    "ant-goal-ring-sparse": _GMPS_RING,
    "walker-dir": (),  # ProMP WalkerFwdBack
    "walker-vel": (),  # ProMP Walker2DRandVel
    "hopper-params": _RAND_PARAMS,
    "walker-params": _RAND_PARAMS,
    "humanoid-dir": _HUMANOID,
    "humanoid-dir2d": _HUMANOID,
}

# What a configuration naming neither `algo` nor `env` runs (`metarl train` with no
# flags): ProMP on 2D navigation at its published setting (M = 20, N = 20, H = 100), for
# 100 iterations instead of 1001. experiments/promp_point_nav.yaml (`make train`) writes
# the same run out.
DEFAULT_EXPERIMENT: dict[str, Any] = {"algo": "promp", "env": {"name": "point-nav"},
                                      "iterations": 100}


# Meta-iterations per compiled call on a task without physics, where a call of one
# iteration spends a measurable share of its time in dispatch and host work
# (benchmarks/meta_iteration.py --mode train).
FUSED_ITERATIONS = 5


def default_iterations_per_call(task: TaskSpec, checkpoint_every: int) -> int:
    """`iterations_per_call` when the configuration names none. A task on physics: 1,
    since its iteration takes seconds and fusing would only delay the metrics line and
    the watchdog. Any other task: the largest divisor of `checkpoint_every` up to
    FUSED_ITERATIONS, so that calls still end at every checkpoint."""
    if task.physics:
        return 1
    return max(k for k in range(1, FUSED_ITERATIONS + 1) if checkpoint_every % k == 0)


def published_setting(env_name: str, algo: str) -> dict:
    """The keys `env_name`'s published setting gives `algo` (see PUBLISHED_SETTINGS)."""
    setting: dict = {}
    for algorithms, keys in PUBLISHED_SETTINGS.get(env_name, ()):  # none for one's own task
        if algorithms is EVERY or algo in algorithms:
            setting = merge(setting, keys)
    return setting


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSettings
    algorithm: Any  # the algorithm's own config dataclass

    def to_dict(self) -> dict:
        """Flat form, as in the YAML files."""
        return {**to_dict(self.run), **to_dict(self.algorithm)}


def resolve_config(raw: dict) -> RunConfig:
    """Validates a flat configuration dict and fills every default.

    Precedence, lowest first: the algorithm's defaults; the task's published setting
    (`published_setting`; its horizon when `horizon` is null, its default backend when
    `env.backend` is null); `DEFAULT_EXPERIMENT` when
    `raw` names neither `algo` nor `env.name`; `raw` itself (the config file, the
    command-line flags and `--set`, merged in that order by the caller).

    Raises ConfigError (one line naming the field and the allowed values) on an unknown
    algorithm, environment or key, or a value of the wrong type or range. Nothing is
    built or compiled here.
    """
    if not isinstance(raw.get("env", {}), dict):
        raise ConfigError(f"config: env: expected a mapping, got {raw['env']!r}")
    if "algo" not in raw and "name" not in raw.get("env", {}):
        raw = merge(DEFAULT_EXPERIMENT, raw)
    algo = raw.get("algo", RunSettings.algo)
    if not isinstance(algo, str) or algo not in ALGORITHMS:
        raise ConfigError(f"config: algo: unknown algorithm {algo!r}; allowed: "
                          + ", ".join(sorted(ALGORITHMS)))
    env_name = raw.get("env", {}).get("name", EnvConfig.name)
    task = lookup(env_name)  # a registered task or module:attribute; ConfigError if neither
    raw = merge(published_setting(env_name, algo), raw)
    run_keys = {f.name for f in dataclasses.fields(RunSettings)}
    run = build_dataclass(RunSettings, {k: v for k, v in raw.items() if k in run_keys})
    if run.iterations_per_call is None:
        run = dataclasses.replace(run, iterations_per_call=default_iterations_per_call(
            task, run.checkpoint_every))
    if run.checkpoint_every % run.iterations_per_call:
        raise ConfigError(f"config: iterations_per_call: {run.iterations_per_call} does not "
                          f"divide checkpoint_every ({run.checkpoint_every}); use a divisor "
                          "of it")
    algorithm_class = ALGORITHMS[algo]
    algorithm_keys = [f.name for f in dataclasses.fields(algorithm_class.config_class)]
    unknown = sorted(set(raw) - run_keys - set(algorithm_keys))
    if unknown:
        owners = sorted(name for name, cls in ALGORITHMS.items()
                        if unknown[0] in {f.name for f in dataclasses.fields(cls.config_class)})
        if owners:
            raise ConfigError(f"config: {unknown[0]}: an option of {', '.join(owners)}, not of "
                              f"algo {algo}; allowed for {algo}: " + ", ".join(algorithm_keys))
        raise ConfigError(f"config: unknown key {unknown[0]!r} for algo {algo}; allowed: "
                          + ", ".join([f.name for f in dataclasses.fields(RunSettings)]
                                      + algorithm_keys))
    hyper = build_dataclass(algorithm_class.config_class,
                            {k: v for k, v in raw.items() if k not in run_keys})
    if hyper.horizon is None:
        hyper = dataclasses.replace(hyper, horizon=task.horizon)
    if run.env.backend is None:
        run = dataclasses.replace(run, env=dataclasses.replace(run.env, backend=task.backend))
    return RunConfig(run=run, algorithm=hyper)


def build(config: RunConfig):
    """Environment, policy and algorithm for a resolved configuration."""
    env = make_env(config.run.env.name, backend=config.run.env.backend,
                   horizon=config.algorithm.horizon)
    policy = GaussianPolicy(env.observation_size, env.action_size,
                            tuple(config.algorithm.hidden_sizes), config.algorithm.activation,
                            init_std=config.algorithm.init_std,
                            min_std=config.algorithm.min_std)
    algorithm = ALGORITHMS[config.run.algo](config.algorithm, env, policy)
    return env, policy, algorithm
