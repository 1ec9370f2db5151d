"""Linear multistep (LMS) on k-diffusion sigmas (Karras et al. 2022), as diffusers' LMSDiscreteScheduler:
x_next = x + sum_i c_i d_i over the last `order` derivatives d = (x - x0) / sigma, with c_i the integral
of the Lagrange basis polynomial over [sigma, sigma_next]."""
from __future__ import annotations

import math

from ..step import StepCoefficients
from . import coefficients
from .scheduler_euler import EulerDiscreteScheduler

# 4-point Gauss-Legendre nodes/weights on [-1, 1]: exact for the cubic (or lower) Lagrange polynomials.
_GAUSS = [(-0.8611363115940526, 0.3478548451374538), (-0.3399810435848563, 0.6521451548625461),
          (0.3399810435848563, 0.6521451548625461), (0.8611363115940526, 0.3478548451374538)]


class LMSDiscreteScheduler(EulerDiscreteScheduler):
    state_is_x0 = False

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._derivatives = []  # newest last

    def _lms_coefficient(self, order: int, index: int, which: int) -> float:
        """Integral over [sigma_index, sigma_index+1] of the Lagrange basis polynomial of node index - which."""
        s = [self.sigmas[index - k].item() for k in range(order)]

        def basis(tau):
            return math.prod((tau - s[k]) / (s[which] - s[k]) for k in range(order) if k != which)

        a, b = self.sigmas[index].item(), self.sigmas[index + 1].item()
        half, mid = (b - a) / 2, (a + b) / 2
        return half * sum(w * basis(mid + half * x) for x, w in _GAUSS)

    def _coefficients(self, index, order: int = 4, **_):
        order = min(index + 1, order)
        c = [self._lms_coefficient(order, index, k) for k in range(order)]
        sigma = self.sigmas[index].item()
        xa, xb = coefficients.ve_x0(sigma, self.config["prediction_type"])
        # This step's derivative d = (x - x0) / sigma is the op's state; older ones come in as history. Started
        # part-way down the schedule (img2img), fewer derivatives exist than the order: like diffusers, the
        # order's coefficients are paired with those that exist.
        history = list(reversed(self._derivatives[-(order - 1):])) if order > 1 else []
        return StepCoefficients(x0_from_sample=xa, x0_from_output=xb,
                                next_from_sample=1.0 + c[0] / sigma, next_from_x0=-c[0] / sigma,
                                state_from_sample=1.0 / sigma, state_from_x0=-1.0 / sigma,
                                history=tuple(c[1:1 + len(history)])), history

    def _after_step(self, state):
        self._derivatives = self._derivatives[-3:] + [state]
