"""Task distributions: the registry, `make_env`, and every built-in task.

A built-in task registers itself (`@register_task("name")` on its class, see
metarl_jax.envs.registry); every module of this package is imported here, so a task
defined in a new module needs no other edit. A task of one's own, outside the package,
is named by import path (`module:attribute`, metarl_jax.envs.custom).
"""

from __future__ import annotations

import importlib
import pkgutil

from metarl_jax.config import BRAX_BACKENDS
from metarl_jax.envs.base import EnvState, TaskEnv, describe, scale_locomotion_action
from metarl_jax.envs.registry import (ENVIRONMENTS, TaskSpec, describe_envs, env_names, lookup,
                                      make_env, register_task)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from metarl_jax.envs.locomotion import BraxTaskEnv, PhysicsParameters  # noqa: E402

__all__ = ["EnvState", "TaskEnv", "TaskSpec", "make_env", "env_names", "lookup",
           "register_task", "describe", "describe_envs", "ENVIRONMENTS", "BRAX_BACKENDS",
           "BraxTaskEnv", "PhysicsParameters", "scale_locomotion_action"]
