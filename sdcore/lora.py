"""LoRA and LyCORIS adapters on a pipeline's models (the formats are in sdcore.lora_formats).

Adapters are merged into the weights, in place: each touched weight keeps its storage (``param.data.copy_``;
its ``data_ptr()`` never changes), so captured CUDA graphs and compiled modules stay valid, and a generation
with adapters runs the same modules and ops as one without. The original value of every touched weight is
kept (on the weight's device, in its dtype); every change recomputes W = W0 + Σ wᵢ ΔWᵢ from it in float32 and
casts once, so unloading is bitwise back to W0 and a thousand weight changes drift by nothing.

Loading is atomic: the whole file is read, every key mapped onto a module and every shape checked before any
weight changes. Generations hold the state's readers–writer lock shared (many may run at once) and
load/set/delete/unload hold it exclusively, so a switch waits for the running generations and a generation
never sees a half-merged model.

The state belongs to the models (it is kept on the UNet object), so every pipeline built on the same models
(``StableDiffusionImg2ImgPipeline.from_pipe``) shares the adapters and the lock."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from pathlib import Path

import torch
from torch import nn

from . import lora_formats as formats
from .args import checked

log = logging.getLogger("sdcore")

# Pipeline attributes that adapters can target (SDXL adds text_encoder_2).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_STATE_ATTR = "_sdcore_lora_state"
_state_lock = threading.Lock()


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers (no writer starvation). A thread
    holding it shared that asks for it exclusively (a callback switching adapters mid-generation) gets an
    error instead of a deadlock."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: int | None = None
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer == me or self._readers.get(me):  # re-entrant for its holder
                self._readers[me] = self._readers.get(me, 0) + 1
            else:
                self._cond.wait_for(lambda: self._writer is None and not self._writers_waiting)
                self._readers[me] = 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._cond:
            if self._readers.get(me):
                raise RuntimeError("adapters can't be changed from inside a generation of the same pipeline "
                                   "(e.g. from callback_on_step_end): it would wait for itself")
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: self._writer is None and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


def check_weight(weight, name: str = "weight") -> float:
    return checked("lora_weight", name, weight)


def file_hash(path) -> str:
    """sha256 of the whole file, hex (sdcore's 'Lora hashes' record its first 12 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ldm_names(unet: nn.Module) -> dict[str, list[str]]:
    """A UNet's modules under their original LDM/SGM names (``input_blocks.4.1.proj_in``, ``middle_block.0.
    in_layers.2``...), by diffusers name: kohya's SDXL files use those. From the single-file loader's table."""
    from .loading import ldm

    try:
        rows = ldm.unet_table(dict(unet.config))
    except (AttributeError, KeyError, TypeError, ValueError):  # not a UNet the table knows: no aliases
        return {}
    names: dict[str, list[str]] = {}
    for src, dst, _ in rows:
        if src.endswith(".weight") and dst.endswith(".weight"):
            names.setdefault(dst[:-len(".weight")], []).append(src[:-len(".weight")])
    return names


def _module_names(model: nn.Module, text: bool) -> dict[str, str]:
    """Every name a file may use for a Linear/Conv2d of ``model`` -> its dotted name: the dotted name itself
    and kohya's form (dots as underscores). A text encoder's names are also known with and without
    transformers' ``text_model.`` prefix (which CLIPTextModel had before transformers 5); a UNet's also by
    their original LDM/SGM names (SDXL's kohya files)."""
    names = {}
    ldm_names = {} if text else _ldm_names(model)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        aliases = [name] + ldm_names.get(name, [])
        if text:
            aliases.append(name[len("text_model."):] if name.startswith("text_model.") else "text_model." + name)
        for alias in aliases:
            names[alias] = name
            names[alias.replace(".", "_")] = name
    return names


def _fits(delta_shape, shape) -> bool:
    """ΔW can be written into a weight of ``shape``: equal, or the same numbers with 1x1 kernel dimensions
    dropped or added (a Linear LoRA on SD 1.x's 1x1-conv proj_in), or with the kernel flattened into the
    input dimension (LoHa/LoKr conv factors without Tucker)."""
    delta_shape, shape = tuple(delta_shape), tuple(shape)
    if delta_shape == shape:
        return True
    if delta_shape[0] != shape[0] or torch.Size(delta_shape).numel() != torch.Size(shape).numel():
        return False
    return all(k == 1 for k in delta_shape[2:])


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


class Adapter:
    """One loaded file: its ``targets`` ((component, module) -> groups) and where it came from."""

    def __init__(self, name: str, targets: dict, source: str, sha256: str | None):
        self.name, self.targets, self.source, self.sha256 = name, targets, source, sha256


class LoraState:
    """The adapters of one set of models; see the module docstring."""

    def __init__(self):
        self.lock = ReadWriteLock()
        self.adapters: dict[str, Adapter] = {}
        self.active: dict[str, float] = {}
        self.modules: dict[tuple[str, str], nn.Module] = {}
        self.originals: dict[tuple[str, str], torch.Tensor] = {}
        self._names: dict[int, dict[str, str]] = {}
        self._counter = 0

    # ------------------------------------------------------------------------------------------ parsing
    def _names_for(self, component: str, model: nn.Module) -> dict[str, str]:
        key = id(model)
        if key not in self._names:
            self._names[key] = _module_names(model, text=component.startswith("text_encoder"))
        return self._names[key]

    def prepare(self, pipe, tensors: dict, source: str, strict: bool):
        """Map every group of ``tensors`` onto ``pipe``'s modules and check every shape; nothing changes.
        Returns ({(component, module): [group, ...]}, unknown keys)."""
        groups, unknown = formats.group(tensors, source)
        targets: dict[tuple[str, str], list] = {}
        for g in groups:
            model = getattr(pipe, g.component, None) if g.component in COMPONENTS else None
            if model is None:
                raise formats.LoraFormatError(
                    f"{source}: {g.key} targets the {g.component}, which this pipeline doesn't have (a LoRA for "
                    "another model type, e.g. SDXL?)")
            module_name = self._names_for(g.component, model).get(g.name)
            if module_name is None:
                unknown.extend(f"{g.key}.{role}" for role in g.tensors)
                continue
            module = model.get_submodule(module_name)
            want, got = tuple(module.weight.shape), g.delta_shape()
            if not _fits(got, want):
                raise ValueError(
                    f"{source}: {g.key}: the adapter's update is {_shape(got)} but {g.component}.{module_name}"
                    f".weight is {_shape(want)}; this LoRA was made for another base model (e.g. SD 2.x vs "
                    "SD 1.x, or SDXL's 2048: cross-attention to_k/to_v take 1024 vs 768 text features). Nothing "
                    "was changed")
            targets.setdefault((g.component, module_name), []).append(g)
        if unknown:
            shown = ", ".join(sorted(unknown)[:5])
            message = f"{source}: {len(unknown)} key(s) match no module of this pipeline or no known format: {shown}"
            if strict:
                raise ValueError(message + " (strict=True)")
            log.warning("%s%s; they are ignored", message, ", ..." if len(unknown) > 5 else "")
        if not targets:
            raise formats.LoraFormatError(f"{source}: no key of this file targets a module of this pipeline; "
                                          "is it a LoRA for Stable Diffusion 1.x/2.x or SDXL?")
        for (component, module_name), gs in targets.items():  # factors live on the weight's device
            device = self.module(pipe, component, module_name).weight.device
            for g in gs:
                g.tensors = {k: v.to(device) for k, v in g.tensors.items()}
        return targets, unknown

    @staticmethod
    def module(pipe, component: str, module_name: str) -> nn.Module:
        return getattr(pipe, component).get_submodule(module_name)

    # ------------------------------------------------------------------------------------------ changes
    def load(self, pipe, source, adapter_name: str | None, weight: float, strict: bool) -> str:
        weight = check_weight(weight)
        if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
            raise TypeError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if isinstance(source, (str, Path)):
            path = Path(source)
            tensors, _ = formats.read_file(path)
            label, default, sha = str(path), path.stem, file_hash(path)
        elif isinstance(source, dict):
            if not all(isinstance(v, torch.Tensor) for v in source.values()):
                raise TypeError("load_lora_weights: a state dict must map names to tensors")
            tensors, label, default, sha = dict(source), "state dict", None, None
        else:
            raise TypeError(f"load_lora_weights takes a .safetensors path or a state dict, got "
                            f"{type(source).__name__}")
        targets, _ = self.prepare(pipe, tensors, label, strict)
        with self.lock.exclusive():
            if adapter_name is None and default is None:
                while f"default_{self._counter}" in self.adapters:
                    self._counter += 1
                default = f"default_{self._counter}"
            name = adapter_name or default
            if name in self.adapters:
                raise ValueError(f"adapter name {name!r} is already loaded (from {self.adapters[name].source}); "
                                 "pass another adapter_name, or delete_adapters it first")
            for key in targets:
                if key not in self.originals:
                    module = self.module(pipe, *key)
                    self.modules[key] = module
                    self.originals[key] = module.weight.detach().clone()
            self.adapters[name] = Adapter(name, targets, label, sha)
            self.active[name] = weight
            try:
                self._recompute(targets)
            except BaseException:  # e.g. out of memory mid-merge: put back what the others make, then raise
                del self.adapters[name], self.active[name]
                self._recompute(targets)
                raise
        return name

    def set_adapters(self, names, weights=None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapters: a name is given twice: {names}")
        if weights is None:
            weights = [1.0] * len(names)
        elif not isinstance(weights, (list, tuple)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(weights)} weights for {len(names)} adapters")
        weights = [check_weight(w, f"adapter_weights[{n!r}]") for n, w in zip(names, weights)]
        with self.lock.exclusive():
            self._check_names(names, "set_adapters")
            self.active = dict(zip(names, weights))
            self._recompute(self.originals)

    def delete(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        with self.lock.exclusive():
            self._check_names(names, "delete_adapters")
            touched = set()
            for name in names:
                touched |= set(self.adapters.pop(name).targets)
                self.active.pop(name, None)
            self._recompute(touched)
            still = set().union(*(a.targets for a in self.adapters.values()))
            for key in touched - still:
                del self.originals[key], self.modules[key]

    def unload(self) -> None:
        with self.lock.exclusive():
            self.adapters.clear()
            self.active.clear()
            self._recompute(self.originals)
            self.originals.clear()
            self.modules.clear()

    def _check_names(self, names, what: str) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"{what}: no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, self.adapters)) or 'none'}")

    @torch.no_grad()
    def _recompute(self, keys) -> None:
        """W = W0 + Σ wᵢ ΔWᵢ for each key, in float32 from the stored original, written into the weight's own
        storage; W0 exactly where no active adapter touches it."""
        for key in list(keys):
            param = self.modules[key].weight
            original = self.originals[key]
            parts = [(w, g) for name, w in self.active.items() if w != 0
                     for g in self.adapters[name].targets.get(key, ())]
            if not parts:
                param.data.copy_(original)
                continue
            if param.dtype == torch.float32:  # merge straight into the weight's storage
                param.data.copy_(original)
                merged = param.data
            else:  # half precision: merge in float32, cast once
                merged = original.to(torch.float32, copy=True)
            for w, g in parts:
                g.add_to(merged, w)
            if merged is not param.data:
                param.data.copy_(merged)


def state(pipe) -> LoraState:
    """The adapter state of ``pipe``'s models (created on first use, shared by pipelines on the same UNet)."""
    unet = pipe.unet
    found = unet.__dict__.get(_STATE_ATTR)
    if found is None:
        with _state_lock:
            found = unet.__dict__.get(_STATE_ATTR)
            if found is None:
                found = unet.__dict__[_STATE_ATTR] = LoraState()
    return found


# ---------------------------------------------------------------------------------------------- inspect
# What a targeted module is, by its (dotted) name's last parts.
_KINDS = (("attn", (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")),
          ("feed-forward", (".ff.net.0.proj", ".ff.net.2", ".mlp.fc1", ".mlp.fc2")),
          ("proj_in/out", (".proj_in", ".proj_out")),
          ("resnet conv", (".conv1", ".conv2", ".conv_shortcut")),
          ("resnet time_emb_proj", (".time_emb_proj",)),
          ("down/upsampler conv", (".downsamplers.0.conv", ".upsamplers.0.conv")),
          ("conv_in/out, time embedding", ("conv_in", "conv_out", "time_embedding.linear_1",
                                           "time_embedding.linear_2")))
# Widths that tell SD 1.x from SD 2.x (and SDXL): the text features the UNet's cross-attention reads, and the
# text encoder's hidden size.
_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _kind(name: str) -> str:
    for kind, endings in _KINDS:
        if name.endswith(endings):
            return kind
    return "other"


def _reference_names(arch: str) -> dict[str, dict[str, str]]:
    """Module names of the embedded ``arch`` (sd15 / sd21 / sdxl), built on the meta device (no memory,
    instant)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from . import embedded, loading
    from .models import UNet2DConditionModel

    cfg = embedded.CONFIGS[arch]
    unet = loading.build_empty(UNet2DConditionModel, cfg["unet"])
    with torch.device("meta"):
        names = {"unet": _module_names(unet, text=False),
                 "text_encoder": _module_names(CLIPTextModel(CLIPTextConfig(**cfg["text"])), text=True)}
        if "text_2" in cfg:
            names["text_encoder_2"] = _module_names(
                CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])), text=True)
    return names


def inspect(path) -> dict:
    """What ``sdcore lora inspect`` prints: format, likely base model, rank/alpha ranges, targets, unknown keys."""
    tensors, metadata = formats.read_file(path)
    groups, unknown = formats.group(tensors, str(path))
    styles = sorted({"kohya/A1111" if not g.dotted else "diffusers/PEFT" for g in groups})
    kinds = set()
    for g in groups:
        conv = len(g.delta_shape()) == 4
        kinds.add({"lora": "LoCon" if conv else "LoRA", "loha": "LoHa", "lokr": "LoKr"}[g.kind])
    widths = {}
    for g in groups:
        name = g.name.replace("_", ".") if not g.dotted else g.name
        shape = g.delta_shape()
        if g.component == "unet" and name.endswith(("attn2.to.k", "attn2.to_k")):
            widths.setdefault("cross-attention", set()).add(shape[1])
        elif g.component == "text_encoder" and name.endswith(("q.proj", "q_proj")):
            widths.setdefault("text encoder", set()).add(shape[1])
    xl = any(g.component == "text_encoder_2" for g in groups) or 2048 in widths.get("cross-attention", ())
    if xl:  # SDXL's first text encoder has SD 1.x's width: that is no evidence of SD 1.x
        widths.pop("text encoder", None)
    guesses = {_BASES.get(w, f"unknown ({w})") for ws in widths.values() for w in ws} or ({"SDXL"} if xl else set())
    base = ", ".join(sorted(guesses)) if guesses else "unknown (no cross-attention or text-encoder attention targeted)"
    arch = {frozenset({"SD 2.x"}): "sd21", frozenset({"SDXL"}): "sdxl"}.get(frozenset(guesses), "sd15")
    names = _reference_names(arch)
    targets: dict[str, dict[str, int]] = {}
    for g in groups:
        module = names.get(g.component, {}).get(g.name)
        if module is None:
            unknown.extend(f"{g.key}.{role}" for role in g.tensors)
            continue
        per = targets.setdefault(g.component, {})
        per[_kind(module)] = per.get(_kind(module), 0) + 1
    ranks = [g.rank() for g in groups if g.rank() is not None]
    alphas = [g.alpha for g in groups if g.alpha is not None]
    return dict(path=str(path), format=" + ".join(styles) + ": " + ", ".join(sorted(kinds)), base=base,
                widths={k: sorted(v) for k, v in widths.items()}, checked_against=arch,
                rank=(min(ranks), max(ranks)) if ranks else None,
                alpha=(min(alphas), max(alphas)) if alphas else None,
                targets=targets, modules=sum(sum(v.values()) for v in targets.values()),
                unknown=sorted(unknown), tensors=len(tensors), metadata_keys=sorted(metadata))


def report(info: dict) -> str:
    def span(pair):
        return "-" if pair is None else (f"{pair[0]:g}" if pair[0] == pair[1] else f"{pair[0]:g}..{pair[1]:g}")

    widths = "; ".join(f"{k} reads {', '.join(map(str, v))} features" for k, v in info["widths"].items())
    lines = [f"file        {info['path']} ({info['tensors']} tensors)",
             f"format      {info['format']}",
             f"base model  {info['base']}" + (f"  ({widths})" if widths else ""),
             f"rank        {span(info['rank'])} (per module)",
             f"alpha       {span(info['alpha'])} (per module; none = rank, scale 1)",
             f"modules     {info['modules']} matched in the embedded {info['checked_against']} architecture"]
    for component, kinds in info["targets"].items():
        lines.append(f"  {component:<14}" + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())))
    unknown = info["unknown"]
    lines.append(f"unknown     {len(unknown)} key(s)" + (": " + ", ".join(unknown[:10]) +
                                                        (", ..." if len(unknown) > 10 else "") if unknown else ""))
    return "\n".join(lines)
