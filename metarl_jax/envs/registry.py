"""One registry of task distributions, and the lookup every entry point goes through.

A built-in task distribution joins the registry by decorating its class:

    @register_task("point-nav")
    class PointNav(TaskEnv):
        observation_size = 2
        action_size = 2
        horizon = 100
        task_distribution = "goal ~ U[-0.5, 0.5]^2; ..."
        ...

Every module of `metarl_jax.envs` is imported with the package, so defining the class is
the only step. The class declares its sizes, horizon and one-line description itself, so
`metarl envs` lists every task without building a single Brax model (a Brax task checks
its declared sizes against the model when it is built).

`lookup(name)` resolves a registered name or an import path `module:attribute` naming a
task distribution of one's own (`metarl_jax.envs.custom`); `make_env` builds either.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from metarl_jax.config import BRAX_BACKENDS, ConfigError
from metarl_jax.envs.base import TaskEnv, describe

ENVIRONMENTS: dict[str, type[TaskEnv]] = {}

# What every registered class declares as a class attribute (checked at registration).
STATIC_ATTRIBUTES = (("observation_size", int), ("action_size", int), ("horizon", int),
                     ("task_distribution", str))


def register_task(name: str) -> Callable[[type[TaskEnv]], type[TaskEnv]]:
    """Class decorator: registers a TaskEnv subclass under `name` and sets its `name`."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, TaskEnv)):
            raise TypeError(f"register_task({name!r}): {cls!r} is not a TaskEnv subclass")
        if ":" in name:
            raise ValueError(f"register_task({name!r}): a name holding ':' reads as an "
                             "import path; choose another")
        existing = ENVIRONMENTS.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (
                cls.__module__, cls.__qualname__):  # (a reloaded module re-registers)
            raise ValueError(f"register_task({name!r}): already registered by "
                             f"{existing.__module__}.{existing.__qualname__}")
        for attribute, kind in STATIC_ATTRIBUTES:
            value = getattr(cls, attribute, None)  # declared here or inherited
            if not isinstance(value, kind) or isinstance(value, bool):
                raise TypeError(f"register_task({name!r}): {cls.__qualname__} must declare "
                                f"{attribute} ({kind.__name__}) as a class attribute, so "
                                "that the task is listed without being built")
        cls.name = name
        ENVIRONMENTS[name] = cls
        return cls

    return decorate


def env_names() -> list[str]:
    return sorted(ENVIRONMENTS)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What `lookup` finds: enough to fill a configuration's defaults and build the env.

    Attributes:
      name: the registered name or the import path, as given.
      horizon: the default episode length (the task's published setting's).
      backend: the Brax backend used when `env.backend` names none (a pure-JAX task
        ignores it).
      build: builds the task distribution; options `backend` and `horizon` (None: the
        default), each passed on only where the constructor takes it.
      registered: False for a task given by import path.
      physics: True for a task simulated by a physics backend (`uses_physics`), False
        for a pure-JAX task.
    """

    name: str
    horizon: int
    backend: str
    build: Callable[..., TaskEnv]
    registered: bool
    physics: bool


def unknown_environment(name) -> ConfigError:
    return ConfigError(f"config: env.name: unknown environment {name!r}; allowed: "
                       f"{', '.join(env_names())}, or module:attribute naming a task "
                       "distribution of your own")


def lookup(name) -> TaskSpec:
    """Resolves `name`: a registered task or `module:attribute` (a TaskEnv subclass or a
    function returning a TaskEnv). A user's definition is imported, built with its
    default options and checked (`metarl_jax.envs.custom.validate`) without compiling.

    Raises ConfigError, one line naming what is wrong.
    """
    if isinstance(name, str) and name in ENVIRONMENTS:
        cls = ENVIRONMENTS[name]
        return TaskSpec(name=name, horizon=cls.horizon, backend=default_backend(cls),
                        build=lambda **options: construct(cls, options), registered=True,
                        physics=uses_physics(cls))
    if isinstance(name, str) and ":" in name:
        from metarl_jax.envs import custom

        factory = custom.load(name)
        default = custom.build(name, factory, {})
        return TaskSpec(name=name, horizon=default.horizon, backend=default_backend(default),
                        build=lambda **options: custom.build(name, factory, options),
                        registered=False, physics=uses_physics(default))
    raise unknown_environment(name)


def default_backend(env: TaskEnv | type[TaskEnv]) -> str:
    """The backend a task runs on when none is named: the one a task built with its
    default options runs on, else its class's `default_backend`, else the first of
    BRAX_BACKENDS (pure-JAX tasks ignore it)."""
    return (getattr(env, "backend", None) or getattr(env, "default_backend", None)
            or BRAX_BACKENDS[0])


def uses_physics(env: TaskEnv | type[TaskEnv]) -> bool:
    """Whether a task (built, or its class) runs on a physics backend: it says so in a
    `physics` attribute, else it names the backend it runs on, or its class a default
    one."""
    declared = getattr(env, "physics", None)
    if isinstance(declared, bool):
        return declared
    return (getattr(env, "backend", None) is not None
            or getattr(env, "default_backend", None) is not None)


def construct(factory: Callable[..., TaskEnv], options: dict) -> TaskEnv:
    """Calls `factory` with `options`, passing `backend` and `horizon` only where it takes
    them (pure-JAX tasks have no backend) and dropping a `horizon` of None. A horizon the
    factory does not take is set on the built environment."""
    options = dict(options)
    horizon = options.pop("horizon", None)
    backend = options.pop("backend", None)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read: pass everything
        parameters = None

    def takes(option):
        return parameters is None or option in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    if backend is not None and takes("backend"):
        options["backend"] = backend
    if horizon is not None and takes("horizon"):
        options["horizon"] = horizon
    env = factory(**options)
    if horizon is not None and "horizon" not in options and isinstance(env, TaskEnv):
        env.horizon = horizon
    return env


def make_env(name: str, **options) -> TaskEnv:
    """Builds the task distribution `name` (registered, or `module:attribute`).

    Options: `backend` (Brax tasks: one of BRAX_BACKENDS, by default the task's
    `default_backend`; ignored by pure-JAX tasks) and `horizon` (defaults to the
    published setting's).
    """
    if isinstance(name, str) and ":" in name and name not in ENVIRONMENTS:
        from metarl_jax.envs import custom

        return custom.build(name, custom.load(name), options)  # built and checked once
    return lookup(name).build(**options)


def describe_envs() -> list[dict]:
    """One row per registered task (name, sizes, horizon, body, default backend, tasks),
    read from the classes' declarations: no model is built."""
    return [describe(ENVIRONMENTS[name]) for name in env_names()]
