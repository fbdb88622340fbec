"""GMPS's expert data: demonstrations, their file, and the buffers GMPS trains on.

`collect_demonstrations` rolls each expert out on its own task and keeps the real
(unmasked) steps; `expert_actions` labels states with the experts' mean actions (for
DAgger). `save_demonstrations` / `load_demonstrations` write and read them as an `.npz`
archive (numpy only; loaded with `allow_pickle=False`, so loading never runs code);
every problem with a file is a one-line ConfigError naming the file and the field.
`DemonstrationBuffer` and `DaggerRing` hold them in GMPS's training state.

File format (version 1); T tasks, D steps per task (the largest count, see `counts`):

    format_version       int, 0-d           1 (optional on load; any other value is refused)
    env                  str, 0-d           environment name, e.g. "point-nav"
    backend              str, 0-d           optional: the Brax backend the experts ran on;
                                            a Brax task on another backend refuses the file
    observations         float32 [T, D, O]  states visited by expert i on task i
    actions              float32 [T, D, A]  the expert's action label at those states, in
                                            the policy's raw action space (before any env
                                            scaling), clipped to the environment's raw
                                            action bound (`TaskEnv.raw_action_bound`)
    counts               int64 [T]          real steps of task i, 1 <= counts[i] <= D; rows
                                            counts[i]..D-1 repeat the last real step
    task.<leaf>          [T, ...]           each leaf of the task pytree, e.g. `task.goal`
                                            [T, 2] (point-nav), `task.direction` [T]
    expert.<path>        [T, ...]           optional: the experts' policy parameters, one
                                            array per leaf of `GaussianPolicy.init`'s pytree,
                                            e.g. `expert.params.Dense_0.kernel` [T, O, 64]
    expert_hidden_sizes  int64 [L]          with expert.*: the experts' hidden widths
    expert_activation    str, 0-d           with expert.*: "tanh" or "relu" (default tanh)
    expert_env_steps     int64, 0-d         environment steps spent on the experts
                                            (training and demonstration rollouts)

Nested pytree keys are joined with "." (`task.a.b`). Unknown top-level keys are ignored;
unknown `task.*` or `expert.*` keys are errors. Padding rows repeat real steps, so a reader
that ignores `counts` over-weights the last step of a short task but never sees garbage.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metarl_jax.config import ConfigError
from metarl_jax.envs.base import TaskEnv
from metarl_jax.policies import ACTIVATIONS, GaussianPolicy
from metarl_jax.rollout import collect

FORMAT_VERSION = 1
# log σ used for deterministic (mean-action) rollouts: exp(-30) ≈ 1e-13.
_DETERMINISTIC_LOG_STD = -30.0


# --- collection and labelling --------------------------------------------------------------


class DemonstrationBatch(NamedTuple):
    observations: np.ndarray  # float32 [T, D, obs]
    actions: np.ndarray  # float32 [T, D, act]
    counts: np.ndarray  # int64 [T]
    returns: np.ndarray  # float32 [T], mean undiscounted episode return per task
    env_steps: int  # T · episodes_per_task · horizon


def _replace_log_std(params, value: float):
    def replace(path, leaf):
        name = getattr(path[-1], "key", None)
        return jnp.full_like(leaf, value) if name == "log_std" else leaf

    return jax.tree_util.tree_map_with_path(replace, params)


def collect_demonstrations(env: TaskEnv, policy: GaussianPolicy, expert_params, tasks,
                           key: jax.Array, episodes_per_task: int, horizon: int,
                           deterministic: bool = False) -> DemonstrationBatch:
    """Rolls expert i out on task i and keeps the real (unmasked) steps.

    The states are those visited by the expert acting *stochastically* (its Gaussian),
    or with its mean action when `deterministic`. The action label recorded at every
    state is the expert's *mean* action there (deterministic, noise-free: what GMPS's
    outer loss ||μ_θ'(s) − a*||² regresses on), in the policy's raw action space,
    clipped to the environment's raw action bound: beyond it the environment clips, so
    a larger label would only ask the meta-policy for an action that acts the same.

    Episodes are concatenated per task in order, masked steps removed; tasks with fewer
    real steps than the longest are padded by repeating their last real step, and
    `counts` holds the real steps per task.
    """
    params = _replace_log_std(expert_params, _DETERMINISTIC_LOG_STD) if deterministic \
        else expert_params
    batch = jax.jit(collect, static_argnums=(0, 1, 5, 6))(
        env, policy, params, tasks, key, episodes_per_task, horizon)
    observations = np.asarray(batch.observations, np.float32)
    means = np.asarray(clip_to_action_bound(batch.means, env.raw_action_bound()), np.float32)
    masks = np.asarray(batch.masks)
    num_tasks = masks.shape[0]
    flat_masks = masks.reshape(num_tasks, -1) > 0
    counts = flat_masks.sum(axis=1).astype(np.int64)
    size = int(counts.max())
    obs_out = np.empty((num_tasks, size, observations.shape[-1]), np.float32)
    act_out = np.empty((num_tasks, size, means.shape[-1]), np.float32)
    for task in range(num_tasks):
        real = np.flatnonzero(flat_masks[task])
        real = np.concatenate([real, np.full(size - real.size, real[-1])])
        obs_out[task] = observations[task].reshape(-1, observations.shape[-1])[real]
        act_out[task] = means[task].reshape(-1, means.shape[-1])[real]
    returns = np.asarray(batch.mean_episode_return(axis=1), np.float32)
    return DemonstrationBatch(obs_out, act_out, counts, returns,
                              num_tasks * episodes_per_task * horizon)


def clip_to_action_bound(actions, bound: float | None):
    """`actions` clipped to [-bound, bound] per coordinate; unchanged when bound is None
    (an environment that does not clip, `TaskEnv.raw_action_bound`)."""
    return actions if bound is None else jnp.clip(actions, -bound, bound)


def expert_actions(policy: GaussianPolicy, expert_params, task_indices, observations,
                   action_bound: float | None = None):
    """The experts' mean actions, for DAgger labelling.

    Args:
      expert_params: stacked experts, leading axis T.
      task_indices: int [B], which expert labels each row.
      observations: [B, ..., obs].
      action_bound: the environment's raw action bound; the labels are clipped to it.
    Returns:
      [B, ..., act]: μ_{expert task_indices[b]}(observations[b]), clipped.
    """
    selected = jax.tree.map(lambda leaf: leaf[jnp.asarray(task_indices)], expert_params)
    means = jax.vmap(lambda p, o: policy.distribution(p, o)[0])(selected, observations)
    return clip_to_action_bound(means, action_bound)


# --- the file format ----------------------------------------------------------------------


@dataclasses.dataclass
class Demonstrations:
    """A loaded demonstrations file (numpy arrays; see the module docstring)."""

    env_name: str
    observations: np.ndarray  # float32 [T, D, obs]
    actions: np.ndarray  # float32 [T, D, act]
    counts: np.ndarray  # int64 [T]
    tasks: Any  # task pytree, leaves [T, ...]
    expert_params: Any | None  # GaussianPolicy params, leaves [T, ...], or None
    hidden_sizes: tuple[int, ...] | None
    activation: str = "tanh"
    expert_env_steps: int = 0

    @property
    def num_tasks(self) -> int:
        return int(self.counts.shape[0])

    def masks(self) -> np.ndarray:
        """float32 [T, D]: 1 on real steps, 0 on padding."""
        steps = np.arange(self.observations.shape[1])
        return (steps[None, :] < self.counts[:, None]).astype(np.float32)

    def expert_policy(self, env: TaskEnv) -> GaussianPolicy | None:
        if self.hidden_sizes is None:
            return None
        return GaussianPolicy(env.observation_size, env.action_size, self.hidden_sizes,
                              self.activation)


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {f"{prefix}.{_path_name(path)}": np.asarray(leaf) for path, leaf in leaves}


def save_demonstrations(path, env_name: str, tasks, observations, actions, counts,
                        expert_params=None, hidden_sizes: Sequence[int] | None = None,
                        expert_env_steps: int = 0, activation: str = "tanh",
                        backend: str | None = None) -> str:
    """Writes the demonstrations file (format in the module docstring) to exactly `path`
    (no ".npz" is appended), atomically; `backend` (a Brax task's physics) is recorded
    when given. Returns the path."""
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION, np.int64),
        "env": np.asarray(str(env_name)),
        "observations": np.asarray(observations, np.float32),
        "actions": np.asarray(actions, np.float32),
        "counts": np.asarray(counts, np.int64),
        "expert_env_steps": np.asarray(int(expert_env_steps), np.int64),
        **_flatten("task", tasks),
    }
    if backend is not None:
        arrays["backend"] = np.asarray(str(backend))
    if expert_params is not None:
        if hidden_sizes is None:
            raise ValueError("save_demonstrations: expert_params needs hidden_sizes")
        arrays.update(_flatten("expert", expert_params))
        arrays["expert_hidden_sizes"] = np.asarray(tuple(hidden_sizes), np.int64)
        arrays["expert_activation"] = np.asarray(str(activation))
    _check_core(arrays, str(path))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        np.savez(f, **arrays)
    os.replace(temporary, path)
    return path


def _error(source: str, message: str) -> ConfigError:
    return ConfigError(f"demonstrations {source}: {message}")


def _read_arrays(path) -> dict[str, np.ndarray]:
    source = os.fspath(path)
    try:
        archive = np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise _error(source, "no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _error(source, f"not a valid .npz archive ({str(error).splitlines()[0]})"
                     ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _error(source, "not a valid .npz archive (a single .npy array)")
    arrays = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise _error(source, f"{name}: object arrays are not allowed (pickled "
                                         "data is never loaded)") from None
                raise _error(source, f"{name}: unreadable ({str(error).splitlines()[0]})"
                             ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as error:
                raise _error(source, f"{name}: unreadable ({str(error).splitlines()[0]})"
                             ) from None
    return arrays


def _numeric(arrays, name, source, kind="float") -> np.ndarray:
    value = arrays[name]
    if kind == "int":
        if not np.issubdtype(value.dtype, np.integer):
            raise _error(source, f"{name}: expected integers, got dtype {value.dtype}")
        return value
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise _error(source, f"{name}: expected numbers, got dtype {value.dtype}")
    if not np.all(np.isfinite(value)):
        raise _error(source, f"{name}: contains non-finite values")
    return value


def _string(arrays, name, source) -> str:
    value = arrays[name]
    if value.ndim != 0 or value.dtype.kind != "U":
        raise _error(source, f"{name}: expected a 0-d string array, got dtype {value.dtype} "
                             f"shape {list(value.shape)}")
    return str(value)


def _check_core(arrays: dict, source: str) -> None:
    """Checks that need no environment: keys, ranks, consistent T, counts, finiteness."""
    for name in ("env", "observations", "actions", "counts"):
        if name not in arrays:
            raise _error(source, f"missing {name!r}")
    if "format_version" in arrays:
        version = arrays["format_version"]
        if version.ndim != 0 or not np.issubdtype(version.dtype, np.integer) \
                or int(version) != FORMAT_VERSION:
            raise _error(source, f"format_version: {version!r} not supported; expected "
                                 f"{FORMAT_VERSION}")
    _string(arrays, "env", source)
    observations = _numeric(arrays, "observations", source)
    actions = _numeric(arrays, "actions", source)
    counts = _numeric(arrays, "counts", source, kind="int")
    for name, value, rank in (("observations", observations, 3), ("actions", actions, 3),
                              ("counts", counts, 1)):
        if value.ndim != rank:
            axes = "[T]" if rank == 1 else "[T, D, size]"
            raise _error(source, f"{name}: expected rank {rank} {axes}, got shape "
                                 f"{list(value.shape)}")
    num_tasks, steps = observations.shape[:2]
    if num_tasks < 1 or steps < 1:
        raise _error(source, f"observations: empty, shape {list(observations.shape)}")
    for name in ("actions", "counts"):
        if arrays[name].shape[0] != num_tasks:
            raise _error(source, f"{name}: {arrays[name].shape[0]} tasks but observations has "
                                 f"{num_tasks} (T must agree)")
    if actions.shape[1] != steps:
        raise _error(source, f"actions: {actions.shape[1]} steps per task but observations "
                             f"has {steps} (D must agree)")
    if np.any(counts < 1) or np.any(counts > steps):
        raise _error(source, f"counts: out of range; expected 1 <= counts <= D = {steps}, "
                             f"got min {int(counts.min())} max {int(counts.max())}")
    for name, value in arrays.items():
        if name.startswith(("task.", "expert.")):
            _numeric(arrays, name, source)
            if value.ndim < 1 or value.shape[0] != num_tasks:
                raise _error(source, f"{name}: leading axis must be T = {num_tasks}, got shape "
                                     f"{list(value.shape)}")
    if "expert_env_steps" in arrays:
        value = _numeric(arrays, "expert_env_steps", source, kind="int")
        if value.ndim != 0 or int(value) < 0:
            raise _error(source, "expert_env_steps: expected a 0-d integer >= 0")


def _unflatten(arrays, prefix: str, template, num_tasks: int, source: str):
    """Rebuilds `template`'s pytree from `prefix.<path>` arrays, checking shapes [T, ...]."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {f"{prefix}.{_path_name(path)}": leaf for path, leaf in leaves}
    for name in sorted(expected):
        if name not in arrays:
            raise _error(source, f"missing {name!r}")
        shape = (num_tasks,) + tuple(expected[name].shape)
        if arrays[name].shape != shape:
            raise _error(source, f"{name}: expected shape {list(shape)}, got "
                                 f"{list(arrays[name].shape)}")
    unknown = sorted(n for n in arrays if n.startswith(prefix + ".") and n not in expected)
    if unknown:
        raise _error(source, f"{unknown[0]}: unknown {prefix} leaf; expected "
                             + ", ".join(sorted(expected)))
    return jax.tree_util.tree_unflatten(treedef, [
        arrays[name].astype(expected[name].dtype)
        for name in (f"{prefix}.{_path_name(path)}" for path, _ in leaves)])


def load_demonstrations(path, env: TaskEnv) -> Demonstrations:
    """Reads and validates a demonstrations file for `env`.

    Raises ConfigError ("demonstrations PATH: FIELD: ...", one line) when the file is not
    an .npz archive, holds pickled objects, lacks a key, was written for another
    environment or (where it records one) another Brax backend, has wrong ranks or
    sizes, inconsistent T, task leaves not matching `env.sample_tasks`, counts out of
    range, or non-finite values. Never unpickles.
    """
    source = os.fspath(path)
    arrays = _read_arrays(path)
    _check_core(arrays, source)
    env_name = _string(arrays, "env", source)
    accepted = (env.name, *env.demonstration_sources)
    if env_name not in accepted:
        raise _error(source, f"env: written for {env_name!r}; {env.name} accepts "
                             f"demonstrations of {', '.join(repr(n) for n in accepted)}")
    if "backend" in arrays and getattr(env, "backend", None) is not None:
        recorded = _string(arrays, "backend", source)
        if recorded != env.backend:
            raise _error(source, f"backend: the experts ran on {recorded!r}, this run's "
                                 f"env.backend is {env.backend!r}; set env.backend="
                                 f"{recorded} or collect the demonstrations on "
                                 f"{env.backend}")
    observations = arrays["observations"].astype(np.float32)
    actions = arrays["actions"].astype(np.float32)
    counts = arrays["counts"].astype(np.int64)
    num_tasks = observations.shape[0]
    if observations.shape[2] != env.observation_size:
        raise _error(source, f"observations: size {observations.shape[2]} but {env.name} "
                             f"observations have {env.observation_size}")
    if actions.shape[2] != env.action_size:
        raise _error(source, f"actions: size {actions.shape[2]} but {env.name} actions have "
                             f"{env.action_size}")
    task_template = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
        jax.eval_shape(lambda key: env.sample_tasks(key, 1), jax.random.PRNGKey(0)))
    tasks = _unflatten(arrays, "task", task_template, num_tasks, source)

    expert_params, hidden_sizes, activation = None, None, "tanh"
    has_experts = any(name.startswith("expert.") for name in arrays)
    if has_experts or "expert_hidden_sizes" in arrays:
        if "expert_hidden_sizes" not in arrays:
            raise _error(source, "missing 'expert_hidden_sizes' (needed with expert.* arrays)")
        sizes = _numeric(arrays, "expert_hidden_sizes", source, kind="int")
        if sizes.ndim != 1 or sizes.size < 1 or np.any(sizes < 1):
            raise _error(source, "expert_hidden_sizes: expected a non-empty list of widths "
                                 f">= 1, got {sizes.tolist()}")
        hidden_sizes = tuple(int(w) for w in sizes)
        if "expert_activation" in arrays:
            activation = _string(arrays, "expert_activation", source)
            if activation not in ACTIVATIONS:
                raise _error(source, f"expert_activation: {activation!r} not allowed; "
                                     f"expected one of {', '.join(ACTIVATIONS)}")
        policy = GaussianPolicy(env.observation_size, env.action_size, hidden_sizes,
                                activation)
        template = jax.eval_shape(policy.init, jax.random.PRNGKey(0))
        expert_params = _unflatten(arrays, "expert", template, num_tasks, source)
    steps = int(arrays["expert_env_steps"]) if "expert_env_steps" in arrays else 0
    return Demonstrations(env_name=env_name, observations=observations, actions=actions,
                          counts=counts, tasks=tasks, expert_params=expert_params,
                          hidden_sizes=hidden_sizes, activation=activation,
                          expert_env_steps=steps)


