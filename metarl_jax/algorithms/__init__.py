"""One module per meta-learner; `ALGORITHMS` maps `--algo` names to their classes."""

from metarl_jax.algorithms.maml import MAML_VARIANTS, MAMLFamily
from metarl_jax.algorithms.memrl import MEMRL, MEMRLConfig
from metarl_jax.algorithms.promp import ProMP, ProMPConfig

ALGORITHMS = {ProMP.name: ProMP, **{variant.name: variant for variant in MAML_VARIANTS},
              MEMRL.name: MEMRL}

__all__ = ["ALGORITHMS", "MAMLFamily", "MEMRL", "MEMRLConfig", "ProMP", "ProMPConfig"]
