"""Post-hoc OOD scorers: ``build(spec)`` returns a scorer, ``scorer(model, x)`` returns scores (N,).

Higher scores mean more in-distribution. A spec is a name (``"energy"``) or a mapping
(``{"name": "odin", "temperature": 1000}``). Adding a scorer = one file that registers a class
with ``@SCORERS.register(...)`` plus one import line here.
"""

from gradreg.scorers import (
    gaia,  # noqa: F401  (registers gaia_z, gaia_a)
    gradnorm,  # noqa: F401  (registers gradnorm, exgrad)
    logits,  # noqa: F401  (registers msp, maxlogit, energy)
    margin,  # noqa: F401  (registers margin)
    odin,  # noqa: F401  (registers odin)
    purview,  # noqa: F401  (registers purview)
)
from gradreg.scorers.base import OutputScorer, Scorer
from gradreg.scorers.registry import SCORERS

build = SCORERS.build
names = SCORERS.names

__all__ = ["SCORERS", "OutputScorer", "Scorer", "build", "names"]
