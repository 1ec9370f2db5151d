"""The output folder of ``sdcore batch``: what it was made with, which images it holds, and its manifest.

    DIR/batch.json       the run's settings and every prompt line's resolved request, written before any image
    DIR/000003-01-42.png one image: prompt line 3, its image 1, seed 42 (parameters chunk as sdcore generate)
    DIR/manifest.jsonl   one line per finished image, in the prompts file's order once a run ends

Every file appears under its final name only whole: images and batch.json through a temporary file that is
fsynced and then renamed (linked, where nothing may be replaced); manifest lines are each appended with one
write(2) of the whole line (a killed process can't split a syscall's bytes) and fsynced, and the manifest is
rewritten, sorted, through a temporary file at the start and end of every run. An image whose manifest line
was lost (a kill between the two writes, or a torn line after a power cut) gets its line back on the next
run, from the file itself.

An image file that exists under its name is done: names are only ever written whole, and batch.json makes
sure the folder's images all come from the same settings (a rerun with other settings is refused, naming the
setting, unless --overwrite starts the folder over)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

SETTINGS, MANIFEST = "batch.json", "manifest.jsonl"
_NUMBERS = {"Steps": int, "Seed": int, "CFG scale": float, "Denoising strength": float}


def write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    """``data`` under ``path``, whole or not at all. Without ``overwrite`` an existing file is never replaced
    (FileExistsError). The same protocol as sdcore.outputs.save, for bytes a worker has already encoded."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails on an existing name, atomically
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK) or path.exists():
                raise
            os.replace(tmp, path)  # a filesystem without hard links: checked, then renamed
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_settings(parameters: str) -> dict:
    """The settings line of an image's parameters text (sdcore.outputs.parameters_text) back as a dict:
    what a manifest line records, whether it comes from a worker or is rebuilt from the file."""
    line = parameters.split("\n")[-1]
    settings = {}
    for key, value in re.findall(r'([^:,][^:]*): ("(?:\\.|[^"\\])*"|[^,]*)(?:, |$)', line):
        if value.startswith('"'):
            value = json.loads(value)
        else:
            value = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), value)
        settings[key] = _NUMBERS.get(key, str)(value)
    return settings


def record(image, parameters: str, digest: str) -> dict:
    return {"line": image.line, "index": image.index, "seed": image.seed, "prompt": image.prompt,
            "negative_prompt": image.negative_prompt, "file": image.name, "sha256": digest,
            "settings": parse_settings(parameters)}


class Folder:
    """DIR of one run: checks its settings, knows which images are done, writes images and manifest lines."""

    def __init__(self, out, settings: dict, images, overwrite: bool):
        self.out, self.images, self.overwrite = Path(out), images, overwrite
        self.settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: is a file, not a folder")
        self.records: dict[str, dict] = {}
        self._fd = None

    # ------------------------------------------------------------------------------------------ start
    def check_settings(self) -> None:
        """Refuse a folder made with other settings (unless overwrite), naming the first difference."""
        path = self.out / SETTINGS
        if self.overwrite or not path.exists():
            if not path.exists() and (self.out / MANIFEST).exists():
                raise FileExistsError(f"--out {self.out}: holds a {MANIFEST} but no {SETTINGS}; use another "
                                      "folder, or --overwrite")
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable ({exc}); pass --overwrite to start the folder over") from None
        change = _difference(old, self.settings)
        if change:
            raise FileExistsError(f"--out {self.out} was made with other settings: {change}. Pass --overwrite to "
                                  "remake its images with these settings, or choose another --out")

    def start(self) -> list:
        """Write batch.json, bring the manifest in line with the images present, and return the images still
        to make. --overwrite first removes the manifest and every image this run makes, so a run killed
        midway can never leave images of the old settings that a resume would take as done."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(".*.partial"):  # a killed run's unfinished temporary files
            stale.unlink(missing_ok=True)
        write_atomic(self.out / SETTINGS, json.dumps(self.settings, indent=1).encode(), overwrite=True)
        if self.overwrite:
            for image in self.images:
                (self.out / image.name).unlink(missing_ok=True)
            (self.out / MANIFEST).unlink(missing_ok=True)
        known = {r["file"]: r for r in _read_manifest(self.out / MANIFEST)}
        todo = []
        for image in self.images:
            path = self.out / image.name
            if not path.exists():
                todo.append(image)
            elif image.name in known:
                self.records[image.name] = known[image.name]
            else:  # the image was written, its manifest line was not
                from .. import outputs

                self.records[image.name] = record(image, outputs.read_parameters(path) or "",
                                                  sha256(path.read_bytes()))
        self._rewrite_manifest()
        self._fd = os.open(self.out / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return todo

    # ------------------------------------------------------------------------------------------ results
    def add(self, image, png: bytes, parameters: str) -> bool:
        """Write one finished image and its manifest line; False for an image this run already wrote (a
        retried block's duplicate), which is dropped."""
        if image.name in self.records:
            return False
        write_atomic(self.out / image.name, png, overwrite=False)
        self.records[image.name] = record(image, parameters, sha256(png))
        os.write(self._fd, (json.dumps(self.records[image.name], ensure_ascii=False) + "\n").encode())
        os.fsync(self._fd)
        return True

    def finish(self) -> None:
        """The manifest rewritten in the prompts file's order, so equal runs leave equal manifests."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._rewrite_manifest()

    def _rewrite_manifest(self) -> None:
        lines = [json.dumps(self.records[i.name], ensure_ascii=False) + "\n" for i in self.images
                 if i.name in self.records]
        write_atomic(self.out / MANIFEST, "".join(lines).encode(), overwrite=True)


def _read_manifest(path: Path) -> list[dict]:
    """The manifest's whole, readable lines (a line torn by a power cut is dropped; its image gets a new one)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("file"), str):
            out.append(item)
    return out


def _difference(old: dict, new: dict) -> str | None:
    """The first setting that differs, in words; prompt lines may be added, not changed or removed."""
    for key in new:
        if key != "lines" and old.get(key) != new[key]:
            if key == "defaults" and isinstance(old.get(key), dict):
                for name in new[key]:
                    if old[key].get(name) != new[key][name]:
                        return f"--{name.replace('_', '-')} was {old[key].get(name)!r}, now {new[key][name]!r}"
            name = key if key == "device" else "--" + key.replace("_", "-")
            return f"{name} was {old.get(key)!r}, now {new[key]!r}"
    old_lines, new_lines = old.get("lines", {}), new.get("lines", {})
    for line, request in old_lines.items():
        if line not in new_lines:
            return f"prompts line {line} was removed (or is now blank)"
        for name in request:
            if request[name] != new_lines[line].get(name):
                return f"prompts line {line}: {name} was {request[name]!r}, now {new_lines[line].get(name)!r}"
    return None
