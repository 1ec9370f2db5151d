"""sdcore: Stable Diffusion on fused CPU/CUDA kernels, with a plain-PyTorch reference path that every
fast result can be checked against.

Every public subpackage and name loads on first use (``sdcore.models.UNet2DConditionModel`` works after a
bare ``import sdcore``), so ``import sdcore`` stays light and the ``sdcore`` command starts fast."""
import importlib

from ._backend import BACKENDS, get_backend, set_backend, use_backend

from ._version import __version__

# Subpackages and modules reachable as attributes of the package.
_SUBMODULES = ("ops", "schedulers", "models", "pipelines", "loading", "embedded", "reference", "validate",
               "validate_models", "profile", "outputs", "args", "cli")
# Modules that moved, still reachable under their old names (``from sdcore import single_file``).
_MOVED = {"single_file": "loading.single_file"}
# Names re-exported from a submodule: name -> module.
_NAMES = {"StepCoefficients": "step", "StableDiffusionPipeline": "pipelines",
          "StableDiffusionImg2ImgPipeline": "pipelines", "StableDiffusionXLPipeline": "pipelines",
          "StableDiffusionXLImg2ImgPipeline": "pipelines", "NonFiniteError": "pipelines",
          "StopDenoising": "pipelines"}

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "__version__", *_SUBMODULES, *_MOVED, *_NAMES]


def __getattr__(name):
    if name in _SUBMODULES or name in _MOVED:
        return importlib.import_module(f".{_MOVED.get(name, name)}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
