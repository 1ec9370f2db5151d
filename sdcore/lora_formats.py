"""LoRA / LyCORIS file formats: reading a file, grouping its tensors per target module, and each format's
weight update ΔW (in float32). No model is touched here; sdcore.lora maps the groups onto a pipeline's
modules and merges them.

Formats and where their formulas come from (the public reference implementations; formulas re-derived, not
copied):

* LoRA (kohya/A1111 ``lora_down``/``lora_up``/``alpha``; diffusers/PEFT ``lora_A``/``lora_B``; diffusers'
  older ``.lora.down``/``.lora.up`` and ``processor.to_q_lora.down``): ΔW = up @ down * alpha / rank, rank =
  down.shape[0]; no alpha means alpha = rank (PEFT's and kohya's default scale 1). Conv (LoCon): down is
  [r, in, kh, kw], up [out, r, 1, 1], ΔW = (up.flatten(1) @ down.flatten(1)).reshape(out, in, kh, kw).
  ``lora_mid`` (LoCon's CP/Tucker form, [r, r, kh, kw]) gives
  ΔW[o, i, k, l] = Σ mid[a, b, k, l] up[o, a] down[b, i]
  (A1111 extensions-builtin/Lora/lyco_helpers.py rebuild_cp_decomposition).
* LoHa (LyCORIS lycoris/modules/loha.py, A1111 network_hada.py): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) * alpha / r,
  r = w1b.shape[0]; with Tucker cores t1/t2 ([r, r, kh, kw]) each factor is
  W[o, i, k, l] = Σ t[a, b, k, l] wa[a, o] wb[b, i]  (there wa is [r, out], wb [r, in]).
* LoKr (LyCORIS lycoris/modules/lokr.py, A1111 network_lokr.py make_kron): ΔW = kron(w1, w2) reshaped to the
  weight's shape (a 4-D w2 takes w1 as [o1, i1, 1, 1]); w1 = lokr_w1 or w1a @ w1b, w2 = lokr_w2, w2a @ w2b,
  or the Tucker form of t2/w2a/w2b as in LoHa. Scaled by alpha / r only when a factor is low-rank (r its
  rank, w1b's or w2b's first dimension); with both factors full the scale is 1 (LyCORIS sets alpha = dim).
* DoRA (``dora_scale``, PEFT's ``lora_magnitude_vector``) is refused: it rescales each output column by a
  learned norm, which a plain sum of deltas can't express, and ignoring it would give a wrong image."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

# Module-key prefixes of kohya/A1111 files -> the pipeline component they target. SDXL's te1/te2 are listed
# so that its second text encoder only needs a component named "text_encoder_2" on the pipeline.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}

# key suffix -> role of the tensor in its module's group (longest suffixes are tried first).
ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w2": "lokr_w2", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".dora_scale": "dora", ".lora_magnitude_vector": "dora", ".lora_magnitude_vector.weight": "dora",
}
_SUFFIXES = sorted(ROLES, key=len, reverse=True)
# diffusers' attention-processor LoRA names: <attn>.processor.to_q_lora.down.weight -> <attn>.to_q
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


class LoraFormatError(ValueError):
    """A LoRA file sdcore can't use (wrong container, DoRA, an incomplete module); the message says why."""


