"""The prompts file of ``sdcore batch``, read and checked whole before anything runs, and expanded into images.

``.txt``: one prompt per line. ``.jsonl``: one JSON object per line with ``prompt`` and optionally
``negative_prompt``, ``seed``, ``n``, ``steps``, ``guidance``, ``size``, ``scheduler`` and ``lora``, each
overriding the command line's default for that line. Blank lines are skipped; line numbers are the file's own
(1-based), so an error or a file name points at the line a user sees in an editor.

Seeds: a line's ``seed`` is its first image's; image i uses seed + i, as ``sdcore generate --n`` does. A line
without one gets a seed derived from the run's ``--seed`` and its line number (a hash, so lines never share
seeds and a rerun draws the same ones)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .. import args as ranges

KEYS = ("prompt", "negative_prompt", "seed", "n", "steps", "guidance", "size", "scheduler", "lora")
SEED_SPAN = 2**62  # derived seeds stay below this, so seed + (n - 1) always fits the seed range


class PromptsError(ValueError):
    """A prompts file that can't run: names the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class Image:
    """One image to make: everything its generation depends on (besides the run's model, dtype, backend and
    device), and its stable file name."""

    line: int
    index: int
    seed: int
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    size: tuple | None  # (width, height); None: the model's native size
    scheduler: str | None  # None: the model's own
    lora: tuple  # ((path, weight), ...) in load order

    @property
    def name(self) -> str:
        return f"{self.line:06d}-{self.index:02d}-{self.seed}.png"

    def batch_key(self) -> tuple:
        """Images with equal keys can share one pipeline call (the negative prompt may differ per image)."""
        return self.steps, self.guidance, self.size, self.scheduler, self.lora


def derived_seed(run_seed: int, line: int) -> int:
    digest = hashlib.sha256(f"sdcore-batch:{run_seed}:{line}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_SPAN


def parse_size(text) -> tuple[int, int]:
    """'WxH' (or [W, H]) as (width, height), with `sdcore generate --size`'s checks."""
    lo, hi = ranges.RANGES["side"]
    if isinstance(text, list) and len(text) == 2:
        w, h = text
    elif isinstance(text, str) and text.lower().count("x") == 1:
        w, h = text.lower().split("x")
        try:
            w, h = int(w), int(h)
        except ValueError:
            raise ValueError(f"size must be WIDTHxHEIGHT like 512x512, got {text!r}") from None
    else:
        raise ValueError(f"size must be WIDTHxHEIGHT like 512x512, got {text!r}")
    for v in (w, h):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi or v % 8:
            raise ValueError(f"width and height must be multiples of 8 in {lo}..{hi}, got {text!r}")
    return w, h


def parse_lora(value) -> tuple:
    """'FILE[:WEIGHT]' or a list of them (the syntax of --lora) as ((path, weight), ...)."""
    import argparse

    from ..cli import _lora_arg  # --lora's own parser: the same syntax and weight range

    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"lora must be 'FILE[:WEIGHT]' or a list of them, got {value!r}")
    out = []
    for item in items:
        try:
            out.append(_lora_arg(item))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"lora {item!r}: weight {exc}") from None
    return tuple(out)


def _check(key: str, value, schedulers_names):
    """One JSONL value, with the checks of the matching `sdcore generate` option."""
    if key in ("prompt", "negative_prompt"):
        if not isinstance(value, str) or (key == "prompt" and not value.strip()):
            raise ValueError(f"{key} must be a {'non-empty ' if key == 'prompt' else ''}string, got {value!r}")
        return value
    if key in ("seed", "n", "steps"):
        return ranges.checked({"n": "images"}.get(key, key), key, value)
    if key == "guidance":
        return ranges.checked("guidance", key, value)
    if key == "size":
        return parse_size(value)
    if key == "scheduler":
        if value not in schedulers_names:
            raise ValueError(f"scheduler must be one of {', '.join(schedulers_names)}, got {value!r}")
        return value
    return parse_lora(value)


def read(path, defaults: dict, run_seed: int) -> list[dict]:
    """Every line of ``path`` as a request dict (the defaults with the line's overrides, and its ``line``),
    or a PromptsError naming the first bad line. ``defaults`` has every key of KEYS but prompt and seed."""
    from .. import schedulers

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".txt", ".jsonl"):
        raise PromptsError(f"{path}: the prompts file must be .txt (one prompt per line) or .jsonl (one JSON "
                           f"object per line), got {kind or 'no suffix'!r}")
    if not path.is_file():
        raise PromptsError(f"{path}: no such prompts file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise PromptsError(f"{path} line {line}: not UTF-8 text ({exc.reason})") from None
    requests = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            request = dict(defaults, line=number)
            if kind == ".txt":
                request["prompt"] = raw.strip()
            else:
                request.update(_json_line(raw, schedulers.NAMES))
        except (TypeError, ValueError) as exc:
            raise PromptsError(f"{path} line {number}: {exc}") from None
        if request.get("seed") is None:
            request["seed"] = derived_seed(run_seed, number)
        if request["seed"] + request["n"] - 1 > ranges.RANGES["seed"][1]:
            raise PromptsError(f"{path} line {number}: seed must be at most 2**63 - {request['n']} so that every "
                               f"image's seed + i fits, got {request['seed']}")
        requests.append(request)
    if not requests:
        raise PromptsError(f"{path}: no prompts (every line is blank)")
    _check_lora_names(path, requests)
    return requests


def _json_line(raw: str, schedulers_names) -> dict:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"each line must be a JSON object, got {type(item).__name__}")
    unknown = [k for k in item if k not in KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    if "prompt" not in item:
        raise ValueError("no 'prompt'")
    return {k: None if v is None and k == "negative_prompt" else _check(k, v, schedulers_names)
            for k, v in item.items()}


def _check_lora_names(path, requests) -> None:
    """Every LoRA file exists and is safetensors; two files never share an adapter name (the file's stem,
    which the images' 'Lora hashes' record), as one worker holds them all."""
    from .. import lora_formats

    stems = {}
    for request in requests:
        for file, _ in request["lora"]:
            try:
                lora_formats.check_file(file)
            except (FileNotFoundError, ValueError) as exc:
                raise PromptsError(f"{path} line {request['line']}: lora {exc}") from None
            stem = Path(file).stem
            if stems.setdefault(stem, str(Path(file).resolve())) != str(Path(file).resolve()):
                raise PromptsError(f"{path} line {request['line']}: two LoRA files are both named {stem!r} "
                                   f"({file} and {stems[stem]}); rename one")


def images(requests: list[dict]) -> list[Image]:
    """Each request's n images, in file order."""
    return [Image(line=r["line"], index=i, seed=r["seed"] + i, prompt=r["prompt"],
                  negative_prompt=r["negative_prompt"], steps=r["steps"], guidance=float(r["guidance"]),
                  size=tuple(r["size"]) if r["size"] else None, scheduler=r["scheduler"], lora=tuple(r["lora"]))
            for r in requests for i in range(r["n"])]


def groups(todo: list[Image], batch_size: int) -> list[list[Image]]:
    """The pipeline calls: consecutive runs of at most ``batch_size`` images that share a batch key. Formed
    here, once, so every engine and worker count makes the same calls (and so the same floating-point
    results)."""
    out = []
    for image in todo:
        if out and len(out[-1]) < batch_size and out[-1][0].batch_key() == image.batch_key():
            out[-1].append(image)
        else:
            out.append([image])
    return out
