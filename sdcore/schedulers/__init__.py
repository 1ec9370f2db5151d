"""Schedulers: the math on the host in float64, each step's tensor work in the fused step op.

The classes read diffusers' scheduler_config.json keys and mirror its call signatures
(set_timesteps / timesteps / init_noise_sigma / scale_model_input / step), so code ports by changing the
import. ``step(..., guidance_scale=g)`` also takes the batched [uncond; cond] UNet output and folds
classifier-free guidance into the same pass.
"""
from .base import Scheduler, SchedulerOutput
from .coefficients import ddim, dpmpp_2m, euler, euler_ancestral
from .scheduler_ddim import DDIMScheduler
from .scheduler_dpm import DPMSolverMultistepScheduler
from .scheduler_pndm import PNDMScheduler
from .scheduler_euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

__all__ = ["Scheduler", "SchedulerOutput", "DDIMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "ddim", "dpmpp_2m", "euler", "euler_ancestral"]
