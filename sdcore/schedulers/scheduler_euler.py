"""Euler and Euler-ancestral samplers on k-diffusion sigmas (Karras et al. 2022), as diffusers runs them."""
from __future__ import annotations

import torch

from . import coefficients
from .base import Scheduler


class EulerDiscreteScheduler(Scheduler):
    defaults = dict(interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="linspace")
    _ancestral = False
    round_linspace = False

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["use_karras_sigmas"] or self.config["interpolation_type"] != "linear":
            raise NotImplementedError(f"{type(self).__name__}: only linear sigma interpolation is supported yet")

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.num_inference_steps = num_inference_steps
        timesteps = self.spaced_timesteps(num_inference_steps)
        sigmas = self.sigmas_at(timesteps)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.timesteps = timesteps.float().to(device)
        self._step_index = None

    @property
    def init_noise_sigma(self) -> float:
        top = self.sigmas.max().item()
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def scale_model_input(self, sample, timestep=None):
        sigma = self.sigmas[self._index_for(timestep)].item()
        return sample / (sigma**2 + 1) ** 0.5

    def _noise_scales(self, timestep):
        return 1.0, self.sigmas[self._current(timestep)].item()  # x_t = x0 + sigma * noise

    def _coefficients(self, index, s_churn: float = 0.0, **_):
        if s_churn != 0.0:
            raise NotImplementedError(f"{type(self).__name__}: s_churn (stochastic Euler) is not supported yet")
        fn = coefficients.euler_ancestral if self._ancestral else coefficients.euler
        c = fn(self.sigmas[index].item(), self.sigmas[index + 1].item(), prediction_type=self.config["prediction_type"])
        return c, []


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    _ancestral = True
