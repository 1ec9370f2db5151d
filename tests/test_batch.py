"""`sdcore batch`, local engine: the same pixels and files as `sdcore generate`, the prompts file checked whole
before any work, resume that remakes only what is missing, a SIGKILL that leaves nothing broken, settings
changes refused, and failures reported by line. (The Ray engine: tests/test_batch_ray.py.)"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcore import cli, outputs

FAST = ["--steps", "2", "--size", "64x64", "--no-progress"]


def batch(prompts, out, *args):
    return cli.main(["batch", str(prompts), "--out", str(out), *FAST, *args])


def files(out: Path) -> dict:
    """name -> sha256 of every image in ``out``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}


def manifest(out: Path) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def write(path: Path, lines) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def test_images_are_the_files_sdcore_generate_writes(tmp_path, capsys):
    """Image i of a line with seed s is `sdcore generate PROMPT --seed s+i`, byte for byte (pixels and the
    parameters chunk), LoRA, scheduler and per-line overrides included; .txt lines get derived seeds."""
    from safetensors.torch import save_file
    from test_lora import _kohya

    from sdcore import embedded

    save_file(_kohya(embedded.build("tiny"), 16), tmp_path / "style.safetensors")
    style = f"{tmp_path / 'style.safetensors'}:0.5"
    prompts = write(tmp_path / "p.jsonl", [
        {"prompt": "a red car", "seed": 7, "n": 2},
        "",
        {"prompt": "a cat", "seed": 3, "negative_prompt": "blurry", "scheduler": "euler-a", "guidance": 5,
         "lora": style},
        {"prompt": "a dog", "steps": 3, "size": "64x32"}])
    out = tmp_path / "out"
    assert batch(prompts, out) == 0
    summary = capsys.readouterr().out
    assert "4 made, 0 skipped" in summary and "0 failed" in summary
    dog_seed = manifest(out)[3]["seed"]
    assert sorted(files(out)) == ["000001-00-7.png", "000001-01-8.png", "000003-00-3.png",
                                  f"000004-00-{dog_seed}.png"]
    generate = [("a red car", "8", "000001-01-8.png", []),
                ("a cat", "3", "000003-00-3.png", ["--negative-prompt", "blurry", "--scheduler", "euler-a",
                                                   "--guidance", "5", "--lora", style]),
                ("a dog", str(dog_seed), f"000004-00-{dog_seed}.png", ["--steps", "3", "--size", "64x32"])]
    for prompt, seed, name, extra in generate:
        assert cli.main(["generate", prompt, *FAST, "--seed", seed, "--out", str(tmp_path / "g.png"), *extra,
                         "--overwrite"]) == 0
        assert (tmp_path / "g.png").read_bytes() == (out / name).read_bytes(), name
    records = manifest(out)
    assert [r["file"] for r in records] == sorted(files(out))
    assert all(r["sha256"] == files(out)[r["file"]] for r in records)
    cat = records[2]
    assert cat["line"] == 3 and cat["prompt"] == "a cat" and cat["negative_prompt"] == "blurry"
    assert cat["settings"]["Sampler"] == "euler-a" and cat["settings"]["CFG scale"] == 5.0
    assert cat["settings"]["Lora weights"] == "style: 0.5" and cat["settings"]["Seed"] == 3
    settings_line = outputs.read_parameters(out / "000003-00-3.png").split("\n")[2]
    assert settings_line.startswith("Steps: 2, Sampler: euler-a, CFG scale: 5.0, Seed: 3, Size: 64x64")

    write(tmp_path / "p.txt", ["a red car", "a red car"])  # derived seeds: stable, and per line
    assert batch(tmp_path / "p.txt", tmp_path / "txt", "--seed", "5") == 0
    seeds = [r["seed"] for r in manifest(tmp_path / "txt")]
    assert len(set(seeds)) == 2 and seeds == [r["seed"] for r in manifest(tmp_path / "txt")]


def test_batched_calls_stay_within_one_level_and_the_folder_remembers_the_batch_size(tmp_path, capsys):
    """--batch-size 2 runs two images per pipeline call: the same seeds' noise, and pixels within one level of
    the unbatched images (batched convolutions round differently in the last bits, measured ~1e-6). Mixing
    both in one folder is refused."""
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red car", "seed": 7, "n": 2},
                                           {"prompt": "a cat", "seed": 3, "negative_prompt": "blurry"}])
    assert batch(prompts, tmp_path / "one") == 0
    assert batch(prompts, tmp_path / "two", "--batch-size", "2") == 0
    assert sorted(files(tmp_path / "one")) == sorted(files(tmp_path / "two"))
    for name in files(tmp_path / "one"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("one", "two"))
        assert np.abs(a - b).max() <= 1, name
    capsys.readouterr()
    assert batch(prompts, tmp_path / "one", "--batch-size", "2") == 2
    assert "--batch-size was 1, now 2" in capsys.readouterr().err


