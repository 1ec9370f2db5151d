"""Reading the files a model is made of, with errors that say what a file is when it is unusable: JSON
configs (read_json, check_config_types) and weights files (read_state_dict: safetensors, or torch.save
checkpoints through torch.load(weights_only=True)), each checked against the file's real size before a
parser trusts any size the file claims."""
from __future__ import annotations

import contextlib
import json
import math
import pickle
from pathlib import Path

import torch


# ---------------------------------------------------------------------------------------------- JSON configs
def read_json(path) -> dict:
    """A JSON object from ``path`` (a config.json, model_index.json, scheduler_config.json...): a file that is
    missing, not UTF-8, not valid JSON or not an object is an error naming it, with the line and column."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a JSON file") from None
    hint = _not_json_hint(raw)
    if hint:
        raise ValueError(f"{path}: {hint}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}), so not a JSON config") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}), found {_kind(data)}")
    return data


def _not_json_hint(raw: bytes) -> str | None:
    """What a config file that can't be JSON is instead, when it says (an empty file, an LFS pointer, HTML)."""
    if not raw.strip():
        return "empty file (expected a JSON object): the download or copy did not finish"
    if raw.startswith(LFS_POINTER) or _looks_like_html(raw):
        return _describe(raw, len(raw))
    return None


def _kind(value) -> str:
    """A JSON value's kind, as an error message says it."""
    if value is None:
        return "null"
    for kinds, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        ((list, tuple), "a list"), (dict, "an object")):
        if isinstance(value, kinds):
            return name
    return type(value).__name__


def _fits(value, default) -> bool:
    """Whether ``value`` has the JSON kind of ``default`` (ints do where floats are expected, not the reverse:
    a float count or channel number would fail deep inside the model, or worse, silently truncate)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and (not default or all(_fits(v, default[0]) for v in value))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def check_config_types(config: dict, defaults: dict, source, per_block: bool = False) -> None:
    """Every key of ``config`` that ``defaults`` knows must have its default's JSON kind (null passes: the
    model's own checks say what it needs). ``per_block``: a list of such values is fine too (diffusers' UNet
    takes, e.g., attention_head_dim once or per block). A ValueError names ``source`` and every bad key: a
    string "false" must not read as true, nor "64" reach a layer's constructor."""
    bad = []
    for key, default in defaults.items():
        value = config.get(key)
        if value is None or _fits(value, default):
            continue
        if per_block and isinstance(value, list) and value and not isinstance(default, (list, tuple, dict)) \
                and all(_fits(v, default) for v in value):
            continue
        want = _kind(default) + (" (or a list of them, one per block)" if per_block and
                                 not isinstance(default, (list, tuple, dict)) else "")
        if isinstance(default, (list, tuple)) and default:
            want = f"a list of {_kind(default[0]).split(' ', 1)[1]}s"
        bad.append(f"{key}={value!r} is {_kind(value)}, expected {want}")
    if bad:
        raise ValueError(f"{source}: wrongly typed config values: " + "; ".join(bad))


# ---------------------------------------------------------------------------------------------- weights files
# What the first bytes of a weights file say about it. read_state_dict sniffs them before any parser sees the
# file, so an unusable file gets named for what it is (an LFS pointer, a web page...) instead of an opaque
# parse error, and nothing trusts a size the file claims before checking it against the file's real size.
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
_OTHER_FORMATS = (
    (b"\x1f\x8b", "gzip-compressed data: decompress it first (gunzip), then load the file inside"),
    (b"BZh", "bzip2-compressed data: decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed data: decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data: decompress it first (unzstd)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive: extract it first"),
    (b"Rar!", "a RAR archive: extract it first"),
    (b"GGUF", "a GGUF file (llama.cpp / stable-diffusion.cpp format), which sdcore does not read"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?), which sdcore does not read"),
    (b"\x93NUMPY", "a NumPy .npy array, not a state dict"),
    (b"\x89PNG", "a PNG image, not weights"),
    (b"\xff\xd8\xff", "a JPEG image, not weights"),
)
# bits per element of each safetensors dtype (F4/F6 pack several into a byte)
_SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                     "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                     "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _looks_like_html(head: bytes) -> bool:
    start = head[:1024].lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<!--", b"<?xml")) or b"<html" in start


