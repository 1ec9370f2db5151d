"""DPM-Solver++(2M) (Lu et al. 2022), multistep, data prediction, as diffusers' DPMSolverMultistepScheduler
runs it with algorithm_type="dpmsolver++", solver_order=2 (optionally on Karras sigmas)."""
from __future__ import annotations

import torch

from . import coefficients
from .base import Scheduler


class DPMSolverMultistepScheduler(Scheduler):
    defaults = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, use_karras_sigmas=False, final_sigmas_type="zero",
                    lambda_min_clipped=-float("inf"), timestep_spacing="linspace", thresholding=False)
    order = 1

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        unsupported = [f"{k}={c[k]!r}" for k, ok in [
            ("algorithm_type", c["algorithm_type"] == "dpmsolver++"), ("solver_order", c["solver_order"] in (1, 2)),
            ("solver_type", c["solver_type"] == "midpoint"), ("final_sigmas_type", c["final_sigmas_type"] == "zero"),
            ("thresholding", not c["thresholding"]), ("lambda_min_clipped", c["lambda_min_clipped"] == -float("inf")),
        ] if not ok]
        if unsupported:
            raise NotImplementedError(f"DPMSolverMultistepScheduler supports DPM-Solver++ order 1/2 (midpoint, "
                                      f"final sigma 0) only; got {', '.join(unsupported)}")
        self._prev_x0 = None

    def spaced_timesteps(self, n: int) -> torch.Tensor:
        # DPM-Solver spaces n + 1 points and drops the last (t = 0) for linspace and leading.
        T, spacing = self.config["num_train_timesteps"], self.config["timestep_spacing"]
        if spacing == "linspace":
            return torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
        if spacing == "leading":
            ratio = T // (n + 1)
            return (torch.arange(n + 1, dtype=torch.float64) * ratio).round().flip(0)[:-1] + self.config["steps_offset"]
        return super().spaced_timesteps(n)

    def set_timesteps(self, num_inference_steps: int, device=None):
        full = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        if self.config["use_karras_sigmas"]:
            # Karras et al. 2022 eq. 5 (rho = 7) between the schedule's extreme sigmas, and the timestep of each.
            rho = 7.0
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
            hi, lo = full[-1].item() ** (1 / rho), full[0].item() ** (1 / rho)
            sigmas = (hi + ramp * (lo - hi)) ** rho
            timesteps = _sigma_to_t(sigmas, full.log()).round()
        else:
            timesteps = self.spaced_timesteps(num_inference_steps)
            sigmas = self.sigmas_at(timesteps)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.timesteps = timesteps.long().to(device)
        self.num_inference_steps = len(timesteps)
        self._step_index = None
        self._prev_x0 = None

    def _noise_scales(self, timestep):
        sigma = self.sigmas[self._current(timestep)].item()  # x_t = alpha_t x0 + sigma_t noise, sigma = s_t / a_t
        alpha_t = (sigma**2 + 1) ** -0.5
        return alpha_t, sigma * alpha_t

    def _coefficients(self, index, **_):
        last = index == self.num_inference_steps - 1  # lands on sigma = 0: first order (the step is x0)
        second = self.config["solver_order"] == 2 and self._prev_x0 is not None and not last
        sigma, sigma_next = self.sigmas[index].item(), self.sigmas[index + 1].item()
        c = coefficients.dpmpp_2m(sigma, sigma_next, self.sigmas[index - 1].item() if second else None,
                                  prediction_type=self.config["prediction_type"], second_order=second)
        return c, ([self._prev_x0] if second else [])

    def _after_step(self, state):
        self._prev_x0 = state


def _sigma_to_t(sigmas: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = sigmas.clamp_min(1e-10).log()
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = (dists >= 0).long().cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)
