"""One module per meta-learner; `ALGORITHMS` maps `--algo` names to their classes."""

from metarl_jax.algorithms.maml import MAML_VARIANTS, MAMLFamily
from metarl_jax.algorithms.promp import ProMP, ProMPConfig

ALGORITHMS = {ProMP.name: ProMP, **{variant.name: variant for variant in MAML_VARIANTS}}

__all__ = ["ALGORITHMS", "MAMLFamily", "ProMP", "ProMPConfig"]
