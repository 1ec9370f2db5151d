"""The models and LoRAs a request may name: only entries of --models-dir and --lora-dir, by name.

A request never carries a path. A name is looked up among the folder's entries, listed afresh each time (a
file dropped in is usable at once, as after A1111's refresh). Names with a path separator, a NUL, or that
start with '.' are refused before the lookup, and an entry whose real path (symlinks followed) leaves the
folder is not listed at all, so neither '../x' nor a symlink pointing out of the folder can reach a file
elsewhere. The real path is checked again when the file is opened (the folder may change meanwhile)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("sdcore.serve")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A model or LoRA: ``title`` is what a request names (A1111's title: the file name), ``name`` the stem."""

    title: str
    name: str
    path: Path | None  # None: the embedded model


def bad_name(name: str) -> str | None:
    """Why ``name`` can't be a model or LoRA name, or None."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name or "\0" in name:
        return "has a path separator (names are looked up inside the folder, never as paths)"
    if name.startswith(".") or ".." in name:
        return "starts with '.' or holds '..'"
    return None


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, symlinks followed, is inside ``folder``."""
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:
        return False


def _entries(folder: Path | None, keep) -> list[Path]:
    if folder is None:
        return []
    try:
        children = sorted(folder.iterdir())
    except OSError as exc:
        log.warning("%s: can't list (%s)", folder, exc)
        return []
    found = []
    for child in children:
        if child.name.startswith(".") or not keep(child):
            continue
        if not inside(child, folder):
            log.warning("%s: leads outside %s; not listed", child, folder)
            continue
        found.append(child)
    return found


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def models(folder: Path | None) -> list[Entry]:
    """The checkpoints of --models-dir: .safetensors/.ckpt files and diffusers folders (model_index.json)."""
    return [Entry(p.name, p.stem if p.is_file() else p.name, p) for p in _entries(folder, _is_checkpoint)]


def loras(folder: Path | None) -> list[Entry]:
    """The .safetensors files of --lora-dir."""
    keep = lambda p: p.is_file() and p.suffix.lower() == ".safetensors"  # noqa: E731
    return [Entry(p.name, p.stem, p) for p in _entries(folder, keep)]


def find(entries: list[Entry], name: str, what: str) -> Entry:
    """The entry ``name`` means (its title, its name, or A1111's "title [hash]"), or a ValueError."""
    why = bad_name(name)
    if why:
        raise ValueError(f"{what} {name!r} {why}")
    bare = name.split(" [", 1)[0] if name.endswith("]") else name
    for entry in entries:
        if bare in (entry.title, entry.name):
            return entry
    known = ", ".join(e.title for e in entries) or "none"
    raise ValueError(f"{what} {name!r} is not one of the available ones ({known})")


def checked_path(entry: Entry, folder: Path) -> Path:
    """``entry``'s path, checked once more (just before opening) to be inside ``folder``."""
    if not inside(entry.path, folder):
        raise ValueError(f"{entry.title}: leads outside {folder}")
    return entry.path


_hashes: dict = {}


def sha256(path: Path) -> str:
    """The file's sha256 (hex), cached by path, size and modification time."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]