@pytest.mark.parametrize("line,fragment", [
    ('{"prompt": "x", "steps": 0}', "steps must be an integer in 1..1000, got 0"),
    ('{"prompt": "x", "colour": "red"}', "unknown key 'colour'"),
    ('{"prompt": "x"', "not valid JSON"),
    ('["x"]', "must be a JSON object"),
    ('{"negative_prompt": "x"}', "no 'prompt'"),
    ('{"prompt": "x", "size": "60x64"}', "multiples of 8"),
    ('{"prompt": "x", "scheduler": "heun"}', "scheduler must be one of"),
    ('{"prompt": "x", "lora": "missing.safetensors"}', "no such LoRA file"),
    ('{"prompt": "x", "seed": 9223372036854775807, "n": 2}', "seed must be at most"),
])
def test_a_bad_line_3_is_refused_before_any_work(tmp_path, capsys, line, fragment):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f'{{"prompt": "a"}}\n{{"prompt": "b", "n": 2}}\n{line}\n{{"prompt": "d"}}\n')
    assert batch(prompts, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3:" in err and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,text,fragment", [
    ("p.csv", "a\n", ".txt (one prompt per line) or .jsonl"),
    ("p.txt", "\n  \n", "no prompts"),
    ("missing.txt", None, "no such prompts file"),
])
def test_bad_prompts_files_and_options_are_one_line_errors(tmp_path, capsys, name, text, fragment):
    if text is not None:
        (tmp_path / name).write_text(text)
    assert batch(tmp_path / name, tmp_path / "out") == 2
    assert fragment in capsys.readouterr().err
    write(tmp_path / "ok.txt", ["a"])
    assert batch(tmp_path / "ok.txt", tmp_path / "out", "--workers", "2") == 2
    assert "--workers N needs --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_remakes_only_the_missing_images_and_a_changed_setting_is_refused(tmp_path, capsys):
    prompts = write(tmp_path / "p.txt", ["a red car", "a cat", "a dog"])
    out = tmp_path / "out"
    assert batch(prompts, out, "--n", "2") == 0
    first, records = files(out), manifest(out)
    gone = sorted(first)[1::2]
    for name in gone:
        (out / name).unlink()
    kept = {n: (out / n).stat().st_mtime_ns for n in first if n not in gone}
    time.sleep(0.01)
    capsys.readouterr()
    assert batch(prompts, out, "--n", "2") == 0
    assert "3 made, 3 skipped" in capsys.readouterr().out
    assert files(out) == first and manifest(out) == records  # deterministic: the same bytes again
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # the others were not rewritten
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:-2]) + lines[-2][:40])  # a lost line and a torn one
    assert batch(prompts, out, "--n", "2") == 0
    assert "0 made, 6 skipped" in capsys.readouterr().out
    assert manifest(out) == records  # rebuilt from the images themselves

    assert batch(prompts, out, "--n", "2", "--steps", "3") == 2  # FAST says 2 first; the last one wins
    assert "--steps was 2, now 3" in capsys.readouterr().err
    write(prompts, ["a red car", "a cat in a hat", "a dog"])
    assert batch(prompts, out, "--n", "2") == 2
    assert "prompts line 2: prompt was 'a cat', now 'a cat in a hat'" in capsys.readouterr().err
    assert files(out) == first  # nothing touched by the refusals
    write(prompts, ["a red car", "a cat", "a dog", "a bird"])  # lines may be added
    assert batch(prompts, out, "--n", "2") == 0
    assert "2 made, 6 skipped" in capsys.readouterr().out
    assert batch(prompts, out, "--n", "1", "--overwrite") == 0  # starts the folder over
    assert "4 made, 0 skipped" in capsys.readouterr().out
    assert len(manifest(out)) == 4 and len(files(out)) == 4 + 4  # the n=2 run's index-1 images stay


def test_a_failed_image_is_reported_with_its_line_and_the_others_are_made(tmp_path, capsys):
    """A LoRA full of NaN makes line 2's generation go NaN: it fails alone (its batch is retried image by
    image), the summary names line 2, the exit code is 1, and a rerun retries only it."""
    from safetensors.torch import save_file
    from test_lora import _kohya

    from sdcore import embedded

    state = _kohya(embedded.build("tiny"), 16, te=False)
    save_file({k: v * float("nan") if "lora_up" in k else v for k, v in state.items()}, tmp_path / "nan.safetensors")
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "lora": str(tmp_path / "nan.safetensors")},
                                           {"prompt": "c"}])
    out = tmp_path / "out"
    assert batch(prompts, out, "--batch-size", "3") == 1
    captured = capsys.readouterr()
    assert "2 made, 0 skipped" in captured.out and "1 failed" in captured.out
    assert "prompts lines 2;" in captured.err and "UNet produced NaN" in captured.err
    assert [r["line"] for r in manifest(out)] == [1, 3]
    assert batch(prompts, out, "--batch-size", "3") == 1
    assert "0 made, 2 skipped (already present), 1 failed" in capsys.readouterr().out


def test_sigkill_leaves_no_broken_file_and_a_rerun_completes_the_set(tmp_path):
    prompts = write(tmp_path / "p.txt", [f"prompt {i}" for i in range(8)])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdcore", "batch", str(prompts), "--out", str(out), *FAST, "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    made = files(out)
    assert 3 <= len(made) < 8
    for name in made:  # whole images, and whole manifest lines, under final names
        with Image.open(out / name) as image:
            image.load()
        assert "Seed:" in outputs.read_parameters(out / name)
    raw = (out / "manifest.jsonl").read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    assert {json.loads(line)["file"] for line in raw.decode().splitlines()} <= set(made)
    mtimes = {n: (out / n).stat().st_mtime_ns for n in made}

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{8 - len(made)} made, {len(made)} skipped" in rerun.stdout
    assert len(files(out)) == 8 and [r["line"] for r in manifest(out)] == list(range(1, 9))
    assert {n: (out / n).stat().st_mtime_ns for n in made} == mtimes
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_every_generation_option_of_generate_exists_with_the_same_checks():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    gen = {a.dest: a for a in sub["generate"]._actions}
    bat = {a.dest: a for a in sub["batch"]._actions}
    img2img = {"init_image", "strength", "prompt", "out"}  # one image per command, or img2img only
    for dest, action in gen.items():
        if dest in img2img:
            continue
        assert dest in bat, dest
        assert bat[dest].option_strings == action.option_strings, dest
        assert getattr(bat[dest].type, "__name__", None) == getattr(action.type, "__name__", None), dest
        assert bat[dest].choices == action.choices, dest
