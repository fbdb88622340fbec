"""One module per meta-learner; `ALGORITHMS` maps `--algo` names to their classes.

Every class here is checked against the contract in `metarl_jax.algorithms.base` when
the package is imported.
"""

from metarl_jax.algorithms.base import MetaLearner, MetaState, registry
from metarl_jax.algorithms.gmps import GMPS, GMPSConfig
from metarl_jax.algorithms.maml import MAML_VARIANTS, MAMLFamily
from metarl_jax.algorithms.memrl import MEMRL, MEMRLConfig
from metarl_jax.algorithms.promp import ProMP, ProMPConfig

ALGORITHMS = registry(ProMP, *MAML_VARIANTS, MEMRL, GMPS)

__all__ = ["ALGORITHMS", "GMPS", "GMPSConfig", "MAMLFamily", "MEMRL", "MEMRLConfig",
           "MetaLearner", "MetaState", "ProMP", "ProMPConfig"]
