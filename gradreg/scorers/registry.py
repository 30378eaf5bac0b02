"""The scorer registry (kept apart from ``__init__`` so scorer files can import it without cycles)."""

from gradreg.registry import Registry
from gradreg.scorers.base import Scorer

SCORERS: Registry[Scorer] = Registry("scorer")
