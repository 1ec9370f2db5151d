"""SDXL (Podell et al. 2023) text-to-image and image-to-image, the refiner included, step for step what
diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline do, on sdcore's models.

What SDXL adds to SD: two text encoders (CLIP ViT-L and OpenCLIP bigG) whose penultimate hidden states are
concatenated, the second's projected pooled embedding and the "micro-conditioning" time ids (original size,
crop corner, target size; the refiner: the aesthetic score instead of the target size) added to the UNet's
timestep embedding, a missing negative prompt as zero embeddings (force_zeros_for_empty_prompt), and a VAE
that overflows in float16 (force_upcast: kept in float32 here). ``denoising_end`` on the base and
``denoising_start`` on the refiner split one schedule between them ("ensemble of experts"), in latent space."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from .. import loading
from ..args import check_float, checked
from ..models import AutoencoderKL, UNet2DConditionModel, load_text_encoder
from ..models.text_encoder import build_text_encoder
from .base import (DiffusionPipeline, PipelineOutput, _FiniteWatch, _image_tensor, _prompt_list,
                   _scheduler_from_config, _scheduler_from_folder)


def _pair(name: str, value) -> tuple[float, float]:
    """A (height, width) or (top, left) argument as two finite numbers, or a ValueError naming it."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf") for v in value):
        raise ValueError(f"{name} must be two numbers, (height, width) or (top, left), got {value!r}")
    return tuple(value)


