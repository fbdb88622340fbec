"""Task distributions and the `make_env` registry."""

from __future__ import annotations

from metarl_jax.envs.base import EnvState, TaskEnv, scale_locomotion_action
from metarl_jax.envs.locomotion import (BRAX_BACKENDS, AntDirection, AntDirection2D, AntGoal,
                                        AntGoalRing, AntGoalRingSparse, BraxTaskEnv,
                                        HalfCheetahDirection, HalfCheetahVelocity,
                                        HopperParameters, HumanoidDirection,
                                        HumanoidDirection2D, PhysicsParameters,
                                        WalkerDirection, WalkerParameters, WalkerVelocity)
from metarl_jax.envs.point_nav import PointNav

ENVIRONMENTS: dict[str, type[TaskEnv]] = {
    cls.name: cls
    for cls in (PointNav, HalfCheetahDirection, HalfCheetahVelocity, AntDirection,
                AntDirection2D, AntGoal, AntGoalRing, AntGoalRingSparse, WalkerDirection,
                WalkerVelocity, HopperParameters, WalkerParameters, HumanoidDirection,
                HumanoidDirection2D)
}


def env_names() -> list[str]:
    return sorted(ENVIRONMENTS)


def make_env(name: str, **options) -> TaskEnv:
    """Builds the task distribution `name`.

    Options: `backend` (Brax tasks: one of BRAX_BACKENDS; ignored by pure-JAX tasks) and
    `horizon` (defaults to the published setting's).
    """
    if name not in ENVIRONMENTS:
        raise ValueError(f"env.name: unknown environment {name!r}; allowed: "
                         f"{', '.join(env_names())}")
    cls = ENVIRONMENTS[name]
    if not issubclass(cls, BraxTaskEnv):
        options.pop("backend", None)
    if options.get("horizon") is None:
        options.pop("horizon", None)
    return cls(**options)


__all__ = ["EnvState", "TaskEnv", "make_env", "env_names", "ENVIRONMENTS", "BRAX_BACKENDS",
           "BraxTaskEnv", "PhysicsParameters", "scale_locomotion_action"]
