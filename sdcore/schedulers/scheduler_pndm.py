"""PLMS — the pseudo linear multistep method of PNDM (Liu et al. 2022) with the Runge-Kutta warm-up skipped,
as Stable Diffusion 1.x ships it (diffusers' PNDMScheduler with skip_prk_steps=True)."""
from __future__ import annotations

import math

import torch

from ..step import StepCoefficients
from .base import Scheduler

# Adams-Bashforth weights on (current, previous, ...) model outputs, by how many are available.
_PLMS_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMScheduler(Scheduler):
    defaults = dict(skip_prk_steps=False, set_alpha_to_one=False)
    state_is_x0 = False

    def __init__(self, **config):
        super().__init__(**config)
        if not self.config["skip_prk_steps"]:
            raise NotImplementedError("PNDMScheduler: only PLMS (skip_prk_steps=True, SD's setting) is supported")
        if self.config["prediction_type"] == "sample":
            raise ValueError("PNDMScheduler supports prediction_type epsilon or v_prediction")
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else self.alphas_cumprod[0].item()

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.num_inference_steps = num_inference_steps
        ts = self.spaced_timesteps(num_inference_steps).flip(0)  # ascending
        # The second-to-last training timestep is visited twice: PLMS's first step is a Heun-like pair.
        plms = torch.cat([ts[:-1], ts[-2:-1], ts[-1:]]).flip(0)
        self.timesteps = plms.long().to(device)
        self._step_index = None
        self._outputs = []  # previous (guided) model outputs, newest last
        self._first_sample = None
        # Steps taken, not the position in timesteps: PLMS's warm-up pair is the first two steps taken, also
        # when img2img starts part-way down the schedule (as in diffusers).
        self._taken = 0

    def _alphas(self, t: int, prev_t: int) -> tuple[float, float]:
        a_t = self.alphas_cumprod[t].item()
        a_prev = self.alphas_cumprod[prev_t].item() if prev_t >= 0 else self.final_alpha_cumprod
        return a_t, a_prev

    def _update(self, t: int, prev_t: int) -> tuple[float, float]:
        """(A, B) with x_prev = A * x + B * eps_combined (PNDM's formula 9; v-prediction converted)."""
        a_t, a_prev = self._alphas(t, prev_t)
        sample_coeff = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
        k = -(a_prev - a_t) / denom
        if self.config["prediction_type"] == "v_prediction":  # eps = sqrt(a_t) v + sqrt(1 - a_t) x
            return sample_coeff + k * math.sqrt(1 - a_t), k * math.sqrt(a_t)
        return sample_coeff, k

    def _coefficients(self, index, **_):
        ratio = self.config["num_train_timesteps"] // self.num_inference_steps
        t = int(self.timesteps[index])
        if self._taken == 1:
            # Second half of the first step: average the two outputs and restart from the first sample.
            a, b = self._update(t + ratio, t)
            return (StepCoefficients(next_from_output=b / 2, state_from_output=1.0, history=(b / 2, a)),
                    [self._outputs[-1], self._first_sample])
        a, b = self._update(t, t - ratio)
        previous = self._outputs[-3:]
        weights = _PLMS_WEIGHTS[len(previous) + 1]
        history = list(reversed(previous))  # newest first, matching weights[1:]
        c = StepCoefficients(next_from_sample=a, next_from_output=b * weights[0], state_from_output=1.0,
                             history=tuple(b * w for w in weights[1:]))
        return c, history

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.num_inference_steps is not None and self._taken == 0:
            self._first_sample = sample
        out = super().step(model_output, timestep, sample, *args, **kwargs)
        self._taken += 1
        return out

    def _after_step(self, state):
        if self._taken != 1:  # the averaged second half doesn't add an output
            self._outputs = self._outputs[-3:] + [state]
        else:
            self._first_sample = None