def _fraction(name: str, value) -> float | None:
    """denoising_start / denoising_end: None or a float strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, float) or not 0 < value < 1:
        raise ValueError(f"{name} must be a float strictly between 0 and 1 (the fraction of the schedule), got "
                         f"{value!r}")
    return value


class StableDiffusionXLPipeline(DiffusionPipeline):
    """``pipe = StableDiffusionXLPipeline.from_pretrained(dir)``; ``pipe("a photo of a cat").images[0]``
    (1024x1024, guidance 5.0 by default, as diffusers)."""

    _models = ("unet", "vae", "text_encoder", "text_encoder_2")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, *,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False,
                 backend: str | None = None, cuda_graphs: bool = True):
        self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2 = \
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2
        self.unet, self.scheduler = unet, scheduler
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        self._check_models()
        self._setup(backend, cuda_graphs)
        self._keep_vae_upcast()

    def _check_models(self) -> None:
        """What the models must agree on, checked at load so that a mismatch is named, not a shape error."""
        unet, enc2 = self.unet.config, self.text_encoder_2
        if enc2 is None or not hasattr(enc2, "text_projection"):
            raise ValueError("text_encoder_2: SDXL needs a CLIPTextModelWithProjection here (its pooled "
                             "embedding conditions the UNet)")
        if (self.text_encoder is None) != (self.tokenizer is None) or self.tokenizer_2 is None:
            raise ValueError("tokenizer/tokenizer_2: each text encoder needs its tokenizer")
        if unet.addition_embed_type != "text_time":
            raise ValueError(f"unet: an SDXL pipeline needs a UNet with addition_embed_type='text_time', this one "
                             f"has {unet.addition_embed_type!r} (an SD 1.x/2.x model? use StableDiffusionPipeline)")
        encoders = [e for e in (self.text_encoder, enc2) if e is not None]
        widths = [e.config.hidden_size for e in encoders]
        cross = unet.cross_attention_dim
        if any(sum(widths) != c for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
            raise ValueError(f"the text encoders' hidden sizes {' + '.join(map(str, widths))} = {sum(widths)} do "
                             f"not add up to the UNet's cross_attention_dim {cross}")
        n = 5 if self.requires_aesthetics_score else 6
        width = enc2.config.projection_dim + n * unet.addition_time_embed_dim
        if width != unet.projection_class_embeddings_input_dim:
            raise ValueError(
                f"{n} time ids (requires_aesthetics_score={self.requires_aesthetics_score}) x addition_time_embed_dim "
                f"{unet.addition_time_embed_dim} + text_encoder_2's projection_dim {enc2.config.projection_dim} = "
                f"{width}, but the UNet's projection_class_embeddings_input_dim is "
                f"{unet.projection_class_embeddings_input_dim} (the refiner takes 5 time ids, the base 6)")

    def _keep_vae_upcast(self) -> None:
        """diffusers upcasts a force_upcast VAE to float32 around each encode and decode of a float16 pipeline;
        keeping it in float32 is the same arithmetic, and no call changes a model another thread is using."""
        if self.vae.config.force_upcast and next(self.vae.parameters()).dtype == torch.float16:
            self.vae.to(torch.float32)

    def to(self, device=None, dtype=None):
        super().to(device, dtype)
        self._keep_vae_upcast()
        return self

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, backend: str | None = None, variant: str | None = None,
                        vae: AutoencoderKL | None = None):
        """A diffusers-format SDXL folder (base or refiner: the refiner has no text_encoder/), offline.
        ``vae`` replaces the folder's VAE (e.g. the fp16-fix SDXL VAE, which decodes in float16)."""
        path = Path(path)
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path}: no model_index.json (expected a diffusers-format SDXL folder)")
        index = loading.read_json(path / "model_index.json")
        options = {}
        for key, default in (("force_zeros_for_empty_prompt", True), ("requires_aesthetics_score", False)):
            options[key] = index.get(key, default)
            if not isinstance(options[key], bool):
                raise ValueError(f"{path / 'model_index.json'}: {key} must be true or false, got {options[key]!r}")
        if vae is not None and not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae must be an sdcore AutoencoderKL, got {type(vae).__name__}")
        # text_encoder/tokenizer are [null, null] in a refiner's model_index.json
        has_first = (index.get("text_encoder") or [None])[0] is not None
        parts = ["unet", "text_encoder_2", "scheduler"] + (["vae"] if vae is None else []) + \
            (["text_encoder"] if has_first else [])
        for part in parts:
            if not (path / part).is_dir():
                raise FileNotFoundError(f"{path / part}: missing component folder")
        scheduler = _scheduler_from_folder(path)
        tokenizer = None
        if has_first:
            tokenizer = loading.load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else \
                loading.default_tokenizer()
        tokenizer_2 = loading.load_tokenizer(path / "tokenizer_2") if (path / "tokenizer_2").is_dir() else \
            loading.default_tokenizer(pad_token="!")
        text_encoder = load_text_encoder(path, "text_encoder", device=device, dtype=dtype, variant=variant) \
            if has_first else None
        text_encoder_2 = load_text_encoder(path, "text_encoder_2", device=device, dtype=dtype, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, device=device,
                                                    dtype=dtype)
        if vae is None:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, device=device, dtype=dtype)
            source = str(path / "vae")
        else:
            vae, source = vae.to(device=device, dtype=dtype), "the vae= replacement"
        pipe = cls(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, backend=backend,
                   **options)
        pipe.vae_source = source
        return pipe

    @classmethod
    def from_single_file(cls, path, device=None, dtype=None, backend: str | None = None,
                         prediction_type: str = "epsilon", use_ema: bool = False, vae: AutoencoderKL | None = None,
                         state: dict | None = None, **detect_overrides):
        """An SDXL base or refiner checkpoint in Stability's original layout (.safetensors, or .ckpt read with
        weights_only=True; see sdcore.loading.single_file_xl), the kind read from its tensors. The tokenizers
        are the bundled CLIP BPE (the second pads with "!"), the scheduler Euler as in diffusers. A refiner
        file (no first text encoder) gets requires_aesthetics_score. ``vae`` replaces the file's VAE;
        ``state``: the file's tensors when already read; ``detect_overrides``: head_channels and the
        ``*_overrides`` of single_file_xl.detect, for checkpoints that differ from SDXL's configs."""
        from ..loading import single_file_xl

        if vae is not None and not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae must be an sdcore AutoencoderKL, got {type(vae).__name__}")
        parts = single_file_xl.load_components(path, prediction_type=prediction_type, use_ema=use_ema,
                                               state=state, **detect_overrides)
        unet = loading.build_empty(UNet2DConditionModel, parts["unet_config"])
        loading.load_weights(unet, parts["unet_state"], f"{path} (UNet)")
        source = "the vae= replacement"
        if vae is None:
            vae = loading.build_empty(AutoencoderKL, parts["vae_config"])
            loading.load_weights(vae, parts["vae_state"], f"{path} (VAE)")
            source = f"{path} (VAE)"
        text_encoder = tokenizer = None
        if parts["text_state"] is not None:
            text_encoder = build_text_encoder(parts["text_config"], parts["text_state"],
                                              source=f"{path} (text encoder)")
            tokenizer = loading.default_tokenizer()
        text_encoder_2 = build_text_encoder(parts["text_2_config"], parts["text_2_state"], with_projection=True,
                                            source=f"{path} (text encoder 2)")
        scheduler = _scheduler_from_config(parts["scheduler_config"], path)
        pipe = cls(vae.eval(), text_encoder, text_encoder_2, tokenizer, loading.default_tokenizer(pad_token="!"),
                   unet.eval(), scheduler, backend=backend, **parts["pipeline_config"])
        pipe.vae_source = source
        return pipe.to(device, dtype)

    @classmethod
    def from_pipe(cls, pipe: "StableDiffusionXLPipeline"):
        """The same models (no copy) in another SDXL pipeline, e.g. image-to-image from a text-to-image one."""
        new = cls(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, pipe.unet,
                  pipe.scheduler, force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt,
                  requires_aesthetics_score=pipe.requires_aesthetics_score, backend=pipe.backend,
                  cuda_graphs=pipe.cuda_graphs)
        new.vae_source = pipe.vae_source
        return new

    # ------------------------------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str], prompts_2: list[str], clip_skip: int | None):
        """[B, 77, sum of widths] hidden states (each encoder's layer -(clip_skip + 2), the penultimate by
        default, without the final LayerNorm) and text_encoder_2's projected pooled embedding [B, P]."""
        hidden, pooled = [], None
        for tok, enc, texts in ((self.tokenizer, self.text_encoder, prompts),
                                (self.tokenizer_2, self.text_encoder_2, prompts_2)):
            if enc is None:
                continue
            out = enc(self._tokens(texts, tok).to(enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-(2 if clip_skip is None else clip_skip + 2)])
            pooled = getattr(out, "text_embeds", pooled)
        return torch.cat(hidden, dim=-1), pooled

    def encode_prompt(self, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                      num_images_per_prompt: int = 1, guidance: bool = True, clip_skip: int | None = None):
        """(text embeddings, pooled embeddings), each [uncond; cond] with guidance (cond only without), every
        prompt repeated per image. ``prompt_2``/``negative_prompt_2`` go to the second encoder (default: the
        first's). A missing negative prompt is zeros where force_zeros_for_empty_prompt (the base model)."""
        prompts = _prompt_list("prompt", prompt)
        prompts_2 = _matching("prompt_2", prompt_2, prompts, prompts)
        cond, pooled = self._encode(prompts, prompts_2, clip_skip)
        n = num_images_per_prompt
        if not guidance:
            return cond.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            negatives = _matching("negative_prompt", negative_prompt or "", prompts, None)
            negatives_2 = _matching("negative_prompt_2", negative_prompt_2 or negative_prompt or "", prompts, None)
            uncond, uncond_pooled = self._encode(negatives, negatives_2, None)  # clip_skip: the prompt's only
        return (torch.cat([uncond.repeat_interleave(n, dim=0), cond.repeat_interleave(n, dim=0)]),
                torch.cat([uncond_pooled.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)]))

    # ------------------------------------------------------------------------------------------ conditioning
    def _time_ids(self, original_size, crops_coords_top_left, target_size, aesthetic_score) -> list[float]:
        """The micro-conditioning: (h, w) of the training image before resizing, the crop's top-left corner, and
        the target (h, w), or for the refiner the aesthetic score instead of the target."""
        ids = [*_pair("original_size", original_size), *_pair("crops_coords_top_left", crops_coords_top_left)]
        if self.requires_aesthetics_score:
            return ids + [check_float("aesthetic_score", aesthetic_score)]
        return ids + list(_pair("target_size", target_size))

    def _conditioning_xl(self, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
                         guidance_scale, clip_skip, time_ids, negative_time_ids, watch):
        """The UNet's text embeddings and added_cond_kwargs in the pipeline's dtype, and the image count."""
        guidance = guidance_scale > 1.0
        embeds, pooled = self.encode_prompt(prompt, prompt_2, negative_prompt, negative_prompt_2,
                                            num_images_per_prompt, guidance, clip_skip)
        watch.check(embeds, "text encoder")
        count = embeds.shape[0] // (2 if guidance else 1)
        # one row per sample, [uncond...; cond...] like the embeddings (diffusers repeats the [neg, pos] pair,
        # which orders them differently when they differ and more than one image is made)
        rows = ([negative_time_ids] * count if guidance else []) + [time_ids] * count
        ids = torch.tensor(rows, dtype=self.dtype, device=self.device)
        return embeds.to(self.dtype), {"text_embeds": pooled.to(self.dtype), "time_ids": ids}, count

    def _check_xl(self, prompt, prompt_2, negative_prompt, negative_prompt_2, denoising_end):
        prompts = _prompt_list("prompt", prompt)
        _matching("prompt_2", prompt_2, prompts, None)
        _matching("negative_prompt_2", negative_prompt_2, prompts, None)
        return _fraction("denoising_end", denoising_end)

    @staticmethod
    def _cut_end(sched, timesteps, denoising_end: float | None):
        """The timesteps the base runs when it hands off at ``denoising_end`` of the schedule (diffusers'
        rounding: the steps at or above the cutoff timestep)."""
        if denoising_end is None:
            return timesteps
        train = sched.config["num_train_timesteps"]
        cutoff = int(round(train - denoising_end * train))
        return timesteps[:int((timesteps >= cutoff).sum())]

    @torch.no_grad()
    def __call__(self, prompt, prompt_2=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, denoising_end: float | None = None, guidance_scale: float = 5.0,
                 negative_prompt=None, negative_prompt_2=None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator=None, seed: int | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", guidance_rescale: float = 0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip: int | None = None,
                 callback_on_step_end=None, progress: bool = True, allow_nan: bool = False) -> PipelineOutput:
        """Text to image, diffusers' arguments. ``denoising_end`` stops at that fraction of the schedule (use
        output_type="latent" and hand the latents to the refiner's ``denoising_start``). Every argument is
        checked before any work; NaN/Inf raises NonFiniteError unless ``allow_nan``."""
        n_prompts, sched = self._check_call(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, seed=seed, clip_skip=clip_skip,
            output_type=output_type)
        denoising_end = self._check_xl(prompt, prompt_2, negative_prompt, negative_prompt_2, denoising_end)
        if self.requires_aesthetics_score:
            raise ValueError("this model requires_aesthetics_score (the SDXL refiner): it refines an image or the "
                             "base's latents, with StableDiffusionXLImg2ImgPipeline")
        height, width = self._size(height, width)
        time_ids = self._time_ids(original_size or (height, width), crops_coords_top_left,
                                  target_size or (height, width), None)
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._time_ids(negative_original_size, negative_crops_coords_top_left,
                                               negative_target_size, None)
        count = n_prompts * num_images_per_prompt
        shape = self._latent_shape(count, height, width, latents, generator)
        watch = _FiniteWatch(not allow_nan, num_inference_steps)
        with self._backend_scope(), self._adapters().lock.shared():  # no adapter switch mid-generation
            embeds, added, count = self._conditioning_xl(
                prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, guidance_scale,
                clip_skip, time_ids, negative_time_ids, watch)
            latents, step_generator, seeds = self._start_latents(latents, shape, count, generator, seed)
            latents = latents * sched.init_noise_sigma
            timesteps = self._cut_end(sched, sched.timesteps, denoising_end)
            latents = self._denoise(sched, latents, timesteps, embeds, guidance_scale, guidance_rescale,
                                    step_generator, eta, callback_on_step_end, progress, watch, added)
            return PipelineOutput(self._decode(latents, output_type, watch), seeds)


