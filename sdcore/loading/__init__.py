"""Loading what users have on disk, offline: diffusers-format model folders with strict checks, and the
CLIP tokenizer that SD 1.x and 2.x share, built from the BPE merges bundled in the package (sdcore/data,
MIT; see LICENSE-clip-bpe.txt), so no hub download is ever needed.

The parts: ``files`` reads JSON configs and weights files (and names what an unusable one is instead),
``single_file`` converts original LDM/CompVis SD 1.x / 2.x checkpoints and ``single_file_xl`` SDXL base and
refiner ones (Stability's SGM layout), both through ``ldm``'s renaming tables."""
from __future__ import annotations

import functools
import gzip
import sys
from importlib import resources
from pathlib import Path

import torch

from .files import check_config_types, read_json, read_state_dict

# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word ("</w>"), the first 48894 merges and the
# two special tokens: 49408 entries, with <|startoftext|> = 49406 and <|endoftext|> = 49407.
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's map from each byte to a printable character (as in GPT-2 and CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id map and merge list, from the bundled merges file."""
    data = resources.files("sdcore").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


def default_tokenizer(model_max_length: int = 77, pad_token: str = EOS):
    """A transformers ``CLIPTokenizer`` for SD 1.x / 2.x prompts, built offline from the bundled BPE. SDXL's
    second tokenizer (OpenCLIP's) pads with ``pad_token="!"`` instead of the end-of-text token."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token=EOS, bos_token=BOS,
                         eos_token=EOS, pad_token=pad_token, model_max_length=model_max_length)


TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "added_tokens.json",
                  "tokenizer.json")


def load_tokenizer(folder):
    """transformers' CLIPTokenizer from a diffusers tokenizer/ folder, offline. Its JSON files are read here
    first, so a broken one is named (transformers' own errors may not say which file)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    for name in TOKENIZER_JSON:
        if (folder / name).exists():
            read_json(folder / name)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 — transformers raises OSError, ValueError, TypeError...
        raise ValueError(f"{folder}: the CLIP tokenizer does not load ({type(exc).__name__}: {exc})") from exc


class Config(dict):
    """A model config: a dict that also reads as attributes (``vae.config.scaling_factor``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def find_weights(folder: Path, names: list[str], variant: str | None) -> Path:
    """The first of ``names`` (e.g. model.safetensors, pytorch_model.bin; with a variant, model.fp16.safetensors)
    in ``folder`` that exists, or a FileNotFoundError listing what was looked for."""
    if variant:  # diffusers' and transformers' naming: stem.variant.ext
        names = [f"{stem}.{variant}.{ext}" for stem, _, ext in (n.partition(".") for n in names)]
    candidates = [folder / n for n in names]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        sharded = sorted(p.name for p in folder.glob("*.index.json")) if folder.is_dir() else []
        hint = f"; sharded checkpoints ({', '.join(sharded)}) are not supported" if sharded else ""
        raise FileNotFoundError(f"{folder}: no weights file ({' or '.join(c.name for c in candidates)}){hint}")
    return found


# Floating-point weights must be stored as one of these: an int, bool, complex or float8 tensor where a
# float weight belongs would otherwise be silently cast (or assigned as is and fail far from the file).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _limited(label: str, items: list, sep: str = ", ", n: int = 10) -> str:
    return f"{label}: {sep.join(items[:n])}" + (" ..." if len(items) > n else "")


def load_weights(module: torch.nn.Module, state: dict, source) -> None:
    """Copy ``state`` into ``module``: every parameter present, nothing extra, every shape equal, float weights
    stored as float — or a ValueError naming ``source`` and the keys, raised before anything is assigned, so a
    module is never left half loaded."""
    if not isinstance(state, dict):
        raise ValueError(f"{source}: holds {type(state).__name__}, not a state dict of tensors")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: " + _limited("entries that are not tensors", not_tensors))
    own = module.state_dict()
    common = sorted(set(own) & set(state))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in common if state[k].shape != own[k].shape]
    bad_dtype = [f"{k}: file {str(state[k].dtype).removeprefix('torch.')} vs model "
                 f"{str(own[k].dtype).removeprefix('torch.')}" for k in common
                 if (state[k].dtype not in WEIGHT_DTYPES if own[k].is_floating_point() else state[k].dtype != own[k].dtype)]
    problems = []
    if missing:
        problems.append(_limited("missing tensors", missing))
    if unexpected:
        problems.append(_limited("unexpected tensors", unexpected))
    if wrong:
        problems.append(_limited("wrong shapes", wrong, "; "))
    if bad_dtype:
        problems.append(_limited("wrong dtypes", bad_dtype, "; "))
    if problems:
        raise ValueError(f"{source}: " + " | ".join(problems))
    # assign: a module built on the meta device (see build_empty) takes the loaded tensors themselves, so
    # they must have the dense layout a freshly built parameter has (converted ones can be views).
    module.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)


def build_empty(cls, config: dict):
    """``cls.from_config(config)`` with its parameters on the meta device: no memory and no random init, for a
    model whose every tensor is about to be loaded (an SD 1.5 UNet's init alone takes seconds)."""
    with torch.device("meta"):
        return cls.from_config(config)


def load_model(cls, path, subfolder=None, variant=None, device=None, dtype=None):
    """A diffusers-format model folder: config.json plus diffusion_pytorch_model[.variant].safetensors
    (or .bin). Never downloads."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing (expected a diffusers-format {cls.__name__} folder)")
    config = read_json(config_file)
    # sdcore's models keep diffusers' defaults in their module's DEFAULTS: the kinds the config's values must have.
    check_config_types(config, getattr(sys.modules[cls.__module__], "DEFAULTS", {}), config_file, per_block=True)
    weights = find_weights(folder, ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"], variant)
    try:
        model = build_empty(cls, config)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise ValueError(f"{config_file}: {exc}") from exc
    load_weights(model, read_state_dict(weights), weights)
    return model.to(device=device, dtype=dtype).eval()


class Pretrained:
    """``from_config`` / ``from_pretrained`` for a module built from diffusers' config.json keys."""

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, variant: str | None = None, device=None,
                        dtype=None):
        """A diffusers-format model folder: config.json + diffusion_pytorch_model[.variant].safetensors."""
        return load_model(cls, path, subfolder=subfolder, variant=variant, device=device, dtype=dtype)
