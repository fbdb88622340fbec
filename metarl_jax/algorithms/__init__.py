"""One module per meta-learner; `ALGORITHMS` maps `--algo` names to their classes."""

from metarl_jax.algorithms.promp import ProMP, ProMPConfig

ALGORITHMS = {ProMP.name: ProMP}

__all__ = ["ALGORITHMS", "ProMP", "ProMPConfig"]