# --- the buffers in GMPS's training state ---------------------------------------------------


@flax.struct.dataclass
class DemonstrationBuffer:
    """Labelled states of every task, padded to a fixed size: the imitation targets.

    Leaves have a leading task axis T; `counts[i]` entries of task i are real, the rest
    padding.
    """

    observations: jax.Array  # [T, D, obs]
    actions: jax.Array  # [T, D, act], the experts' (clipped) action labels
    counts: jax.Array  # int32 [T], real entries

    @classmethod
    def empty(cls, num_tasks: int, size: int, observation_size: int, action_size: int):
        return cls(observations=jnp.zeros((num_tasks, size, observation_size)),
                   actions=jnp.zeros((num_tasks, size, action_size)),
                   counts=jnp.zeros((num_tasks,), jnp.int32))

    @classmethod
    def from_demonstrations(cls, demos: Demonstrations, size: int,
                            action_bound: float | None) -> DemonstrationBuffer:
        """`demos` padded to `size` >= its D steps per task, with its labels clipped to
        `action_bound` (files may hold labels written without clipping)."""
        pad = size - demos.observations.shape[1]
        observations = np.pad(demos.observations, ((0, 0), (0, pad), (0, 0)))
        actions = demos.actions
        if action_bound is not None:
            actions = np.clip(actions, -action_bound, action_bound)
        actions = np.pad(actions, ((0, 0), (0, pad), (0, 0)))
        return cls(observations=jnp.asarray(observations, jnp.float32),
                   actions=jnp.asarray(actions, jnp.float32),
                   counts=jnp.asarray(np.asarray(demos.counts), jnp.int32))

    def take(self, task_ids) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(observations, labels, 0/1 weights [len(task_ids), D]) of tasks `task_ids`."""
        size = self.observations.shape[1]
        weights = (jnp.arange(size)[None, :] < self.counts[task_ids][:, None])
        return (self.observations[task_ids], self.actions[task_ids],
                weights.astype(jnp.float32))


@flax.struct.dataclass
class DaggerRing(DemonstrationBuffer):
    """A bounded ring of labelled states per task (DAgger's aggregated data): once full,
    new entries overwrite the oldest."""

    next_slot: jax.Array  # int32 [T], where the next entry goes

    @classmethod
    def empty(cls, num_tasks: int, size: int, observation_size: int, action_size: int):
        buffer = DemonstrationBuffer.empty(num_tasks, size, observation_size, action_size)
        return cls(observations=buffer.observations, actions=buffer.actions,
                   counts=buffer.counts, next_slot=jnp.zeros((num_tasks,), jnp.int32))

    def append(self, task_ids, observations, actions, masks) -> DaggerRing:
        """The masked-in rows of `observations`, `actions` ([len(task_ids), K, ...], masks
        [len(task_ids), K]) appended to the rings of tasks `task_ids` (distinct)."""
        selected = jax.tree.map(lambda leaf: leaf[task_ids], self)
        updated = jax.vmap(append_to_ring)(selected, observations, actions, masks)
        return jax.tree.map(lambda full, part: full.at[task_ids].set(part), self, updated)


def append_to_ring(ring: DaggerRing, observations, actions, masks) -> DaggerRing:
    """Appends the masked-in rows of `observations`, `actions` ([K, ...], masks [K]) to
    ONE task's ring (leaves [B, ...], `counts` and `next_slot` scalars); once full, the
    oldest entries are overwritten. When more than B rows come at once, the last B of
    them are kept (every slot is written at most once, so the result never depends on
    the order of a scatter)."""
    capacity = ring.observations.shape[0]
    real = masks > 0
    offsets = jnp.cumsum(real.astype(jnp.int32)) - 1
    added = jnp.sum(real).astype(jnp.int32)
    kept = real & (offsets >= added - capacity)
    slots = jnp.where(kept, (ring.next_slot + offsets) % capacity, capacity)  # else dropped
    return DaggerRing(observations=ring.observations.at[slots].set(observations, mode="drop"),
                      actions=ring.actions.at[slots].set(actions, mode="drop"),
                      counts=jnp.minimum(ring.counts + added, capacity),
                      next_slot=(ring.next_slot + added) % capacity)
