"""DDIM (Song et al. 2020)."""
from __future__ import annotations

import torch

from . import coefficients
from .base import Scheduler


class DDIMScheduler(Scheduler):
    defaults = dict(clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False)

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["thresholding"]:
            raise NotImplementedError("DDIMScheduler: dynamic thresholding is not supported")
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self.alphas_cumprod[0].item()

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.num_inference_steps = num_inference_steps
        self.timesteps = self.spaced_timesteps(num_inference_steps).long().to(device)
        self._step_index = None

    def _coefficients(self, index, eta: float = 0.0, use_clipped_model_output: bool = False, **_):
        t = int(self.timesteps[index])
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_prev = self.alphas_cumprod[prev_t].item() if prev_t >= 0 else self.final_alpha_cumprod
        clip = self.config["clip_sample_range"] if self.config["clip_sample"] else None
        c = coefficients.ddim(self.alphas_cumprod[t].item(), a_prev, eta=eta,
                              prediction_type=self.config["prediction_type"], clip_sample_range=clip,
                              use_clipped_model_output=use_clipped_model_output)
        return c, []
