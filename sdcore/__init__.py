"""sdcore: Stable Diffusion on fused CPU/CUDA kernels, with a plain-PyTorch reference path that every
fast result can be checked against."""
from . import ops
from ._backend import BACKENDS, get_backend, set_backend, use_backend
from .step import StepCoefficients

__version__ = "0.1.0"

__all__ = ["ops", "BACKENDS", "get_backend", "set_backend", "use_backend", "StepCoefficients", "__version__"]
