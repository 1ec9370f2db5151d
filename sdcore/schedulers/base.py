"""What every scheduler shares: the training noise schedule (float64 on the host), timestep spacing, the
diffusers config keys, and the step through the fused op."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .. import loading, ops
from ..step import StepCoefficients

COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


@dataclasses.dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def betas_for(config: dict) -> torch.Tensor:
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


class Scheduler:
    """Base class. Subclasses set ``defaults`` (their extra config keys) and implement set_timesteps and
    ``_coefficients(step_index) -> StepCoefficients``."""

    defaults: dict = {}
    order = 1
    # diffusers rounds "linspace" timesteps to integers for DDIM-style schedulers but keeps them fractional
    # for the sigma-interpolating ones.
    round_linspace = True
    # Whether the op's second output (what the next step keeps) is the x0 prediction, reported as
    # pred_original_sample.
    state_is_x0 = True

    def __init__(self, **config):
        known = {**COMMON_DEFAULTS, **self.defaults}
        self.config = {k: config.get(k, v) for k, v in known.items()}
        # The keys as given (a model's scheduler_config.json), before this class's defaults: what a different
        # scheduler for the same model should be built from, so it doesn't inherit, e.g., Euler's spacing.
        self.source_config = dict(config)
        if self.config["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {self.config['prediction_type']!r} is not supported")
        self.betas = betas_for(self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps = None
        self.timesteps = torch.empty(0)
        self._step_index = None

    @classmethod
    def from_config(cls, config: dict, **overrides):
        return cls(**{**config, **overrides})

    @classmethod
    def from_checked_config(cls, config: dict, source, **overrides):
        """``from_config`` for a config read from ``source`` (a scheduler_config.json): a value of the wrong
        JSON kind ("1000" for num_train_timesteps, "false" for a flag) or one this class refuses is a
        ValueError naming the file."""
        loading.check_config_types(config, {**COMMON_DEFAULTS, **cls.defaults}, source)
        try:
            return cls.from_config(config, **overrides)
        except NotImplementedError as exc:  # an option sdcore lacks: the same error, naming the file
            raise NotImplementedError(f"{source}: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
            raise ValueError(f"{source}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, **overrides):
        """Reads diffusers' scheduler_config.json from ``path`` (a file, a scheduler/ folder, or a model
        folder holding scheduler/)."""
        p = Path(path)
        if subfolder:
            p = p / subfolder
        if p.is_dir():
            p = p / "scheduler_config.json" if (p / "scheduler_config.json").exists() else \
                p / "scheduler" / "scheduler_config.json"
        if not p.exists():
            raise FileNotFoundError(f"no scheduler_config.json at {p}")
        return cls.from_checked_config(loading.read_json(p), p, **overrides)

    def spaced_timesteps(self, n: int) -> torch.Tensor:
        """The n training timesteps to visit, descending (diffusers' timestep_spacing)."""
        T, spacing = self.config["num_train_timesteps"], self.config["timestep_spacing"]
        if spacing == "linspace":
            t = torch.linspace(0, T - 1, n, dtype=torch.float64)
            return (t.round() if self.round_linspace else t.float().double()).flip(0)
        if spacing == "leading":
            return (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + self.config["steps_offset"]
        if spacing == "trailing":
            return torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        raise ValueError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")

    def sigmas_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """k-diffusion sigmas sqrt((1 - a)/a) at (fractional) timesteps, linearly interpolated."""
        full = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        lo = timesteps.floor().long().clamp(0, len(full) - 1)
        hi = (lo + 1).clamp(max=len(full) - 1)
        w = timesteps - lo.double()
        return full[lo] * (1 - w) + full[hi] * w

    def _position(self, timestep) -> int:
        """Where ``timestep`` first appears in self.timesteps (the second time for PLMS's repeated one)."""
        t = float(timestep)
        hits = (self.timesteps.double().cpu() == t).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps; call set_timesteps first")
        return hits[1] if len(hits) > 1 else hits[0]

    def _index_for(self, timestep) -> int:
        if self._step_index is None:
            self._step_index = self._position(timestep)
        return self._step_index

    def set_begin_index(self, index: int) -> None:
        """Start denoising at position ``index`` of ``timesteps`` (img2img), as diffusers' set_begin_index."""
        self._step_index = index

    def _current(self, timestep) -> int:
        """The step about to run: the begin index when one was set, else where ``timestep`` sits."""
        return self._step_index if self._step_index is not None else self._position(timestep)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """The forward process q(x_t | x_0) at ``timestep``: where img2img starts denoising."""
        a, b = self._noise_scales(timestep)
        return original * a + noise * b

    def _noise_scales(self, timestep) -> tuple[float, float]:
        """(scale of x0, scale of the noise) at ``timestep``: sqrt(alpha_bar), sqrt(1 - alpha_bar)."""
        alpha = self.alphas_cumprod[int(timestep)].item()
        return alpha**0.5, (1 - alpha) ** 0.5

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output, timestep, sample, generator=None, guidance_scale: float | None = None,
             return_dict: bool = True, **kwargs):
        """One denoising step through the fused op. With ``guidance_scale``, model_output is the batched
        [uncond; cond] UNet output and guidance happens inside the same pass."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        index = self._index_for(timestep)
        coeffs, history = self._coefficients(index, **kwargs)
        noise = None
        if coeffs.next_from_noise != 0:
            noise = kwargs.get("variance_noise")
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                    device=generator.device if generator is not None else sample.device)
                noise = noise.to(sample.device)
        prev, state = ops.scheduler_step(model_output, sample, coeffs, history=history, noise=noise,
                                         guidance_scale=guidance_scale)
        self._after_step(state)
        self._step_index = index + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev, state if self.state_is_x0 else None)

    def _coefficients(self, index: int, **kwargs) -> tuple[StepCoefficients, list]:
        raise NotImplementedError

    def _after_step(self, state: torch.Tensor) -> None:
        """Keeps whatever the next step needs (multistep solvers)."""
