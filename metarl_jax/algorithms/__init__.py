"""One module per meta-learner; `ALGORITHMS` maps `--algo` names to their classes."""

from metarl_jax.algorithms.gmps import GMPS, GMPSConfig
from metarl_jax.algorithms.maml import MAML_VARIANTS, MAMLFamily
from metarl_jax.algorithms.memrl import MEMRL, MEMRLConfig
from metarl_jax.algorithms.promp import ProMP, ProMPConfig

ALGORITHMS = {ProMP.name: ProMP, **{variant.name: variant for variant in MAML_VARIANTS},
              MEMRL.name: MEMRL, GMPS.name: GMPS}

__all__ = ["ALGORITHMS", "GMPS", "GMPSConfig", "MAMLFamily", "MEMRL", "MEMRLConfig", "ProMP", "ProMPConfig"]
