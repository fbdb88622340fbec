"""The contract between a meta-learner and everything that runs it.

The trainer, `metarl eval`, the benchmarks and the checkpoints rely on exactly what is
written here, and `tests/test_algorithm_contract.py` checks every registered algorithm
against it. To add an algorithm:

1. a frozen config dataclass extending `SamplingConfig` (its fields are the YAML keys);
2. a state extending `MetaState` with `@flax.struct.dataclass`;
3. a `MetaLearner` subclass with `name`, `config_class`, `init`, `meta_iteration` and
   `adaptation_returns` (and `prepare` / `host_state` where it has host-side work);
4. one entry in `metarl_jax.algorithms.ALGORITHMS`.

What the runner does for every algorithm, so that no algorithm has to remember it: it
compiles `meta_iteration` under the task sharding (every rollout places its task axis
over the devices, `metarl_jax.rollout.collect`), checks the metrics and parameters for
non-finite values, checkpoints the state pytree together with `host_state()`, and
restores both on `--resume`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from metarl_jax.config import SamplingConfig
from metarl_jax.envs.base import TaskEnv
from metarl_jax.policies import GaussianPolicy

# Scalars every meta-iteration reports: the undiscounted mean episode return before
# adaptation (θ) and after it (φ_K), and how many episodes each phase counted.
REQUIRED_METRICS = ("pre_return", "post_return", "pre_episodes", "post_episodes")


class AdaptationReturns(NamedTuple):
    """Meta-test returns of T tasks after 0, 1, …, K adaptation steps.

    Both fields are [T, K + 1]. A task's mean is over the episodes its fresh lanes
    counted (`Trajectories.lane_episode_totals`): one per lane where episodes never end,
    more where bodies fall and restart. The mean over tasks weights every task alike; the
    training metrics pool episodes, which weights a task by how often its episodes end
    (`pooled_mean` gives that measure from these fields).
    """
    task_means: jax.Array  # mean undiscounted episode return of each task
    episodes: jax.Array  # how many episodes each of those means is over

    def pooled_mean(self) -> jax.Array:
        """[K + 1]: the mean over all tasks' episodes pooled, the measure of the
        `pre_return` / `post_return` training metrics."""
        return (jnp.sum(self.task_means * self.episodes, axis=0)
                / jnp.sum(self.episodes, axis=0))


@flax.struct.dataclass
class MetaState:
    """What every training state holds; algorithms add their own fields.

    The whole state is one pytree: it is the carry of the compiled program and what a
    checkpoint saves, so resuming from it continues the run exactly.
    """

    params: Any  # the meta-parameters θ, as the policy's `apply` takes them
    opt_state: optax.OptState  # the outer optimiser's state (a placeholder if it has none)
    key: jax.Array  # the random stream of the run
    iteration: jax.Array  # meta-iterations completed, int32


class MetaLearner(abc.ABC):
    """A meta-learner: a configuration, a task distribution and a policy, from which it
    builds its initial state and its jittable meta-iteration.

    `meta_iteration(state) -> (state, metrics)` is traced once and compiled; it must be
    a pure function of the state (its randomness from `state.key`), and its metrics a
    dict of scalars or small arrays including `REQUIRED_METRICS`.
    """

    name: ClassVar[str]  # the `--algo` name
    config_class: ClassVar[type]  # a frozen dataclass extending SamplingConfig

    def __init__(self, config, env: TaskEnv, policy: GaussianPolicy):
        if config.horizon is None:
            config = dataclasses.replace(config, horizon=env.horizon)
        self.config = config
        self.env = env
        self.policy = policy

    @abc.abstractmethod
    def init(self, key: jax.Array) -> MetaState:
        """The state before the first iteration (shapes final: `prepare` may only fill
        it)."""

    @abc.abstractmethod
    def meta_iteration(self, state: MetaState) -> tuple[MetaState, dict]:
        """One meta-iteration: sample tasks, adapt, update θ. Jittable."""

    @abc.abstractmethod
    def adaptation_returns(self, params, key: jax.Array, num_tasks: int, adapt_steps: int,
                           episodes_per_task: int) -> AdaptationReturns:
        """Meta-test: on `num_tasks` tasks drawn with `key`, the mean episode return of
        fresh episodes after 0, 1, …, `adapt_steps` steps of the algorithm's own
        adaptation from `params`, and how many episodes each mean is over; both
        [num_tasks, adapt_steps + 1]. Jittable with the three sizes static. `metarl eval`
        reports it."""

    def prepare(self, state: MetaState, seed: int) -> MetaState:
        """Host-side set-up before the first iteration of a new run (not on resume):
        data the program reads from the state, e.g. GMPS's experts and demonstrations."""
        return state

    def host_state(self) -> dict:
        """Host-side values the run needs after a resume, as JSON-ready scalars; saved
        with every checkpoint and reported in every metrics record."""
        return {}

    def load_host_state(self, saved: dict) -> None:
        """Restores what `host_state` returned, from a checkpoint."""
        unknown = sorted(set(saved) - set(self.host_state()))
        if unknown:
            raise ValueError(f"{self.name}: checkpoint holds unknown host state {unknown}")

    @property
    def env_steps_per_iteration(self) -> int:
        """M·N·H per sampling phase, K inner phases plus the post-update one: every
        step of every lane is a real transition (`metarl_jax.rollout`), except for
        tasks whose lanes idle after the end, where this is the budget."""
        c = self.config
        return c.meta_batch_size * c.episodes_per_task * c.horizon * (c.inner_steps + 1)


def check_algorithm(cls: type) -> type:
    """Raises TypeError naming what `cls` lacks of the contract; returns `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, MetaLearner)):
        raise TypeError(f"{cls!r}: an algorithm must subclass MetaLearner")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: set the class attribute `name` (the --algo name)")
    config_class = getattr(cls, "config_class", None)
    if not (dataclasses.is_dataclass(config_class) and isinstance(config_class, type)
            and issubclass(config_class, SamplingConfig)):
        raise TypeError(f"{cls.__name__}: `config_class` must be a dataclass extending "
                        "SamplingConfig")
    if not config_class.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}: `config_class` {config_class.__name__} must be "
                        "frozen (it is static under jit)")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"{cls.__name__}: implement {', '.join(missing)}")
    return cls


def registry(*classes: type) -> dict[str, type]:
    """`{name: class}` for `classes`, each checked against the contract."""
    table: dict[str, type] = {}
    for cls in classes:
        check_algorithm(cls)
        if cls.name in table:
            raise TypeError(f"{cls.__name__}: the name {cls.name!r} is taken by "
                            f"{table[cls.name].__name__}")
        table[cls.name] = cls
    return table