@dataclasses.dataclass
class Group:
    """The tensors of one target module: ``key`` as written in the file (without the role suffix),
    ``component`` (unet, text_encoder, ...) and the module ``name`` in that component's notation (kohya's
    underscores, or dotted), ``kind`` (lora, loha, lokr), and ``tensors`` by role."""

    key: str
    component: str
    name: str
    dotted: bool
    tensors: dict

    @property
    def kind(self) -> str:
        roles = set(self.tensors)
        if roles & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
            return "loha"
        if any(r.startswith("lokr_") for r in roles):
            return "lokr"
        return "lora"

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0])

    def rank(self) -> int | None:
        t = self.tensors
        for role in ("down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if role in t:
                return int(t[role].shape[0])
        return None

    def check_complete(self) -> None:
        need = {"lora": [("down", "up")], "loha": [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")],
                "lokr": [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")]}[self.kind]
        t = self.tensors
        if self.kind == "lokr":
            for full, low in need:
                if full not in t and not (low in t and low[:-1] + "b" in t):
                    raise LoraFormatError(f"{self.key}: LoKr module without {full} or {low}/{low[:-1]}b")
        else:
            missing = [r for r in need[0] if r not in t]
            if missing:
                raise LoraFormatError(f"{self.key}: {self.kind} module without {', '.join(missing)}")

    def delta_shape(self) -> tuple[int, ...]:
        """ΔW's natural shape from the factors' shapes alone (cheap: no product is formed)."""
        t = self.tensors
        if self.kind == "lora":
            down, up = t["down"], t["up"]
            kernel = tuple(t["mid"].shape[2:]) if "mid" in t else tuple(down.shape[2:])
            return (up.shape[0], down.shape[1], *kernel)
        if self.kind == "loha":
            if "hada_t1" in t:
                return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
            return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
        s1, s2 = _lokr_factor_shape(t, "1"), _lokr_factor_shape(t, "2")
        return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])

    def add_to(self, out: torch.Tensor, weight: float) -> None:
        """out += weight * ΔW, ``out`` a float32 weight-shaped tensor. A plain LoRA is one addmm into ``out``
        (no ΔW-sized temporary); the other forms build ΔW first."""
        t = self.tensors
        if self.kind == "lora" and "mid" not in t:
            rank, alpha = self.rank(), self.alpha
            scale = alpha / rank if alpha is not None else 1.0
            up = t["up"].to(out.device, torch.float32).flatten(1)
            down = t["down"].to(out.device, torch.float32).flatten(1)
            out.view(out.shape[0], -1).addmm_(up, down, alpha=weight * scale)
        else:
            out.add_(self.delta(out.device, out.shape), alpha=weight)

    def delta(self, device, shape) -> torch.Tensor:
        """ΔW in float32 on ``device``, reshaped to the target weight's ``shape``, with alpha/rank applied."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        rank, alpha = self.rank(), self.alpha
        if self.kind == "lora":
            up, down = t["up"].flatten(1), t["down"].flatten(1)
            if "mid" in t:
                d = torch.einsum("abkl,oa,bi->oikl", t["mid"], up, down)
            else:
                d = up @ down
        elif self.kind == "loha":
            if "hada_t1" in t:
                d = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * \
                    _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
            else:
                d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            d = torch.kron((w1[:, :, None, None] if w2.ndim == 4 else w1).contiguous(), w2.contiguous())
            if "lokr_w1" in t and "lokr_w2" in t:
                rank = None  # both factors full: scale 1
        scale = alpha / rank if (alpha is not None and rank) else 1.0
        return (d * scale).reshape(shape)


def _tucker(core, wa, wb):
    """W[o, i, k, l] = Σ core[a, b, k, l] wa[a, o] wb[b, i] (wa [r, out], wb [r, in])."""
    return torch.einsum("abkl,ao,bi->oikl", core, wa, wb)


def _lokr_factor_shape(t: dict, n: str) -> tuple[int, ...]:
    if f"lokr_w{n}" in t:
        return tuple(t[f"lokr_w{n}"].shape)
    a, b = t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"]
    if n == "2" and "lokr_t2" in t:
        return (a.shape[1], b.shape[1], *t["lokr_t2"].shape[2:])
    return (a.shape[0], b.shape[1])


def check_file(path) -> Path:
    """``path`` if it is an existing safetensors file (by suffix and by its first bytes), before any reading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    with open(path, "rb") as f:
        head = f.read(16)
    pickled = head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    if path.suffix.lower() != ".safetensors" or pickled:
        raise LoraFormatError(f"{path}: not a .safetensors file; sdcore reads LoRAs only as safetensors "
                              "(pickled .pt/.ckpt/.bin files can run code when loaded). Convert it with a "
                              "trusted tool first")
    return path


def read_file(path) -> tuple[dict, dict]:
    """The tensors and the string metadata of a LoRA ``.safetensors`` file; anything else is refused (a
    pickled .pt/.ckpt/.bin can run code when loaded)."""
    path = check_file(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def _split(key: str) -> tuple[str | None, str | None]:
    """(module key, role) of a tensor key, or (None, None) for a key no format here knows."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], ROLES[suffix]
    return None, None


def _locate(module_key: str) -> tuple[str, str, bool] | None:
    """(component, module name, dotted?) of a module key, or None."""
    for prefix, component in KOHYA_PREFIXES.items():
        if module_key.startswith(prefix):
            return component, module_key[len(prefix):], False
    for prefix, component in DIFFUSERS_PREFIXES.items():
        if module_key.startswith(prefix):
            name = module_key[len(prefix):]
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] == "processor" and parts[-1] in _PROCESSOR:
                name = ".".join(parts[:-2] + [_PROCESSOR[parts[-1]]])
            return component, name, True
    return None


def group(tensors: dict, source: str = "LoRA") -> tuple[list[Group], list[str]]:
    """The file's tensors grouped per target module, and the keys that belong to no known format/module.
    A DoRA tensor or an incomplete module raises LoraFormatError."""
    groups: dict[str, Group] = {}
    unknown = []
    for key, value in tensors.items():
        module_key, role = _split(key)
        where = _locate(module_key) if module_key is not None else None
        if where is None:
            unknown.append(key)
            continue
        if role == "dora":
            raise LoraFormatError(f"{source}: {key}: DoRA (weight-decomposed LoRA) is not supported by sdcore; "
                                  "its per-column magnitude can't be merged as a plain delta, and ignoring it "
                                  "would give a wrong image")
        g = groups.setdefault(module_key, Group(module_key, *where, tensors={}))
        g.tensors[role] = value
    for g in groups.values():
        if set(g.tensors) == {"alpha"}:  # an alpha with no weights: nothing to merge
            unknown.append(g.key + ".alpha")
            continue
        g.check_complete()
    return [g for g in groups.values() if set(g.tensors) != {"alpha"}], unknown