def _looks_like_text(head: bytes) -> bool:
    sample = head[:512]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sample is still text
        if exc.start < len(sample) - 3:
            return False
        text = sample[:exc.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\r\n\t" for c in text)


def _describe(head: bytes, size: int) -> str:
    """What a file that is neither safetensors nor a PyTorch checkpoint looks like, for the error message."""
    if size == 0:
        return "empty file (0 bytes): the download or copy did not finish"
    if head.startswith(LFS_POINTER):
        claimed = next((line.split()[1].decode() for line in head.splitlines()
                        if line.startswith(b"size ") and len(line.split()) == 2), None)
        real = f" of {claimed} bytes" if claimed else ""
        return (f"a Git LFS pointer ({size} bytes), not the weights{real}: the repository was cloned without "
                "them. Run `git lfs pull` in it (or download the file itself)")
    if _looks_like_html(head):
        return ("an HTML page, not weights: a failed download (an error, login or redirect page saved in the "
                "file's place). Download the file again")
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            return what
    if head.startswith(ZIP_MAGIC):
        return "a zip archive but not a torch.save checkpoint"
    if _looks_like_text(head):
        first = head[:512].decode("utf-8", "replace").splitlines()[0][:80]
        return f"a text file, not weights (it starts: {first!r})"
    return f"neither a safetensors file nor a PyTorch checkpoint (it starts with the bytes {head[:16].hex(' ')})"


def _sniff(path: Path, head: bytes, size: int) -> str:
    """"safetensors", "zip" (torch.save's format since PyTorch 1.6) or "pickle" (its legacy format), from the
    file's first bytes (a wrong suffix doesn't matter); anything else is a ValueError saying what it is."""
    if size == 0 or head.startswith(LFS_POINTER) or _looks_like_html(head):
        raise ValueError(f"{path}: {_describe(head, size)}")
    if head[8:9] == b"{":  # 8-byte little-endian header length, then the JSON header
        return "safetensors"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle PROTO opcode
        return "pickle"
    if path.suffix == ".safetensors" and size < 9:
        return "safetensors"  # too short to tell; its own checks say it is truncated
    raise ValueError(f"{path}: {_describe(head, size)}")


def _corrupt(path: Path, kind: str, why: str) -> ValueError:
    return ValueError(f"{path}: corrupt or truncated {kind} file: {why}")


def _check_safetensors(path: Path, f, size: int) -> None:
    """safetensors' layout checked against the file's real size before the library sees it: the header length
    (so a claimed 2**60 bytes is never allocated), the JSON header, and every tensor's dtype, shape and byte
    range (in the file, matching its shape, no overlaps or gaps: what the library requires)."""
    what = "safetensors"
    if size < 8:
        raise _corrupt(path, what, f"{size} bytes, shorter than the 8-byte header length")
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise _corrupt(path, what, f"the header claims {n} bytes but only {size - 8} follow the header length")
    if n > SAFETENSORS_MAX_HEADER:
        raise _corrupt(path, what, f"a {n}-byte header, over the format's {SAFETENSORS_MAX_HEADER}-byte limit")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, what, f"the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, what, f"the header is {_kind(header)}, not a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise _corrupt(path, what, "__metadata__ is not a map of strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _corrupt(path, what, f"tensor {name!r}: no dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                      for x in xs)  # noqa: E731
        if dtype not in _SAFETENSORS_BITS:
            raise _corrupt(path, what, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not ints(shape):
            raise _corrupt(path, what, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise _corrupt(path, what, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        if offsets[1] > data_size:
            raise _corrupt(path, what, f"tensor {name!r}: data_offsets {offsets} point past the end of the data "
                                       f"({data_size} bytes)")
        bits = math.prod(shape) * _SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _corrupt(path, what, f"tensor {name!r}: {dtype} {shape} needs {bits / 8:g} bytes but "
                                       f"data_offsets {offsets} hold {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end, last = 0, None
    for begin, stop, name in sorted(spans):
        if begin != end:
            problem = f"overlaps tensor {last!r}" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise _corrupt(path, what, f"tensor {name!r} at data_offsets [{begin}, {stop}] {problem}")
        end, last = stop, name
    if end != data_size:
        raise _corrupt(path, what, f"the tensors end at byte {end} of the data but the file holds {data_size} "
                                   "(bytes left over)")


def _check_torch_zip(path: Path, size: int) -> None:
    """A torch.save archive's zip directory, checked before torch reads it: it opens, has a data.pkl, and no
    member claims more bytes than the whole file (torch.save stores members uncompressed)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _corrupt(path, "zip (torch.save)", f"the zip directory does not read ({exc})") from exc
    names = [m.filename for m in members]
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        listing = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise ValueError(f"{path}: a zip archive but not a torch.save checkpoint (no data.pkl; it holds "
                         f"{listing or 'nothing'})")
    for m in members:
        if m.file_size > size or m.compress_size > size:
            raise _corrupt(path, "zip (torch.save)", f"member {m.filename} claims {m.file_size} bytes in a "
                                                     f"{size}-byte file")


def _stored_tensors(obj):
    """The tensors in what a checkpoint unpickled to (nested dicts / lists / tuples), without recursion."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _torch_load(path: Path, kind: str, size: int):
    """torch.load(weights_only=True), after a dry run that reads only the pickle: its tensors on the meta device
    (a FakeTensorMode for the legacy format, whose loader otherwise allocates every storage first), so the
    sizes the pickle claims are checked against the file before anything that big is allocated. The legacy
    format is read through an mmap, whose reads never reserve the length a corrupt pickle opcode claims."""
    import mmap

    what = "zip (torch.save)" if kind == "zip" else "pickle (legacy torch.save)"
    with contextlib.ExitStack() as stack:
        # An open file, not the path: torch.load hands a path ending in .safetensors to safetensors.
        source = stack.enter_context(open(path, "rb"))
        if kind != "zip":
            source = stack.enter_context(mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ))
        try:
            if kind == "zip":
                dry = torch.load(source, map_location="meta", weights_only=True)
            else:
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode():
                    dry = torch.load(source, weights_only=True)
        except Exception as exc:  # noqa: BLE001 — any parse failure means the file is unusable
            raise _torch_load_error(path, what, exc) from exc
        claimed, seen = 0, set()
        for t in _stored_tensors(dry):
            storage = t.untyped_storage()
            if t.numel() * t.element_size() > storage.nbytes():
                raise _corrupt(path, what, f"a {tuple(t.shape)} tensor views more bytes than its storage holds")
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                claimed += storage.nbytes()
        if claimed > size:
            raise _corrupt(path, what, f"its tensors claim {claimed} bytes but the file has {size}")
        source.seek(0)
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise _torch_load_error(path, what, exc) from exc


def _torch_load_error(path: Path, what: str, exc: Exception) -> ValueError:
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
        # Training checkpoints can pickle arbitrary Python objects; unpickling those would run their code.
        return ValueError(f"{path}: holds Python objects besides tensors, which sdcore does not unpickle (it loads "
                          "with weights_only=True, for safety). Convert the file to .safetensors with a tool you "
                          "trust, or re-save only its state_dict.")
    return _corrupt(path, what, f"{type(exc).__name__}: {_short(exc)}")


def _short(exc: Exception) -> str:
    """An exception's message without torch's weights-only boilerplate around the actual reason."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0]
    return text[:300]


def read_state_dict(path) -> dict:
    """Tensors of a .safetensors file (or a .bin/.ckpt through torch.load(weights_only=True)), with errors
    that name the file and say what it is when it is not weights. The format comes from the first bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a weights file (for a diffusers-format model folder use "
                         "from_pretrained)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1024)
        kind = _sniff(path, head, size)
        if kind == "safetensors":
            _check_safetensors(path, f, size)
    if kind == "zip":
        _check_torch_zip(path, size)
    if kind != "safetensors":
        state = _torch_load(path, kind, size)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: holds {type(state).__name__}, not a state dict of tensors")
        return state
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 — what the checks above let through but the library refuses
        raise _corrupt(path, "safetensors", f"{type(exc).__name__}: {exc}") from exc
