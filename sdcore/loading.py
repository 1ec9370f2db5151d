"""Loading what users have on disk, offline: diffusers-format model folders with strict checks, and the
CLIP tokenizer that SD 1.x and 2.x share, built from the BPE merges bundled in the package (sdcore/data,
MIT; see LICENSE-clip-bpe.txt), so no hub download is ever needed."""
from __future__ import annotations

import functools
import gzip
import json
import pickle
from importlib import resources
from pathlib import Path

import torch

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


def default_tokenizer(model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` for SD 1.x / 2.x prompts, built offline from the bundled BPE."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token=EOS, bos_token=BOS,
                         eos_token=EOS, pad_token=EOS, model_max_length=model_max_length)


class Config(dict):
    """A model config: a dict that also reads as attributes (``vae.config.scaling_factor``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def read_state_dict(path) -> dict:
    """Tensors of a .safetensors file (or a .bin/.ckpt through torch.load(weights_only=True)), with errors
    that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ValueError(f"{path}: corrupt or truncated weights file ({exc})") from exc
        # Training checkpoints can pickle arbitrary Python objects; unpickling those would run their code.
        raise ValueError(f"{path}: holds Python objects besides tensors, which sdcore does not unpickle (it loads "
                         "with weights_only=True, for safety). Convert the file to .safetensors with a tool you "
                         "trust, or re-save only its state_dict.") from exc
    except Exception as exc:  # noqa: BLE001 — any parse failure means the file is unusable
        raise ValueError(f"{path}: corrupt or truncated weights file ({type(exc).__name__}: {exc})") from exc


def load_weights(module: torch.nn.Module, state: dict, source) -> None:
    """Copy ``state`` into ``module``: every parameter present, nothing extra, every shape equal — or a
    ValueError naming ``source`` and the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:10])}")
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
    config = json.loads(config_file.read_text())
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    candidates = [folder / f"{stem}.safetensors", folder / f"{stem}.bin"]
    weights = next((c for c in candidates if c.exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no weights file ({' or '.join(c.name for c in candidates)})")
    model = build_empty(cls, config)
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
