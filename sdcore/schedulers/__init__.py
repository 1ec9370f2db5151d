"""Schedulers: the math on the host in float64, each step's tensor work in the fused step op.

The classes read diffusers' scheduler_config.json keys and mirror its call signatures
(set_timesteps / timesteps / init_noise_sigma / scale_model_input / step), so code ports by changing the
import. ``step(..., guidance_scale=g)`` also takes the batched [uncond; cond] UNet output and folds
classifier-free guidance into the same pass.
"""
from __future__ import annotations

from .base import Scheduler, SchedulerOutput
from .coefficients import ddim, dpmpp_2m, euler, euler_ancestral
from .scheduler_ddim import DDIMScheduler
from .scheduler_dpm import DPMSolverMultistepScheduler
from .scheduler_lms import LMSDiscreteScheduler
from .scheduler_pndm import PNDMScheduler
from .scheduler_euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

# The names `sdcore generate --scheduler` takes: (class, config overrides).
NAMES = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lms": (LMSDiscreteScheduler, {}),
}


def from_name(name: str, config: dict | None = None) -> Scheduler:
    """A scheduler by its CLI name, on a model's scheduler config (diffusers keys)."""
    if name not in NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(NAMES)}")
    cls, overrides = NAMES[name]
    return cls.from_config({**(config or {}), **overrides})


def name_of(scheduler: Scheduler) -> str:
    """The CLI name of a scheduler instance (the first NAMES entry of its class whose overrides it has), or its
    class name for one NAMES doesn't list: what the ``Sampler`` setting of a saved image records."""
    for name, (cls, overrides) in NAMES.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__


__all__ = ["NAMES", "from_name", "name_of", "Scheduler", "SchedulerOutput", "DDIMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "ddim", "dpmpp_2m", "euler", "euler_ancestral"]
