"""What every sdcore pipeline shares, step for step what diffusers' pipelines do: seeds you can reuse,
classifier-free guidance as one batched UNet call per step (uncond first) folded into the fused scheduler
step, the denoising loop with its callbacks and NaN/Inf watch, the VAE decode, and the LoRA API.

Thread safety: one pipeline may serve calls from several threads at once. Each call works on its own copy
of the scheduler (the schedule, step index and multistep history are per call), tokenizing is serialized,
and the backend scope is thread-local, so every call returns exactly what it would have returned alone."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import threading
from pathlib import Path

import numpy as np
import torch

from .. import _backend, loading, schedulers
from ..args import check_int, checked

log = logging.getLogger("sdcore")

# transformers' tokenizers keep padding/truncation settings on the tokenizer object while they encode, so two
# threads tokenizing with one tokenizer can get each other's padding. Pipelines share tokenizers (from_pipe,
# the server's txt2img and img2img), so the lock is the process's, not a pipeline's: a per-pipeline lock let
# a txt2img and an img2img call on one model pad to the longest prompt instead of 77 tokens.
_TOKENIZE = threading.Lock()

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclasses.dataclass
class PipelineOutput:
    """``images``: PIL images, a [B, H, W, 3] array or a [B, 3, H, W] tensor in [0, 1] (or latents);
    ``seeds``: the seed of each image's starting noise (None where the caller passed a generator or latents)."""

    images: object
    seeds: list


class NonFiniteError(RuntimeError):
    """A generation produced NaN or Inf: ``component`` ("text encoder", "UNet", "scheduler step", "VAE decode"
    or "callback") at ``step`` (1-based; None outside the denoising loop). No image is returned."""

    def __init__(self, component: str, step: int | None, total: int, detail: str = ""):
        self.component, self.step = component, step
        where = f" at step {step} of {total}" if step is not None else ""
        causes = detail or ("Usual causes: float16 overflow (try dtype bf16 or fp32), corrupt weights, or an "
                            "input holding NaN.")
        super().__init__(
            f"the {component} produced NaN/Inf{where}, so the image would be garbage (often black) and none "
            f"is returned. {causes} Pass allow_nan=True (sdcore generate --allow-nan) to get the image anyway, "
            "for debugging.")


class StopDenoising(Exception):
    """Raised by a ``callback_on_step_end`` to end the denoising loop after the step it was called for: the
    latents finished so far are decoded and returned, as an interrupted generation in A1111 (and diffusers'
    ``pipe._interrupt``, which lives on the pipeline and so can't stop one call among several threads)."""


class _FiniteWatch:
    """Checks each component's output for NaN/Inf. On the CPU a check is immediate; on a GPU each one is a
    device-side flag, read once at the end (one sync per generation instead of one per step)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.pending = enabled, total, []

    def check(self, tensor: torch.Tensor, component: str, step: int | None = None, detail: str = "") -> None:
        if not self.enabled:
            return
        bad = ~torch.isfinite(tensor).all()
        if tensor.device.type == "cpu":
            if bad:
                raise NonFiniteError(component, step, self.total, detail)
        else:
            self.pending.append((component, step, detail, bad))

    def raise_if_bad(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            flags = torch.stack([bad for *_, bad in pending]).tolist()
            for (component, step, detail, _), bad in zip(pending, flags):
                if bad:
                    raise NonFiniteError(component, step, self.total, detail)


def _rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Lin et al. 2023 (Common Diffusion Noise Schedules are Flawed), sec. 3.4: pull the guided prediction's
    per-sample std back to the conditional one's, mixed in by ``factor``."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided


def _step_generator(seed: int) -> torch.Generator:
    """The sampler's noise stream for a seed: a CPU generator on a scrambled seed, so it is reproducible and
    never replays the starting noise of any image (which uses seed + i)."""
    return torch.Generator().manual_seed((seed * 6364136223846793005 + 1442695040888963407) % 2**63)


def _scheduler_from_config(config: dict, source) -> schedulers.Scheduler:
    """The scheduler class a config names (diffusers' ``_class_name``); PLMS for one sdcore lacks, said aloud."""
    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(schedulers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, schedulers.Scheduler)):
        log.warning("%s: scheduler %s is not in sdcore; using PNDMScheduler (SD 1.x's default) on its config. "
                    "Choose another with pipe.set_scheduler(name): %s", source, name, ", ".join(schedulers.NAMES))
        cls = schedulers.PNDMScheduler
    if cls is schedulers.PNDMScheduler:
        config = {**config, "skip_prk_steps": True}  # PLMS, which is what SD's PNDM configs run
    return cls.from_checked_config(config, source)


