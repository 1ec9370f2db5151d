"""Per-step coefficients of the fused step (:class:`sdcore.StepCoefficients`) for each sampler, in
float64 on the host, following the formulas diffusers' schedulers use.

Two sample conventions appear:
- variance preserving (DDIM, DPM-Solver++): x_t = alpha_t * x0 + sigma_t * eps with
  alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]);
- variance exploding / k-diffusion (Euler, Euler ancestral): x = x0 + sigma * eps, sigma = sigma_t/alpha_t,
  and the UNet sees x / sqrt(sigma^2 + 1).
"""
from __future__ import annotations

import math

from ..step import StepCoefficients

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _vp_x0(alpha: float, sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with x0 = a * x + b * m for a variance-preserving sample x."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _vp_eps(alpha: float, sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with eps = a * x + b * m, from the model output before any x0 clipping."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return sigma, alpha
    if prediction_type == "sample":
        return 1.0 / sigma, -alpha / sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddim(alpha_prod_t: float, alpha_prod_prev: float, *, eta: float = 0.0,
         prediction_type: str = "epsilon", clip_sample_range: float | None = None,
         use_clipped_model_output: bool = False) -> StepCoefficients:
    """DDIM (Song et al. 2020), eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z with
    s = eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev)). Adds noise when eta > 0. eps comes from
    the model output, or from the clipped x0 with ``use_clipped_model_output``."""
    alpha, sigma = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
    xa, xb = _vp_x0(alpha, sigma, prediction_type)
    variance = (1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev)
    std = eta * math.sqrt(variance)
    direction = math.sqrt(max(1.0 - alpha_prod_prev - std * std, 0.0))
    if use_clipped_model_output:  # eps = (x - alpha * x0) / sigma
        return StepCoefficients(
            x0_from_sample=xa, x0_from_output=xb, clip=clip_sample_range or 0.0,
            next_from_sample=direction / sigma, next_from_x0=math.sqrt(alpha_prod_prev) - direction * alpha / sigma,
            next_from_noise=std, state_from_x0=1.0)
    ea, eb = _vp_eps(alpha, sigma, prediction_type)
    return StepCoefficients(
        x0_from_sample=xa, x0_from_output=xb, clip=clip_sample_range or 0.0,
        next_from_sample=direction * ea, next_from_output=direction * eb,
        next_from_x0=math.sqrt(alpha_prod_prev), next_from_noise=std,
        state_from_x0=1.0)


def ve_x0(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with x0 = a * x + b * m for a k-diffusion sample x = x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def euler(sigma: float, sigma_next: float, *, prediction_type: str = "epsilon") -> StepCoefficients:
    """Euler step of the probability-flow ODE (Karras et al. 2022, alg. 2 without churn):
    x_next = x + (sigma_next - sigma) * (x - x0) / sigma."""
    xa, xb = ve_x0(sigma, prediction_type)
    dt = sigma_next - sigma
    return StepCoefficients(
        x0_from_sample=xa, x0_from_output=xb,
        next_from_sample=1.0 + dt / sigma, next_from_x0=-dt / sigma, state_from_x0=1.0)


def euler_ancestral(sigma: float, sigma_next: float, *, prediction_type: str = "epsilon") -> StepCoefficients:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up."""
    xa, xb = ve_x0(sigma, prediction_type)
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    dt = sigma_down - sigma
    return StepCoefficients(
        x0_from_sample=xa, x0_from_output=xb,
        next_from_sample=1.0 + dt / sigma, next_from_x0=-dt / sigma, next_from_noise=sigma_up,
        state_from_x0=1.0)


def dpmpp_2m(sigma: float, sigma_next: float, sigma_prev: float | None = None, *,
             prediction_type: str = "epsilon", second_order: bool = True) -> StepCoefficients:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2, midpoint form as in diffusers) on a variance-preserving
    sample. sigmas are k-diffusion sigmas (alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma * alpha_t).
    With ``second_order`` the step reads the previous x0 as history[0]; state is this step's x0."""

    def alpha_sigma(s: float) -> tuple[float, float]:
        a = 1.0 / math.sqrt(s * s + 1.0)
        return a, s * a

    alpha_s, sigma_s = alpha_sigma(sigma)
    alpha_t, sigma_t = alpha_sigma(sigma_next)
    xa, xb = _vp_x0(alpha_s, sigma_s, prediction_type)
    if sigma_next == 0.0:  # the last step lands on x0 itself
        return StepCoefficients(x0_from_sample=xa, x0_from_output=xb, next_from_x0=1.0, state_from_x0=1.0)
    lam_t = math.log(alpha_t) - math.log(sigma_t)
    lam_s = math.log(alpha_s) - math.log(sigma_s)
    h = lam_t - lam_s
    phi = math.expm1(-h)  # e^{-h} - 1
    if not second_order or sigma_prev is None:
        return StepCoefficients(x0_from_sample=xa, x0_from_output=xb, next_from_sample=sigma_t / sigma_s,
                                next_from_x0=-alpha_t * phi, state_from_x0=1.0)
    alpha_p, sigma_p = alpha_sigma(sigma_prev)
    h_0 = lam_s - (math.log(alpha_p) - math.log(sigma_p))
    r0 = h_0 / h
    # D0 = x0, D1 = (x0 - x0_prev) / r0;  x_t = (sigma_t/sigma_s) x - alpha_t*phi*D0 - 0.5*alpha_t*phi*D1
    return StepCoefficients(
        x0_from_sample=xa, x0_from_output=xb, next_from_sample=sigma_t / sigma_s,
        next_from_x0=-alpha_t * phi * (1.0 + 0.5 / r0), history=(0.5 * alpha_t * phi / r0,),
        state_from_x0=1.0)