def _matching(name: str, value, prompts: list[str], default):
    """A second prompt list (prompt_2, a negative): a string applies to every prompt, a list must have one
    entry per prompt; None gives ``default``."""
    if value is None:
        return default
    values = _prompt_list(name, value)
    if isinstance(value, str):
        return values * len(prompts)
    if len(values) != len(prompts):
        raise ValueError(f"{name}: {len(values)} entries for {len(prompts)} prompts")
    return values


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """Image to image with SDXL, and the refiner (requires_aesthetics_score): ``image`` is a picture, or
    latents [B, 4, h, w] from the base's ``output_type="latent"`` with ``denoising_start``."""

    @torch.no_grad()
    def __call__(self, prompt, prompt_2=None, image=None, strength: float = 0.3, num_inference_steps: int = 50,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 guidance_scale: float = 5.0, negative_prompt=None, negative_prompt_2=None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, seed: int | None = None,
                 output_type: str = "pil", guidance_rescale: float = 0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, clip_skip: int | None = None, callback_on_step_end=None,
                 progress: bool = True, allow_nan: bool = False) -> PipelineOutput:
        """Image to image, diffusers' arguments: ``strength`` of the schedule is redone on ``image``, or with
        ``denoising_start`` the schedule from that fraction on (no noise is added: the base's latents are
        already noisy there)."""
        n_prompts, sched = self._check_call(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, seed=seed, clip_skip=clip_skip,
            output_type=output_type)
        denoising_end = self._check_xl(prompt, prompt_2, negative_prompt, negative_prompt_2, denoising_end)
        denoising_start = _fraction("denoising_start", denoising_start)
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start {denoising_start} must be below denoising_end {denoising_end}")
        strength = checked("strength", "strength", strength)
        if image is None:
            raise TypeError("image is required: a picture, or latents [B, 4, h, w] (with denoising_start)")
        latent_input = isinstance(image, torch.Tensor) and image.ndim == 4 and \
            image.shape[1] == self.unet.config.in_channels != 3
        x = image if latent_input else _image_tensor(image, self.vae_scale_factor)
        count = n_prompts * num_images_per_prompt
        if count % x.shape[0]:
            raise ValueError(f"image: {x.shape[0]} images for {count} outputs")
        timesteps = self._start_steps(sched, num_inference_steps, strength, denoising_start)
        f = 1 if latent_input else self.vae_scale_factor
        height, width = (x.shape[-2] // f * self.vae_scale_factor, x.shape[-1] // f * self.vae_scale_factor)
        original_size, target_size = original_size or (height, width), target_size or (height, width)
        time_ids = self._time_ids(original_size, crops_coords_top_left, target_size, aesthetic_score)
        # diffusers pairs the negative sizes with the positive crop corner where there is no aesthetic score
        negative_time_ids = self._time_ids(
            negative_original_size or original_size,
            negative_crops_coords_top_left if self.requires_aesthetics_score else crops_coords_top_left,
            negative_target_size or target_size, negative_aesthetic_score)
        watch = _FiniteWatch(not allow_nan, num_inference_steps)
        with self._backend_scope(), self._adapters().lock.shared():  # no adapter switch mid-generation
            embeds, added, count = self._conditioning_xl(
                prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, guidance_scale,
                clip_skip, time_ids, negative_time_ids, watch)
            seeds = [None] * count
            if generator is None:  # one CPU generator for the encoder sample and the noise, from the seed
                base = random.randrange(2**31) if seed is None else int(seed)
                generator, seeds = torch.Generator().manual_seed(base), [base] * count
            gen = generator[0] if isinstance(generator, list) else generator
            if latent_input:
                init = x.to(self.device, self.dtype)
            else:
                vae_dtype = next(self.vae.parameters()).dtype
                init = self.vae.encode(self._layout(x.to(self.device, vae_dtype))).sample(gen).to(self.dtype)
                init = init * self.vae.config.scaling_factor
            init = init.repeat(count // x.shape[0], 1, 1, 1)  # each image encoded once, tiled as diffusers does
            latents = init
            if denoising_start is None:
                noise = torch.randn(init.shape, generator=gen, device=gen.device).to(self.device, self.dtype)
                latents = sched.add_noise(init, noise, timesteps[:1])
            watch.check(latents, "VAE encode")
            timesteps = self._cut_end(sched, timesteps, denoising_end)
            latents = self._denoise(sched, latents, timesteps, embeds, guidance_scale, guidance_rescale, gen, eta,
                                    callback_on_step_end, progress, watch, added)
            return PipelineOutput(self._decode(latents, output_type, watch), seeds)

    @staticmethod
    def _start_steps(sched, num_inference_steps: int, strength: float, denoising_start: float | None):
        """The timesteps left to run: the last ``strength`` of the schedule, or those below the cutoff of
        ``denoising_start`` (an odd count for second-order samplers, as diffusers), with the scheduler's
        begin index set to match. Refused when none is left."""
        if denoising_start is None:
            t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            t_start *= sched.order
        else:
            train = sched.config["num_train_timesteps"]
            n = int((sched.timesteps < int(round(train - denoising_start * train))).sum())
            if sched.order == 2 and n % 2 == 0:
                n += 1
            t_start = len(sched.timesteps) - n
        if t_start >= len(sched.timesteps):
            what = f"denoising_start {denoising_start}" if denoising_start is not None else f"strength {strength}"
            raise ValueError(f"{what} with {num_inference_steps} steps leaves no step to run")
        sched.set_begin_index(t_start)
        return sched.timesteps[t_start:]
