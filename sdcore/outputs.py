"""Writing images so that nothing is ever lost: the path is checked before any work (a known image suffix, no
existing file unless overwrite is asked for), the image is written to a temporary file in the same folder and
then renamed into place (a kill or a full disk leaves the old file, or none, never a truncated one), and the
generation parameters travel inside the file, in the A1111 layout:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: ..., CFG scale: 7.5, Seed: 1, Size: 512x512, Model: ...

PNG keeps them in a ``parameters`` text chunk, JPEG and WebP in the EXIF UserComment (as A1111 does), so no
format drops them. Newlines (and backslashes) in prompts are escaped, so a prompt can't forge a settings
line."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

# suffix -> PIL format name
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"  # EXIF UserComment's character-code field, then UTF-16 (big-endian, as piexif)


def escape(text: str) -> str:
    """One line of text: backslash, newline and carriage return written as \\\\, \\n and \\r."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class Quoted(str):
    """A settings value that keeps its commas: written in double quotes, JSON-escaped, as A1111 writes
    ``Lora hashes: "name: hash, name2: hash"``."""


def _setting(value) -> str:
    if isinstance(value, Quoted):
        return json.dumps(str(value), ensure_ascii=False)
    return escape(str(value)).replace(",", " ")


def parameters_text(prompt: str, negative_prompt: str | None, settings: dict) -> str:
    """The A1111 ``parameters`` text: prompt, negative prompt and one settings line, each prompt escaped to
    a single line."""
    line = ", ".join(f"{k}: {_setting(v)}" for k, v in settings.items())
    return f"{escape(prompt)}\nNegative prompt: {escape(negative_prompt or '')}\n{line}"


def generation_settings(*, steps: int, sampler: str, guidance: float, seed, size: tuple[int, int], model: str,
                        strength: float | None = None, extra: dict | None = None) -> dict:
    """The settings line of one image, in A1111's order and names: what `sdcore generate`, `sdcore batch` and
    `sdcore serve` all record, so an image says how to make it again whichever command made it. ``size`` is
    (width, height); ``strength`` is img2img's denoising strength; ``extra`` (LoRA hashes, ...) goes last."""
    settings = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance, "Seed": seed,
                "Size": f"{size[0]}x{size[1]}", "Model": model}
    if strength is not None:
        settings["Denoising strength"] = strength
    settings.update(extra or {})
    return settings


def image_format(path) -> str:
    """The PIL format for ``path``'s suffix, or a ValueError saying which suffixes are known."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        what = f"suffix {suffix!r}" if suffix else "no suffix"
        raise ValueError(f"{path}: {what}; the image format comes from the suffix: "
                         f"{', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


def check_outputs(paths, overwrite: bool) -> None:
    """Before any work: every path has a known image suffix, none exists unless ``overwrite``, none is a
    folder, and two outputs never share a path."""
    seen = set()
    for path in map(Path, paths):
        image_format(path)
        if path in seen:
            raise ValueError(f"{path}: two outputs would share this path")
        seen.add(path)
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not an image file")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it")
        parent = path.parent if str(path.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{path}: {parent} is a file, not a folder")


def encode(image, fmt: str, parameters: str | None, fp) -> None:
    """Write ``image`` to the open binary file ``fp`` in ``fmt`` with ``parameters`` embedded."""
    from PIL import Image, PngImagePlugin

    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        image.save(fp, format="PNG", pnginfo=info)
        return
    exif = Image.Exif()
    if parameters is not None:
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    image.save(fp, format=fmt, exif=exif.tobytes(), **options)


def read_parameters(path) -> str | None:
    """The parameters text that :func:`save` embedded in ``path`` (PNG chunk or EXIF UserComment)."""
    from PIL import Image

    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if comment is None:
        return None
    if isinstance(comment, bytes) and comment.startswith(_UNICODE_PREFIX):
        return comment[len(_UNICODE_PREFIX):].decode("utf-16-be")
    return comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)


def save(image, path, parameters: str | None = None, overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` atomically: a temporary file in the same folder, flushed to disk, then
    renamed into place. Without ``overwrite`` an existing file is never replaced (even one that appears
    while the image is being written). On any error, Ctrl-C included, the temporary file is removed."""
    path = Path(path)
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fp:
            encode(image, fmt, parameters, fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, atomically where the filesystem has hard
    links (link fails on an existing name; then the temporary name is dropped)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # no hard links here: check, then rename
            raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    """The process umask, read without os.umask's set-and-restore (which would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
