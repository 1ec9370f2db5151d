"""The CLI with bad input: every user error is one line naming the argument, exit 2, no traceback, and no
file created or changed. Outputs are atomic and never replace a file without --overwrite; Ctrl-C is one line
and exit 130; an internal error is one line pointing at --debug."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from sdcore import cli, outputs

GEN = ["generate", "a cat", "--steps", "1", "--size", "64x64", "--no-progress"]
NO_GPU = not torch.cuda.is_available()

# (argv, fragment the message must hold: the argument's name)
BAD = [
    (GEN + ["--steps", "0"], "--steps"),
    (GEN + ["--steps", "-1"], "--steps"),
    (GEN + ["--steps", "abc"], "--steps"),
    (GEN + ["--steps", "1.5"], "--steps"),
    (GEN + ["--steps", "1001"], "--steps"),
    (GEN + ["--steps", "1000"], "num_inference_steps=1000 is more than PNDMScheduler can take"),
    (GEN + ["--guidance", "nan"], "--guidance"),
    (GEN + ["--guidance", "inf"], "--guidance"),
    (GEN + ["--guidance", "-1"], "--guidance"),
    (GEN + ["--guidance", "101"], "--guidance"),
    (GEN + ["--guidance", "x"], "--guidance"),
    (GEN + ["--seed", "-1"], "--seed"),
    (GEN + ["--seed", str(2**63)], "--seed"),
    (GEN + ["--seed", "1e3"], "--seed"),
    (GEN + ["--n", "0"], "--n"),
    (GEN + ["--n", "65"], "--n"),
    (GEN + ["--n", "-2"], "--n"),
    (GEN + ["--init-image", "existing.png", "--strength", "1.5"], "--strength"),
    (GEN + ["--init-image", "existing.png", "--strength", "nan"], "--strength"),
    (GEN + ["--strength", "0.5"], "--strength needs --init-image"),
    (GEN + ["--init-image", "existing.png", "--strength", "0.1", "--steps", "5"], "strength"),
    (GEN + ["--size", "0x64"], "--size"),
    (GEN + ["--size", "64x60"], "--size"),
    (GEN + ["--size", "64"], "--size"),
    (GEN + ["--size", "9000x64"], "--size"),
    (GEN + ["--size", "-64x64"], "--size"),
    (GEN + ["--out", "existing.png"], "--out existing.png: already exists; pass --overwrite"),
    (GEN + ["--out", "noext"], "--out noext: no suffix"),
    (GEN + ["--out", "image.gif"], "--out image.gif: suffix '.gif'"),
    (GEN + ["--out", "folder.png"], "--out folder.png: is a folder"),
    (GEN + ["--out", "existing.png", "--n", "2"], "--out existing-0.png: already exists"),
    (GEN + ["--out", "notimage.txt/x.png"], "notimage.txt is a file"),
    (GEN + ["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder or file"),
    (GEN + ["--model", "notimage.txt"], "notimage.txt"),
    (GEN + ["--init-image", "missing.png"], "--init-image missing.png: no such file"),
    (GEN + ["--init-image", "notimage.txt"], "--init-image notimage.txt: not an image"),
    (GEN + ["--scheduler", "heun"], "--scheduler"),
    (GEN + ["--dtype", "fp64"], "--dtype"),
    (GEN + ["--device", "tpu"], "--device"),
    (GEN + ["--backend", "fast"], "--backend"),
    (GEN + ["--arch", "huge"], "--arch"),
    (GEN + ["--model", "x", "--arch", "tiny"], "--arch"),
    (GEN + ["--lora", "missing.safetensors"], "--lora missing.safetensors: no such LoRA file"),
    (GEN + ["--lora", "notimage.txt"], "--lora notimage.txt: not a .safetensors file"),
    (GEN + ["--lora", "style.safetensors:abc"], "--lora"),
    (GEN + ["--lora", "style.safetensors:nan"], "--lora"),
    (GEN + ["--lora", "style.safetensors:11"], "--lora"),
    (["lora", "inspect", "missing.safetensors"], "missing.safetensors: no such LoRA file"),
    (["lora", "inspect", "notimage.txt"], "notimage.txt: not a .safetensors file"),
    (["generate"], "prompt"),
    (["validate", "--dtype", "fp64"], "--dtype"),
    (["validate", "--steps", "0", "--arch", "tiny"], "--steps"),
    (["validate", "--size", "12x12", "--arch", "tiny"], "--size"),
    (["profile", "--steps", "0"], "--steps"),
    (["profile", "--batch", "0"], "--batch"),
    (["profile", "--size", "65x64"], "--size"),
    (["profile", "--compare", "kernels"], "--compare"),
    (["profile", "--compare", "kernels,bogus"], "--compare"),
    (["profile", "--backend", "torch", "--compare", "kernels,torch"], "--compare"),
    (["frobnicate"], "invalid choice"),
]
if NO_GPU:
    BAD += [(GEN + ["--device", "cuda"], "--device cuda"), (["validate", "--device", "cuda"], "--device cuda")]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (200, 10, 10)).save("existing.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save("existing-0.png")
    (tmp_path / "notimage.txt").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    return tmp_path


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_at_least_forty_bad_invocations():
    assert len(BAD) >= 40


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a[len(GEN):] if a[:len(GEN)] == GEN else a)[:70]
                                                    for a, _ in BAD])
def test_bad_invocation_is_one_clear_line_and_touches_no_file(workdir, capsys, argv, fragment):
    before = _snapshot(workdir)
    code, out, err = _main(argv, capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in out + err
    assert fragment in err, err
    assert _snapshot(workdir) == before


def test_help_shows_each_numbers_range(capsys):
    code, out, _ = _main(["generate", "--help"], capsys)
    assert code == 0
    for fragment in ("--steps N", "1..1000 (default 25)", "[0, 100]; <= 1 turns it off (default 7.5; SDXL 5.0)",
                     "1..64 (default 1)", "0..9223372036854775807", "[0, 1] (default 0.8; SDXL 0.3)", "multiples of 8 in 8..8192"):
        assert fragment in " ".join(out.split()), fragment


def test_every_command_has_the_same_device_default(capsys):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for command in ("generate", "validate", "profile"):
        _, out, _ = _main([command, "--help"], capsys)
        assert f"(default {expected}: cuda when torch sees a GPU" in " ".join(out.split()), command


def test_jpeg_and_webp_keep_the_parameters_and_prompts_cannot_forge_lines(workdir, capsys):
    prompt = "a cat\nSteps: 999, Seed: 1"
    for name in ("a.jpg", "b.webp", "c.png"):
        code, _, err = _main(["generate", prompt, "--steps", "2", "--size", "64x64", "--seed", "7", "--no-progress",
                              "--out", name], capsys)
        assert code == 0, err
        text = outputs.read_parameters(workdir / name)
        lines = text.split("\n")
        assert len(lines) == 3 and lines[0] == "a cat\\nSteps: 999, Seed: 1", text
        assert lines[2].startswith("Steps: 2, Sampler: pndm") and "Seed: 7" in lines[2], text
        assert Image.open(workdir / name).size == (64, 64)
    assert not [p for p in os.listdir(workdir) if p.endswith(".partial")]


def test_overwrite_replaces_and_without_it_nothing_changes(workdir, capsys):
    old = (workdir / "existing.png").read_bytes()
    code, _, _ = _main(GEN + ["--out", "existing.png"], capsys)
    assert code == 2 and (workdir / "existing.png").read_bytes() == old
    code, _, err = _main(GEN + ["--out", "existing.png", "--overwrite", "--seed", "1"], capsys)
    assert code == 0, err
    assert (workdir / "existing.png").read_bytes() != old
    assert "Seed: 1" in outputs.read_parameters(workdir / "existing.png")


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(workdir, capsys, monkeypatch):
    old = (workdir / "existing.png").read_bytes()

    def disk_full(image, fmt, parameters, fp):
        fp.write(b"\x89PNG half an image")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(outputs, "encode", disk_full)
    code, _, err = _main(GEN + ["--out", "existing.png", "--overwrite"], capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert (workdir / "existing.png").read_bytes() == old
    assert sorted(os.listdir(workdir)) == ["existing-0.png", "existing.png", "folder.png", "notimage.txt"]


def test_an_output_that_appears_during_generation_is_not_replaced(workdir):
    image = Image.new("RGB", (8, 8))
    (workdir / "late.png").write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match="late.png: already exists"):
        outputs.save(image, workdir / "late.png", "p")
    assert (workdir / "late.png").read_bytes() == b"someone else's file"
    assert not [p for p in os.listdir(workdir) if p.endswith(".partial")]


def test_nan_generation_exits_1_and_writes_nothing(workdir, capsys, monkeypatch):
    from sdcore import embedded

    build = embedded.build

    def poisoned(*args, **kwargs):
        pipe = build(*args, **kwargs)
        with torch.no_grad():
            pipe.unet.conv_in.weight.fill_(float("nan"))
        return pipe
    monkeypatch.setattr(embedded, "build", poisoned)
    code, _, err = _main(GEN + ["--out", "nan.png", "--steps", "3"], capsys)
    assert code == 1 and "the UNet produced NaN/Inf at step 1 of 3" in err and "--allow-nan" in err
    assert "Traceback" not in err and not (workdir / "nan.png").exists()
    code, _, err = _main(GEN + ["--out", "nan.png", "--allow-nan"], capsys)
    assert code == 0 and (workdir / "nan.png").exists()


def test_internal_error_is_one_line_and_debug_shows_the_traceback(workdir, capsys, monkeypatch):
    from sdcore import embedded

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")
    monkeypatch.setattr(embedded, "build", broken)
    code, _, err = _main(GEN + ["--out", "x.png"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: something inside broke" in err and "run with --debug" in err
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(GEN + ["--out", "x.png", "--debug"])


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_file(tmp_path):
    """A real process, interrupted while it denoises: no traceback, no image, no temporary file."""
    # SIGINT back to its default in the child: a shell without job control starts background jobs with SIGINT
    # ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler (a test suite run
    # as `make test &` failed here with the image written). A user's Ctrl-C always reaches a default handler.
    proc = subprocess.Popen([sys.executable, "-m", "sdcore", "generate", "a cat", "--steps", "900", "--scheduler", "euler", "--size",
                             "64x64", "--out", str(tmp_path / "x.png")], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.monotonic() + 120
    while not re.search(r"\| [1-9]\d*/900", seen):  # a step is done: it is denoising
        assert time.monotonic() < deadline and proc.poll() is None, seen
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "sdcore: interrupted"
    assert os.listdir(tmp_path) == []
