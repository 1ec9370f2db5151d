"""The worker of ``sdcore batch``: loads the pipeline once, then turns groups of images into PNG bytes.

The same class runs in-process for ``--engine local`` and as a Ray Data actor for ``--engine ray``, so both
make the same pipeline calls. A group is one pipeline call (see prompts.groups); the worker encodes each
image as ``sdcore generate`` would write it and returns the bytes, and the driver writes the files.

Determinism: image (line, index, seed) is ``sdcore generate PROMPT --seed SEED`` for its own seed. A group of
one image is exactly that call. A larger group passes one CPU generator per image, seeded as the pipeline
seeds image noise, so each image starts from its own seed's noise; batched convolutions and matmuls round
differently from single ones in the last bits, which is why groups are formed once, on the driver. Samplers
that draw noise at every step (euler-a) take one generator for the whole call, so their groups run one
image per call."""
from __future__ import annotations

import io
import json

STOCHASTIC = ("euler-a",)  # samplers whose steps draw noise: never batched


class Worker:
    """``Worker(config)(batch)``: ``batch["group"]`` holds JSON lists of image dicts; returns one row per
    image: ``name``, ``png`` (empty on failure), ``parameters``, ``error``."""

    def __init__(self, config: dict):
        import torch

        from .. import cli

        self.config = config
        if config["device"] == "cpu" and config.get("threads"):
            torch.set_num_threads(config["threads"])  # CPU results depend on the thread count: pin it
        self.pipe = cli.load_pipeline(config["model"], config["arch"], config["device"],
                                      cli._dtype(config["dtype"]), config["backend"], vae=config.get("vae"),
                                      vae_tiling=config.get("vae_tiling", False),
                                      cuda_graphs=config.get("cuda_graphs", True))
        self.model_scheduler = self.pipe.scheduler  # the model's own, for groups without --scheduler
        self.adapters: dict[str, str] = {}  # LoRA path -> adapter name

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [self.generate(json.loads(g)) for g in batch["group"]]
        rows = [r for group in rows for r in group]
        return {key: np.array([r[key] for r in rows], dtype=object) for key in ("name", "png", "parameters", "error")}

    # ------------------------------------------------------------------------------------------ one group
    def generate(self, group: list[dict]) -> list[dict]:
        """A group's images; a group that fails is retried image by image, so one bad image (a NaN, say)
        fails alone."""
        try:
            return self._run(group)
        except Exception as exc:
            if len(group) == 1:
                return [{"name": group[0]["name"], "png": b"", "parameters": "",
                         "error": f"{type(exc).__name__}: {exc}".replace(
                             "allow_nan=True (sdcore generate --allow-nan)", "--allow-nan")}]
        return [row for image in group for row in self.generate([image])]

    def _run(self, group: list[dict]) -> list[dict]:
        import torch

        from .. import outputs, schedulers

        first = group[0]
        pipe = self.pipe
        lora_settings = self._set_loras(first["lora"])
        if first["scheduler"]:
            pipe.set_scheduler(first["scheduler"])
        else:
            pipe.scheduler = self.model_scheduler
        sampler = first["scheduler"] or schedulers.name_of(pipe.scheduler)
        if len(group) > 1 and sampler in STOCHASTIC:
            return [row for image in group for row in self._run([image])]
        width, height = first["size"] or (None, None)
        common = dict(num_inference_steps=first["steps"], guidance_scale=first["guidance"], height=height,
                      width=width, progress=False, allow_nan=self.config["allow_nan"])
        if len(group) == 1:  # exactly `sdcore generate PROMPT --seed SEED`'s call
            result = pipe(first["prompt"], negative_prompt=first["negative_prompt"], seed=first["seed"],
                          **common)
        else:
            result = pipe([i["prompt"] for i in group], negative_prompt=[i["negative_prompt"] or "" for i in group],
                          generator=[torch.Generator().manual_seed(i["seed"]) for i in group], **common)
        rows = []
        for image, picture in zip(group, result.images):
            settings = outputs.generation_settings(
                steps=image["steps"], sampler=sampler, guidance=image["guidance"], seed=image["seed"],
                size=picture.size, model=self.config["model"] or "embedded " + self.config["arch"],
                extra=lora_settings)
            text = outputs.parameters_text(image["prompt"], image["negative_prompt"], settings)
            png = io.BytesIO()
            outputs.encode(picture, "PNG", text, png)
            rows.append({"name": image["name"], "png": png.getvalue(), "parameters": text, "error": ""})
        return rows

    def _set_loras(self, loras: list) -> dict:
        """Exactly the group's LoRAs active, in its order, with its weights (merged from the original weights,
        so the result is the same whatever ran before); the settings entries sdcore generate records."""
        from .. import lora, outputs

        for path, weight in loras:
            if path not in self.adapters:
                self.adapters[path] = self.pipe.load_lora_weights(path, weight=weight)
        if not self.adapters:
            return {}
        names = [self.adapters[path] for path, _ in loras]
        self.pipe.set_adapters(names, [weight for _, weight in loras])
        if not loras:
            return {}
        state = lora.state(self.pipe)
        hashes = ", ".join(f"{n}: {state.adapters[n].sha256[:12]}" for n in names)
        weights = ", ".join(f"{n}: {w:g}" for n, (_, w) in zip(names, loras))
        return {"Lora hashes": outputs.Quoted(hashes), "Lora weights": outputs.Quoted(weights)}


def encode_group(images) -> str:
    """A group as the JSON text a Ray row (or the local engine) carries to a worker."""
    return json.dumps([dict(vars(i), name=i.name) for i in images])
