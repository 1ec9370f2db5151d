"""The worker's side: the loaded model, its LoRAs and options, and running a Plan on them.

Only the worker thread calls Engine.run and Engine.set_options, so the model switch, the LoRA merges and
set_scheduler never race a generation. Each image is made as ``sdcore generate`` makes it (the same
pipeline call, seed for seed) and carries the same ``parameters`` text, so an image from the server and one
from the command line with the same settings are the same pixels and say the same thing."""
from __future__ import annotations

import base64
import gc
import io
import json
import time
from pathlib import Path

from .. import outputs
from . import files, options as opts
from .requests import Invalid, Plan, error


def preview(latents) -> str | None:
    """A base64 PNG of the first latent through A1111's cheap linear latent-to-RGB approximation (SD 1.x/2.x
    latents; no VAE call, so /progress stays instant)."""
    import torch
    from PIL import Image

    if latents is None or latents.ndim != 4 or latents.shape[1] != 4:
        return None
    coefs = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                          [-0.184, -0.271, -0.473]])
    rgb = torch.einsum("lxy,lr->xyr", latents[0].detach().float().cpu(), coefs)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Engine:
    """The model the server runs. ``model``/``arch``: the start-up model (sdcore serve --model/--arch);
    ``models_dir``/``lora_dir``: what requests may switch to; ``outdir``: where save_images writes."""

    def __init__(self, *, model=None, arch="tiny", models_dir=None, lora_dir=None, device="cpu", dtype=None,
                 backend=None, outdir=None, cuda_graphs=True):
        self.arch, self.device, self.dtype, self.backend = arch, device, dtype, backend
        self.cuda_graphs = cuda_graphs
        self.models_dir = Path(models_dir) if models_dir else None
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.outdir = Path(outdir) if outdir else None
        self.model = model
        self.pipe, self.title, self.loras = None, None, ()
        self.options = dict(opts.DEFAULTS)
        self.options["sd_model_checkpoint"] = self._startup().title

    # ------------------------------------------------------------------------------------------ models
    def _startup(self) -> files.Entry:
        if self.model is not None:
            path = Path(self.model)
            return files.Entry(path.name, path.stem if path.is_file() else path.name, path)
        found = files.models(self.models_dir)
        return found[0] if found else files.Entry(f"embedded {self.arch}", f"embedded {self.arch}", None)

    def entries(self) -> list[files.Entry]:
        """The start-up model first, then --models-dir's (GET /sdapi/v1/sd-models)."""
        startup = self._startup()
        return [startup, *(e for e in files.models(self.models_dir) if e != startup)]

    def find_model(self, name: str) -> str:
        return files.find(self.entries(), name, "model").title

    def label(self, entry: files.Entry) -> str:
        """The ``Model`` setting of an image: what `sdcore generate --model` would be given for it."""
        if entry.path is None:
            return entry.title
        return self.model if entry == self._startup() and self.model is not None else str(entry.path)

    def ensure(self, title: str) -> files.Entry:
        """Load the model ``title`` unless it is the loaded one (the old one is freed first)."""
        from ..cli import load_pipeline

        entry = next(e for e in self.entries() if e.title == title)
        if self.title == title:
            return entry
        self.pipe, self.title, self.loras = None, None, ()
        gc.collect()
        path = entry.path
        if path is not None and self.models_dir is not None and entry != self._startup():
            path = files.checked_path(entry, self.models_dir)
        try:
            self.pipe = load_pipeline(None if path is None else str(path), self.arch, self.device, self.dtype,
                                      self.backend, cuda_graphs=self.cuda_graphs)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise Invalid([error("sd_model_checkpoint", f"{title}: can't be loaded ({exc})", title)]) from None
        self.title = title
        return entry

    def set_options(self, changes: dict) -> None:
        if "sd_model_checkpoint" in changes:
            self.ensure(changes["sd_model_checkpoint"])
        self.options.update(changes)

    def _apply_loras(self, loras) -> dict:
        """Merge the plan's LoRAs (kept merged while the next request asks for the same ones); the settings
        entries that record them, as `sdcore generate --lora` writes them."""
        key = tuple((str(entry.path), weight) for entry, weight in loras)
        if key != self.loras:
            self.pipe.unload_lora_weights()
            self.loras = ()
            try:
                for entry, weight in loras:
                    self.pipe.load_lora_weights(str(files.checked_path(entry, self.lora_dir)),
                                                adapter_name=entry.name, weight=weight)
            except (OSError, ValueError, KeyError) as exc:
                self.pipe.unload_lora_weights()
                raise Invalid([error("prompt", f"LoRA can't be loaded: {exc}", None)]) from None
            self.loras = key
        if not loras:
            return {}
        hashes = ", ".join(f"{e.name}: {files.sha256(e.path)[:12]}" for e, _ in loras)
        weights = ", ".join(f"{e.name}: {w:g}" for e, w in loras)
        return {"Lora hashes": outputs.Quoted(hashes), "Lora weights": outputs.Quoted(weights)}

    # ------------------------------------------------------------------------------------------ running
    def run(self, plan: Plan, job) -> dict:
        from ..pipelines import StableDiffusionImg2ImgPipeline

        entry = self.ensure(plan.checkpoint)
        extra = self._apply_loras(plan.loras)
        if plan.clip_skip:
            extra["Clip skip"] = plan.clip_skip + 1
        if plan.eta:
            extra["Eta DDIM"] = plan.eta
        self.pipe.set_scheduler(plan.scheduler)
        img2img = plan.kind == "img2img"
        pipe = StableDiffusionImg2ImgPipeline.from_pipe(self.pipe) if img2img else self.pipe
        # txt2img: n_iter batches of batch_size images, image i of the request from seed + i (the pipeline's
        # seed + i within a batch). img2img draws a batch from one generator, so each image is its own call
        # on seed + i: every image is `sdcore generate --init-image ... --seed <its seed>`.
        per = 1 if img2img else plan.batch_size
        units = [(plan.seed + k * per, per) for k in range(plan.batch_size * plan.n_iter // per)]
        job.job_count = len(units)

        def callback(_pipe, i, t, tensors):
            job.step, job.latents = i + 1, tensors["latents"]
            job.check_stop()  # interrupt / skip: sdcore.StopDenoising ends the loop after this step
            return {}

        images, seeds = [], []
        for k, (seed, n) in enumerate(units):
            if job.interrupted:  # as A1111: the batches after an interrupt don't run; a skip ends only one
                break
            job.job_no, job.step, job.skipped = k, 0, False
            job.steps = min(int(plan.steps * plan.strength), plan.steps) if img2img else plan.steps
            common = dict(negative_prompt=plan.negative_prompt, num_inference_steps=plan.steps,
                          guidance_scale=plan.cfg_scale, num_images_per_prompt=n, seed=seed, eta=plan.eta,
                          clip_skip=plan.clip_skip, callback_on_step_end=callback, progress=False)
            try:
                if img2img:
                    result = pipe(plan.clean_prompt, plan.init_image, strength=plan.strength, **common)
                else:
                    result = pipe(plan.clean_prompt, height=plan.height, width=plan.width, **common)
            except (ValueError, TypeError) as exc:  # what the pipeline refuses before any work
                raise Invalid([error([], str(exc))]) from None
            # A1111 decodes and returns an interrupted batch as it stands; so does the pipeline on StopDenoising.
            images += result.images
            seeds += result.seeds
        job.latents = None
        if plan.options_after:
            self.options.update(plan.options_after)
        return self._response(plan, entry, extra, images, seeds, job.interrupted)

    def _response(self, plan: Plan, entry, extra: dict, images, seeds, interrupted: bool) -> dict:
        texts, encoded = [], []
        for image, seed in zip(images, seeds):
            settings = outputs.generation_settings(
                steps=plan.steps, sampler=plan.scheduler, guidance=plan.cfg_scale, seed=seed, size=image.size,
                model=self.label(entry), strength=plan.strength, extra=extra)
            text = outputs.parameters_text(plan.prompt, plan.negative_prompt, settings)
            texts.append(text)
            if plan.send_images:
                buf = io.BytesIO()
                outputs.encode(image, "PNG", text, buf)
                encoded.append(base64.b64encode(buf.getvalue()).decode())
            if plan.save_images:
                self._save(image, seed, text)
        n = len(images)
        info = {
            "prompt": plan.prompt, "all_prompts": [plan.prompt] * n, "negative_prompt": plan.negative_prompt,
            "all_negative_prompts": [plan.negative_prompt] * n, "seed": plan.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": plan.width,
            "height": plan.height, "sampler_name": plan.sampler_name, "scheduler": plan.scheduler,
            "cfg_scale": plan.cfg_scale, "steps": plan.steps, "batch_size": plan.batch_size,
            "restore_faces": False, "sd_model_name": entry.name, "sd_model_hash": None,
            "denoising_strength": plan.strength, "clip_skip": (plan.clip_skip or 0) + 1,
            "extra_generation_params": {k: str(v) for k, v in extra.items()}, "index_of_first_image": 0,
            "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "is_using_inpainting_conditioning": False, "interrupted": interrupted,
            "version": f"sdcore {__import__('sdcore').__version__}"}
        return {"images": encoded, "parameters": plan.parameters, "info": json.dumps(info)}

    def _save(self, image, seed: int, text: str) -> None:
        """A1111's file names, NNNNN-SEED.png, numbered after the files already there; written atomically and
        never over an existing file."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        number = len(list(self.outdir.glob("*.png")))
        while True:
            try:
                outputs.save(image, self.outdir / f"{number:05d}-{seed}.png", text)
                return
            except FileExistsError:
                number += 1
