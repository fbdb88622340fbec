"""Task distributions of one's own, named by import path: `env.name: my_pkg.tasks:Tasks`.

The attribute is a TaskEnv subclass or a function returning a TaskEnv (called with the
options it takes: `backend`, `horizon`). Before anything is compiled, the definition is
imported, built and checked with `jax.eval_shape`, which traces `sample_tasks`, `reset`
and `step` without compiling them: each mistake gets a one-line ConfigError. See
docs/custom_tasks.md.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from metarl_jax.config import ConfigError
from metarl_jax.envs.base import EnvState, TaskEnv

# How many tasks the check draws: a number unlikely to equal a task's own dimensions, so
# a sampler that ignores `num_tasks` is caught.
CHECK_TASKS = 3
EPISODE_ENDS = ("reset", "idle")
METHODS = ("sample_tasks", "reset", "step")


def _error(path: str, message: str) -> ConfigError:
    return ConfigError(f"config: env.name: {path}: {message}")


def _kind(value) -> str:
    """'an array of shape (3,)', 'a dict', 'an int': what a value is, for a message."""
    if isinstance(value, (jax.ShapeDtypeStruct, jax.Array)):
        return f"an array of shape {value.shape}"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Run as a console script, Python does not put the working directory on the path:
        # a module next to the user is found as `python -m` would find it.
        top = module_name.split(".")[0]
        if error.name != top or os.getcwd() in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)


def load(path: str) -> Callable[..., TaskEnv]:
    """The class or factory `path` (`module:attribute`) names."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise _error(path, "expected module:attribute, e.g. my_package.tasks:MyTasks")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as error:
        raise _error(path, f"module {module_name!r} is not importable ({_first_line(error)}); "
                           "expected a module on the Python path") from None
    except Exception as error:  # the module itself raised
        raise _error(path, f"importing {module_name!r} raised {_first_line(error)}") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _error(path, f"module {module_name!r} has no attribute {attribute!r}; "
                               "expected a TaskEnv subclass or a function returning one")
        target = getattr(target, part)
    if isinstance(target, type):
        if not issubclass(target, TaskEnv):
            raise _error(path, f"{target.__name__} is not a TaskEnv; expected a subclass of "
                               "metarl_jax.envs.TaskEnv or a function returning one")
        missing = [m for m in METHODS if m in getattr(target, "__abstractmethods__", ())]
        if missing:
            raise _error(path, f"{target.__name__} does not define {', '.join(missing)}; "
                               f"expected a TaskEnv defining {', '.join(METHODS)}")
    elif isinstance(target, TaskEnv):
        raise _error(path, "is a TaskEnv instance; expected its class or a function "
                           "returning one")
    elif not callable(target):
        raise _error(path, f"is {_kind(target)}; expected a TaskEnv subclass or a "
                           "function returning one")
    return target


def build(path: str, factory: Callable[..., TaskEnv], options: dict) -> TaskEnv:
    """Calls `factory` with the `options` it takes, then `validate`s the result."""
    from metarl_jax.envs.registry import construct

    try:
        env = construct(factory, options)
    except ConfigError:
        raise
    except Exception as error:
        raise _error(path, f"building it raised {_first_line(error)}") from None
    if not isinstance(env, TaskEnv):
        raise _error(path, f"returned {_kind(env)}, not a TaskEnv; expected a TaskEnv "
                           "instance")
    if not isinstance(getattr(env, "name", None), str):
        env.name = path
    validate(env, path)
    return env


def _shapes(tree) -> list:
    return [(jax.tree_util.keystr(key), leaf.shape, leaf.dtype)
            for key, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _check_state(path: str, method: str, state, env: TaskEnv) -> None:
    if not isinstance(state, EnvState):
        raise _error(path, f"{method} returns {_kind(state)}; expected an "
                           "EnvState(obs, reward, done, physics)")
    for field, shape, expected in (("obs", state.obs.shape, (env.observation_size,)),
                                   ("reward", state.reward.shape, ()),
                                   ("done", state.done.shape, ())):
        if shape != expected:
            what = " = (observation_size,)" if field == "obs" else " (a scalar)"
            raise _error(path, f"{method} returns {field} of shape {shape}; expected "
                               f"{expected}{what}")


def _trace(path: str, what: str, function, *args):
    try:
        return jax.eval_shape(function, *args)
    except ConfigError:
        raise
    except Exception as error:
        raise _error(path, f"{what} cannot be traced by jax.jit ({_first_line(error)}); "
                           "expected pure JAX code (jax.numpy, jax.random, no Python "
                           "branches on values)") from None


def validate(env: TaskEnv, path: str) -> None:
    """Checks `env` against the TaskEnv contract without compiling (jax.eval_shape)."""
    for attribute in ("observation_size", "action_size", "horizon"):
        value = getattr(env, attribute, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _error(path, f"{attribute} is {value!r}; expected an int >= 1")
    if env.episode_end not in EPISODE_ENDS:
        raise _error(path, f"episode_end is {env.episode_end!r}; allowed: "
                           f"{', '.join(EPISODE_ENDS)}")
    if not isinstance(env.can_terminate, bool):
        raise _error(path, f"can_terminate is {env.can_terminate!r}; expected True or False")

    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a jax.random.PRNGKey
    bad_leaves: list[str] = []

    def sample(key):
        tasks = env.sample_tasks(key, CHECK_TASKS)
        leaves = jax.tree_util.tree_leaves_with_path(tasks)
        bad_leaves.extend(f"{jax.tree_util.keystr(k) or 'the result'} is "
                          f"{_kind(leaf)}" for k, leaf in leaves
                          if not isinstance(leaf, jax.Array))
        return None if bad_leaves else tasks

    tasks = _trace(path, f"sample_tasks(key, {CHECK_TASKS})", sample, key)
    if bad_leaves:
        raise _error(path, f"sample_tasks returns a non-array leaf ({bad_leaves[0]}); "
                           "expected a pytree of jax arrays")
    if not jax.tree.leaves(tasks):
        raise _error(path, "sample_tasks returns no arrays; expected a pytree of jax "
                           "arrays with a leading axis of num_tasks")
    for name, shape, _ in _shapes(tasks):
        if shape[:1] != (CHECK_TASKS,):
            raise _error(path, f"sample_tasks(key, {CHECK_TASKS}) returns {name or 'a leaf'} "
                               f"of shape {shape}; expected a leading axis of "
                               f"{CHECK_TASKS} (one entry per task)")
    task = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), tasks)

    first = _trace(path, "reset(key, task)", env.reset, key, task)
    _check_state(path, "reset", first, env)
    action = jax.ShapeDtypeStruct((env.action_size,), jnp.float32)
    stepped = _trace(path, "step(state, action, task)", env.step, first, action, task)
    _check_state(path, "step", stepped, env)
    if (jax.tree.structure(first) != jax.tree.structure(stepped)
            or _shapes(first) != _shapes(stepped)):
        raise _error(path, "step returns a state whose pytree, shapes or dtypes differ from "
                           "reset's; expected the same (the rollout carries it through "
                           "lax.scan)")
