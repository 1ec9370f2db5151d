"""Text-to-image and image-to-image with Stable Diffusion 1.x / 2.x, step for step what diffusers'
StableDiffusionPipeline does, on sdcore's models (the loop, guidance, seeds and decode: sdcore.pipelines.base).

Prompts longer than CLIP's 77 tokens are truncated, as diffusers does, with a warning that names the
dropped words."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from .. import loading
from ..args import checked
from ..models import AutoencoderKL, UNet2DConditionModel, load_text_encoder
from ..models.text_encoder import build_text_encoder
from .base import (DiffusionPipeline, PipelineOutput, _FiniteWatch, _image_tensor, _prompt_list,
                   _scheduler_from_config, _scheduler_from_folder)


class StableDiffusionPipeline(DiffusionPipeline):
    """``pipe = StableDiffusionPipeline.from_pretrained(dir)``; ``pipe("a photo of a cat").images[0]``."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, backend: str | None = None,
                 cuda_graphs: bool = True):
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = \
            unet, vae, text_encoder, tokenizer, scheduler
        self._setup(backend, cuda_graphs)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, backend: str | None = None, variant: str | None = None):
        """A diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
        offline; ``variant="fp16"`` reads the *.fp16.safetensors files."""
        path = Path(path)
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path}: no model_index.json (expected a diffusers-format Stable Diffusion "
                                    "folder; for a single .safetensors/.ckpt file use from_single_file)")
        loading.read_json(path / "model_index.json")  # only checked: the component folders are fixed names
        for part in ("unet", "vae", "text_encoder", "scheduler"):
            if not (path / part).is_dir():
                raise FileNotFoundError(f"{path / part}: missing component folder")
        # The small files first, so a broken config fails before seconds of weights loading.
        scheduler = _scheduler_from_folder(path)
        tokenizer = loading.load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else \
            loading.default_tokenizer()
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, device=device,
                                                    dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, device=device, dtype=dtype)
        text_encoder = load_text_encoder(path, subfolder="text_encoder", device=device, dtype=dtype,
                                         variant=variant)
        pipe = cls(unet, vae, text_encoder, tokenizer, scheduler, backend=backend)
        pipe.vae_source = str(path / "vae")
        return pipe

    @classmethod
    def from_single_file(cls, path, device=None, dtype=None, backend: str | None = None,
                         prediction_type: str | None = None, use_ema: bool = False, state: dict | None = None,
                         **detect_overrides):
        """An original LDM/CompVis checkpoint (.safetensors, or .ckpt read with weights_only=True), SD 1.x or
        2.x, the model type inferred from its tensors (see sdcore.loading.single_file); the tokenizer is the bundled
        CLIP BPE. ``use_ema`` takes the model_ema.* UNet of a full training checkpoint instead of the live
        weights (diffusers' and A1111's default is the live ones); ``state``: the file's tensors when already
        read. SD 2.x files without a global_step are
        taken as v-prediction: pass ``prediction_type="epsilon"`` for the 512-px base models. What the tensors
        don't say (heads, norm groups) follows SD's configs; ``detect_overrides`` (num_heads, head_channels,
        unet_overrides, vae_overrides, text_overrides) are for checkpoints that differ."""
        from ..loading import single_file

        parts = single_file.load_components(path, prediction_type=prediction_type, use_ema=use_ema, state=state,
                                            **detect_overrides)
        unet = loading.build_empty(UNet2DConditionModel, parts["unet_config"])
        loading.load_weights(unet, parts["unet_state"], f"{path} (UNet)")
        vae = loading.build_empty(AutoencoderKL, parts["vae_config"])
        loading.load_weights(vae, parts["vae_state"], f"{path} (VAE)")
        text_encoder = build_text_encoder(parts["text_config"], parts["text_state"], source=f"{path} (text encoder)")
        scheduler = _scheduler_from_config(parts["scheduler_config"], path)
        pipe = cls(unet.eval(), vae.eval(), text_encoder, loading.default_tokenizer(), scheduler, backend=backend)
        return pipe.to(device, dtype)

    # ------------------------------------------------------------------------------------------ prompts
    def _embed(self, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
        enc = self.text_encoder
        ids = ids.to(enc.device)
        if clip_skip is None:
            return enc(ids)[0]
        # The (clip_skip + 1)-th last layer's hidden states, through the final LayerNorm.
        hidden = enc(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return getattr(enc, "text_model", enc).final_layer_norm(hidden)  # transformers 5 dropped .text_model

    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, guidance: bool = True,
                      clip_skip: int | None = None) -> torch.Tensor:
        """[uncond; cond] text embeddings (cond only without guidance), each prompt repeated per image.
        As in diffusers, clip_skip applies to the prompt, not to the negative prompt."""
        prompts = _prompt_list("prompt", prompt)
        cond = self._embed(self._tokens(prompts), clip_skip)
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
        if not guidance:
            return cond
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _prompt_list("negative_prompt", negative_prompt)
            negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        uncond = self._embed(self._tokens(negatives), None).repeat_interleave(num_images_per_prompt, dim=0)
        return torch.cat([uncond, cond])

    def _conditioning(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale, clip_skip, watch):
        """The UNet's text embeddings in the pipeline's dtype, and how many images they make. Guidance is on
        when guidance_scale > 1, as in diffusers."""
        guidance = guidance_scale > 1.0
        embeds = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance, clip_skip)
        watch.check(embeds, "text encoder")
        return embeds.to(self.dtype), embeds.shape[0] // (2 if guidance else 1)

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, seed: int | None = None,
                 latents: torch.Tensor | None = None, clip_skip: int | None = None, output_type: str = "pil",
                 callback_on_step_end=None, progress: bool = True, allow_nan: bool = False) -> PipelineOutput:
        """Text to image. Guidance is on when guidance_scale > 1 (one UNet call on [uncond; cond] per step).
        Every argument is checked before any work. A NaN/Inf in any component's output raises
        :class:`NonFiniteError` naming the component and step, unless ``allow_nan``."""
        n_prompts, sched = self._check_call(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, seed=seed, clip_skip=clip_skip,
            output_type=output_type)
        height, width = self._size(height, width)
        count = n_prompts * num_images_per_prompt
        shape = self._latent_shape(count, height, width, latents, generator)
        watch = _FiniteWatch(not allow_nan, num_inference_steps)
        with self._backend_scope(), self._adapters().lock.shared():  # no adapter switch mid-generation
            embeds, count = self._conditioning(prompt, negative_prompt, num_images_per_prompt, guidance_scale,
                                               clip_skip, watch)
            latents, step_generator, seeds = self._start_latents(latents, shape, count, generator, seed)
            latents = latents * sched.init_noise_sigma
            latents = self._denoise(sched, latents, sched.timesteps, embeds, guidance_scale, guidance_rescale,
                                    step_generator, eta, callback_on_step_end, progress, watch)
            return PipelineOutput(self._decode(latents, output_type, watch), seeds)



