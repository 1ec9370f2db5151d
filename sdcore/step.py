"""The coefficients of one fused denoising step.

Every scheduler sdcore supports (DDIM with any eta, Euler, Euler ancestral, DPM-Solver++(2M), PLMS,
LMS) updates the latents by a per-step linear combination of the sample ``x``, the (guided) model
output ``m``, a clamped x0 prediction, up to four history tensors ``h_i`` and noise ``z``:

    x0    = clamp(x0_from_sample * x + x0_from_output * m, -clip, clip)    (no clamp when clip <= 0)
    next  = next_from_sample * x + next_from_output * m + next_from_x0 * x0
            + sum_i history[i] * h_i + next_from_noise * z
    state = state_from_sample * x + state_from_output * m + state_from_x0 * x0

``state`` is what the next step keeps (the x0 prediction for DPM-Solver++, a derivative for LMS, the
model output for PLMS). The scheduler computes the scalars on the host in float64; the kernel reads the
[2B, ...] UNet output, applies guidance and writes ``next`` (and ``state``) in one pass.
"""
from __future__ import annotations

import dataclasses

MAX_HISTORY = 4


@dataclasses.dataclass(frozen=True)
class StepCoefficients:
    x0_from_sample: float = 0.0
    x0_from_output: float = 0.0
    clip: float = 0.0
    next_from_sample: float = 0.0
    next_from_output: float = 0.0
    next_from_x0: float = 0.0
    next_from_noise: float = 0.0
    state_from_sample: float = 0.0
    state_from_output: float = 0.0
    state_from_x0: float = 0.0
    history: tuple = ()

    def __post_init__(self):
        if len(self.history) > MAX_HISTORY:
            raise ValueError(f"at most {MAX_HISTORY} history coefficients, got {len(self.history)}")
        object.__setattr__(self, "history", tuple(float(h) for h in self.history))

    def packed(self) -> list:
        """The order of the op's ``coeffs`` argument (csrc/common/params.h StepCoeffs)."""
        return [float(v) for v in (
            self.x0_from_sample, self.x0_from_output, self.clip,
            self.next_from_sample, self.next_from_output, self.next_from_x0, self.next_from_noise,
            self.state_from_sample, self.state_from_output, self.state_from_x0)]
