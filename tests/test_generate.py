"""`sdcore generate`: the embedded default, a diffusers folder written by diffusers, img2img, and errors."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")


def sdcore(*args):
    return subprocess.run([sys.executable, "-m", "sdcore", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_pipeline import _diffusers_pipeline

    path = tmp_path_factory.mktemp("model")
    _diffusers_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def test_embedded_default_writes_a_png_and_says_it_is_random(tmp_path):
    out = tmp_path / "cat.png"
    run = sdcore("generate", "a photo of a cat", "--steps", "3", "--size", "64x64", "--seed", "3", "--out", str(out),
                 "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RANDOM weights" in run.stderr and "--model" in run.stderr
    image = Image.open(out)
    assert image.size == (64, 64) and np.asarray(image).std() > 1  # not blank
    assert "Seed: 3" in image.info["parameters"] and "a photo of a cat" in image.info["parameters"]
    again = tmp_path / "again.png"
    assert sdcore("generate", "a photo of a cat", "--steps", "3", "--size", "64x64", "--seed", "3",
                  "--out", str(again), "--no-progress").returncode == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(image))


def test_model_folder_several_images_scheduler_and_img2img(model_dir, tmp_path):
    out = tmp_path / "x.png"
    run = sdcore("generate", "a red car", "--model", str(model_dir), "--steps", "2", "--n", "2", "--seed", "10",
                 "--scheduler", "euler-a", "--backend", "reference", "--negative-prompt", "blurry", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RANDOM" not in run.stderr and "2/2" in run.stderr  # a progress bar by default
    first, second = Image.open(tmp_path / "x-0.png"), Image.open(tmp_path / "x-1.png")
    assert first.size == (16, 16) and "Seed: 11" in second.info["parameters"]
    assert "Sampler: euler-a" in first.info["parameters"]
    run = sdcore("generate", "a blue car", "--model", str(model_dir), "--init-image", str(tmp_path / "x-0.png"),
                 "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "y.png"), "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(tmp_path / "y.png").size == (16, 16)


@pytest.mark.parametrize("args,fragment", [
    (["--size", "60x64"], "multiples of 8"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--model", "/nonexistent/model"], "no such folder or file"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--scheduler", "heun"], "invalid choice"),
])
def test_bad_arguments_are_clear_errors(args, fragment, capsys, tmp_path):
    from sdcore import cli

    try:
        code = cli.main(["generate", "x", "--steps", "1", "--no-progress", "--out", str(tmp_path / "u.png"), *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "u.png").exists()