class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image to image: encode the image, noise it to ``strength`` of the schedule, denoise the rest."""

    @classmethod
    def from_pipe(cls, pipe: StableDiffusionPipeline) -> "StableDiffusionImg2ImgPipeline":
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, backend=pipe.backend,
                   cuda_graphs=pipe.cuda_graphs)

    @torch.no_grad()
    def __call__(self, prompt, image, strength: float = 0.8, negative_prompt=None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, num_images_per_prompt: int = 1,
                 eta: float = 0.0, generator=None, seed: int | None = None, clip_skip: int | None = None,
                 output_type: str = "pil", callback_on_step_end=None, progress: bool = True,
                 allow_nan: bool = False) -> PipelineOutput:
        """Image to image: ``strength`` of the schedule is redone on the encoded ``image``. Arguments and
        NaN/Inf are checked as in text to image."""
        n_prompts, sched = self._check_call(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, seed=seed, clip_skip=clip_skip,
            output_type=output_type)
        strength = checked("strength", "strength", strength)
        if int(num_inference_steps * strength) == 0:
            raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run "
                             f"(strength x steps must be at least 1)")
        x = _image_tensor(image, self.vae_scale_factor)
        count = n_prompts * num_images_per_prompt
        if count % x.shape[0]:
            raise ValueError(f"image: {x.shape[0]} images for {count} outputs")
        watch = _FiniteWatch(not allow_nan, num_inference_steps)
        with self._backend_scope(), self._adapters().lock.shared():  # no adapter switch mid-generation
            embeds, count = self._conditioning(prompt, negative_prompt, num_images_per_prompt, guidance_scale,
                                               clip_skip, watch)
            x = x.to(self.device, self.dtype)
            t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            timesteps = sched.timesteps[t_start * sched.order:]
            sched.set_begin_index(t_start * sched.order)

            seeds = [None] * count
            if generator is None:  # one CPU generator for the encoder sample and the noise, from the seed
                base = random.randrange(2**31) if seed is None else int(seed)
                generator, seeds = torch.Generator().manual_seed(base), [base] * count
            gen = generator[0] if isinstance(generator, list) else generator
            init = self.vae.encode(self._layout(x)).sample(gen) * self.vae.config.scaling_factor
            init = init.repeat(count // x.shape[0], 1, 1, 1)  # each image encoded once, tiled as diffusers does
            noise = torch.randn(init.shape, generator=gen, device=gen.device).to(self.device, self.dtype)
            latents = sched.add_noise(init, noise, timesteps[:1])
            watch.check(latents, "VAE encode")
            latents = self._denoise(sched, latents, timesteps, embeds, guidance_scale, guidance_rescale, gen, eta,
                                    callback_on_step_end, progress, watch)
            return PipelineOutput(self._decode(latents, output_type, watch), seeds)
