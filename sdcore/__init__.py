"""sdcore: Stable Diffusion on fused CPU/CUDA kernels, with a plain-PyTorch reference path that every
fast result can be checked against."""
from . import ops, schedulers
from ._backend import BACKENDS, get_backend, set_backend, use_backend
from .step import StepCoefficients

from ._version import __version__

__all__ = ["ops", "schedulers", "BACKENDS", "get_backend", "set_backend", "use_backend", "StepCoefficients",
           "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "__version__"]


def __getattr__(name):
    # The pipelines import the models; `import sdcore` alone (ops, backends) stays light.
    if name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")
