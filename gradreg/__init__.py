"""gradreg: gradient-regularized out-of-distribution training and gradient-based OOD scoring."""

__version__ = "0.1.0"