def _scheduler_from_folder(path: Path) -> schedulers.Scheduler:
    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing (every Stable Diffusion folder has a scheduler/)")
    return _scheduler_from_config(loading.read_json(config_file), config_file)


class DiffusionPipeline:
    """The parts of a text-to-image pipeline that do not depend on how the prompt is encoded. A subclass sets
    ``unet``, ``vae``, ``scheduler`` and its text encoders and tokenizers, and calls ``_setup``."""

    # the attributes holding models, moved together by ``to``
    _models = ("unet", "vae", "text_encoder")

    def _setup(self, backend: str | None, cuda_graphs: bool = True) -> None:
        self.backend = _backend._check(backend) if backend is not None else None
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        # On CUDA, the UNet call is captured into a CUDA graph per shape and replayed (cuda_graphs.py).
        self.cuda_graphs = cuda_graphs
        self._channels_last: bool | None = None
        self._apply_layout()
        self.scheduler_config = dict(self.scheduler.source_config)  # the model's, for set_scheduler
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_source = getattr(self, "vae_source", "AutoencoderKL")  # from_pretrained names its folder

    def to(self, device=None, dtype=None):
        for name in self._models:
            model = getattr(self, name)
            if model is not None:
                model.to(device=device, dtype=dtype)
        self._apply_layout()
        graphs = self.unet.__dict__.get("_sdcore_cuda_graphs")
        if graphs is not None and graphs.weights != graphs._weights_signature():  # the weights moved: free the
            graphs.clear()                                                          # graphs now, recapture later
        return self

    @property
    def channels_last(self) -> bool | None:
        """The UNet's and VAE's activations in channels_last (NHWC) memory. None (default): on CUDA, where
        cuDNN's tensor-core convolutions read NHWC and NCHW costs a layout conversion around every conv;
        True / False: on or off on any device. Setting it moves the conv weights (not while generating)."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"channels_last must be True, False or None, got {value!r}")
        self._channels_last = value
        self._apply_layout()

    def _nhwc(self) -> bool:
        return self.device.type == "cuda" if self._channels_last is None else self._channels_last

    def _apply_layout(self) -> None:
        """The UNet's and VAE's conv weights in the activations' memory format (a no-op when they already are:
        the weights keep their storage)."""
        fmt = torch.channels_last if self._nhwc() else torch.contiguous_format
        for model in (self.unet, self.vae):
            if any(p.dim() == 4 and not p.is_contiguous(memory_format=fmt) for p in model.parameters()):
                model.to(memory_format=fmt)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """A UNet or VAE input in the models' memory format (a tiny copy of the latents, once per call)."""
        return x.contiguous(memory_format=torch.channels_last if self._nhwc() else torch.contiguous_format)

    def _unet_call(self):
        """The UNet, or on CUDA with cuda_graphs its graph cache (kept on the UNet object, so pipelines that
        share the UNet share its graphs)."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return self.unet
        from .cuda_graphs import UNetGraphs

        graphs = self.unet.__dict__.get("_sdcore_cuda_graphs")
        if graphs is None:
            graphs = self.unet.__dict__["_sdcore_cuda_graphs"] = UNetGraphs(self.unet)
        return graphs

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def enable_vae_tiling(self) -> None:
        """Decode (and encode, for image to image) images larger than the VAE's tile tile by tile with blended
        seams, so that a 2048² image decodes within a fixed memory budget (see AutoencoderKL.enable_tiling)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler by its CLI name (ddim, pndm, euler, euler-a, dpm++2m, dpm++2m-karras, lms), keeping
        the model's noise schedule and prediction type (from the model's scheduler config, whichever sampler
        ran before)."""
        self.scheduler = schedulers.from_name(name, self.scheduler_config)

    def _backend_scope(self):
        return _backend.use_backend(self.backend) if self.backend else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ prompts
    def _tokens(self, prompts: list[str], tok=None) -> torch.Tensor:
        """Token ids padded to the tokenizer's length (with its pad token: SDXL's second pads with "!")."""
        tok = tok or self.tokenizer
        with _TOKENIZE:
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            full = tok(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            for prompt, row in zip(prompts, full):
                dropped = tok.decode(row[tok.model_max_length - 1:-1], skip_special_tokens=True).strip()
                if dropped:
                    log.warning("prompt longer than CLIP's %d tokens; truncated, dropping: %r (prompt %r)",
                                tok.model_max_length, dropped, prompt[:60])
        return ids

    def _check_call(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale,
                    num_images_per_prompt, eta, seed, clip_skip, output_type):
        """Every argument a call shares, checked before any work; returns the number of prompts and the call's
        scheduler, its timesteps set."""
        prompts = _prompt_list("prompt", prompt)
        if negative_prompt is not None:
            negatives = _prompt_list("negative_prompt", negative_prompt)
            if not isinstance(negative_prompt, str) and len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        steps = checked("steps", "num_inference_steps", num_inference_steps)
        train_steps = self.scheduler.config["num_train_timesteps"]
        if steps > train_steps:
            raise ValueError(f"num_inference_steps must be at most the schedule's {train_steps} training "
                             f"timesteps, got {steps}")
        checked("guidance", "guidance_scale", guidance_scale)
        checked("guidance_rescale", "guidance_rescale", guidance_rescale)
        count = checked("images", "num_images_per_prompt", num_images_per_prompt) * len(prompts)
        checked("eta", "eta", eta)
        if seed is not None:
            seed = checked("seed", "seed", seed)
            if seed + count - 1 > 2**63 - 1:
                raise ValueError(f"seed must be at most 2**63 - {count} so that every image's seed + i fits, got {seed}")
        if clip_skip is not None:
            layers = min(getattr(self, name).config.num_hidden_layers for name in self._models
                         if name.startswith("text_encoder") and getattr(self, name) is not None)
            check_int("clip_skip", clip_skip, 0, layers - 1)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        return len(prompts), self._scheduler_for_call(steps)

    def _scheduler_for_call(self, num_inference_steps: int) -> schedulers.Scheduler:
        """A copy of the pipeline's scheduler with its timesteps set: the schedule, step index and multistep
        history belong to this call, so calls from several threads never share them. A step count the
        schedule can't take (a timestep past the training range, as 'leading' spacing with steps_offset
        reaches near the top) is refused here, before any work."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(num_inference_steps, device=self.device)
        train_steps = sched.config["num_train_timesteps"]
        top = float(sched.timesteps.max())
        if not 0 <= float(sched.timesteps.min()) <= top < train_steps:
            raise ValueError(f"num_inference_steps={num_inference_steps} is more than {type(sched).__name__} "
                             f"can take with this model's schedule (it would reach timestep {top:g}; the "
                             f"training range is 0..{train_steps - 1}); use fewer steps")
        return sched

    # ------------------------------------------------------------------------------------------ noise
    def _noise(self, shape, count: int, generator, seed, dtype):
        """Starting noise, the generator for the sampler's own noise (ancestral steps), and the seeds. With a
        seed, image i starts from seed + i on a CPU generator, so a seed gives the same image on any device;
        a caller's generator is used as diffusers uses it."""
        if isinstance(generator, list):  # one per image
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
            return noise.to(self.device, dtype), generator[0], [None] * count
        if generator is not None:
            noise = torch.randn(shape, generator=generator, device=generator.device)
            return noise.to(self.device, dtype), generator, [None] * count
        base = random.randrange(2**31) if seed is None else int(seed)
        seeds = [base + i for i in range(count)]
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])
        return noise.to(self.device, dtype), _step_generator(base), seeds

    def _start_latents(self, latents, shape, count: int, generator, seed):
        """The caller's ``latents`` or fresh noise (see _noise); with the sampler's generator and the seeds."""
        if latents is None:
            return self._noise(shape, count, generator, seed, self.dtype)
        step_generator = generator[0] if isinstance(generator, list) else generator
        if step_generator is None and seed is not None:
            step_generator = _step_generator(int(seed))
        return latents.to(self.device, self.dtype), step_generator, [None] * count

    # ------------------------------------------------------------------------------------------ the loop
    def _size(self, height, width) -> tuple[int, int]:
        """A text-to-image call's size: the UNet's trained one by default; checked."""
        size = self.unet.config.sample_size * self.vae_scale_factor
        height = size if height is None else height
        width = size if width is None else width
        self._check_size(height, width)
        return height, width

    def _latent_shape(self, count: int, height: int, width: int, latents, generator) -> tuple:
        """The starting latents' shape for ``count`` images, checked against the caller's latents and
        generators."""
        shape = (count, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if isinstance(generator, list) and len(generator) != count:
            raise ValueError(f"generator: {len(generator)} generators for {count} images")
        return shape

    def _check_size(self, height, width):
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            v = checked("side", name, v)
            if v % f:
                raise ValueError(f"{name} must be a multiple of {f} (the VAE's downsampling factor), got {v}")

    def _denoise(self, sched, latents, timesteps, embeds, guidance_scale, guidance_rescale, step_generator, eta,
                 callback_on_step_end, progress, watch, added_cond_kwargs: dict | None = None):
        """The loop over ``timesteps``; ``embeds`` (and SDXL's ``added_cond_kwargs``) are [uncond; cond] with
        guidance, as the UNet takes them."""
        cfg = embeds.shape[0] == 2 * latents.shape[0]
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        step_kwargs = {"eta": eta} if isinstance(sched, schedulers.DDIMScheduler) else {}
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc="sdcore", unit="step")
        unet = self._unet_call()
        for i, t in enumerate(iterator):
            x = torch.cat([latents, latents]) if cfg else latents
            out = unet(self._layout(sched.scale_model_input(x, t)), t, embeds, **extra)
            watch.check(out, "UNet", i + 1)
            if cfg and guidance_rescale > 0:
                uncond, cond = out.chunk(2)
                guided = _rescale_guidance(uncond + guidance_scale * (cond - uncond), cond, guidance_rescale)
                latents = sched.step(guided, t, latents, generator=step_generator, **step_kwargs).prev_sample
            else:  # guidance happens inside the fused step
                latents = sched.step(out, t, latents, generator=step_generator,
                                     guidance_scale=guidance_scale if cfg else None, **step_kwargs).prev_sample
            watch.check(latents, "scheduler step", i + 1)
            if callback_on_step_end is not None:
                try:
                    changed = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                except StopDenoising:
                    break
                if "latents" in changed:
                    latents = changed["latents"]
                    watch.check(latents, "callback", i + 1)
        watch.raise_if_bad()
        return latents

    def _decode(self, latents, output_type, watch):
        if output_type == "latent":
            return latents
        dtype = next(self.vae.parameters()).dtype  # float32 where an SDXL pipeline keeps it upcast
        image = self.vae.decode(self._layout(latents.to(dtype) / self.vae.config.scaling_factor))
        watch.check(image, "VAE decode", detail=(
            f"The VAE ({self.vae_source}) ran in {str(dtype).removeprefix('torch.')}. A VAE that overflows in "
            "float16 (SDXL's does) needs force_upcast: true in its config (it then decodes in float32), dtype "
            "bf16/fp32, or a replacement VAE that doesn't (vae=... in from_pretrained, sdcore generate --vae "
            "PATH; e.g. the fp16-fix SDXL VAE)."))
        watch.raise_if_bad()
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        array = image.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        from PIL import Image

        # nan_to_num: only an allow_nan call gets here with NaN, and wants its (black) image without a warning.
        return [Image.fromarray((np.nan_to_num(a) * 255).round().astype(np.uint8)) for a in array]

    # ------------------------------------------------------------------------------------------ LoRA
    # Thin wrappers over sdcore.lora (merging, formats, the readers-writer lock); diffusers' names.
    def _adapters(self):
        from .. import lora

        return lora.state(self)

    def load_lora_weights(self, path_or_state_dict, adapter_name: str | None = None, weight: float = 1.0,
                          strict: bool = False) -> str:
        """Merge a LoRA/LyCORIS ``.safetensors`` file (kohya/A1111, diffusers/PEFT, LoCon, LoHa, LoKr) or a
        state dict into the UNet and text encoder, active with ``weight`` alongside the adapters already
        active; returns its name (default: the file's stem). Atomic: every key is mapped and every shape
        checked before any weight changes. Unknown keys warn (``strict=True``: error)."""
        return self._adapters().load(self, path_or_state_dict, adapter_name, weight, strict)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Make exactly ``adapter_names`` active, with ``adapter_weights`` (one number, or one per name;
        default 1.0). Recomputed from the original weights, so any sequence of changes is exact."""
        self._adapters().set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return list(self._adapters().active)

    def delete_adapters(self, adapter_names) -> None:
        self._adapters().delete(adapter_names)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the weights are bitwise the originals again."""
        self._adapters().unload()


def _prompt_list(name: str, prompt) -> list[str]:
    """A prompt or a list of prompts as a non-empty list of str, or a TypeError naming the argument."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return list(prompts)


def _image_tensor(image, multiple: int) -> torch.Tensor:
    """A PIL image (or a [B, 3, H, W] tensor in [0, 1]) as [-1, 1], cropped down to a multiple of the VAE's
    factor the way diffusers' image processor resizes."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image[None]
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"image: a tensor image must be float [B, 3, H, W] or [3, H, W] in [0, 1], got "
                             f"{x.dtype} {tuple(image.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("image: the tensor holds NaN or Inf")
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a torch tensor, got {type(image).__name__}")
    else:
        image = image.convert("RGB")
        w, h = (s - s % multiple for s in image.size)
        if (w, h) != image.size:
            if w == 0 or h == 0:
                raise ValueError(f"image: {image.size[0]}x{image.size[1]} is smaller than {multiple} pixels")
            image = image.resize((w, h), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"image height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")
    return x * 2 - 1


