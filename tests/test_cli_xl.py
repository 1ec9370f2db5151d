"""The CLI on SDXL: `generate` picks the XL pipeline from a diffusers folder (base and refiner) or --arch,
--vae replaces the VAE, and `validate` / `profile` run the tiny-xl embedded model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdcore import cli

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SDXL base and refiner saved by diffusers (test_pipeline_xl's models), and a VAE folder whose
    decode goes NaN."""
    from test_pipeline_xl import _models

    from sdcore import loading

    vae, enc, enc2, unet, refiner_unet = _models()
    euler = diffusers.EulerDiscreteScheduler.from_config(dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                              beta_start=0.00085, beta_end=0.012, steps_offset=1))
    root = tmp_path_factory.mktemp("xl")
    diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=loading.default_tokenizer(),
        tokenizer_2=loading.default_tokenizer(pad_token="!"), unet=unet, scheduler=euler,
    ).save_pretrained(root / "base", safe_serialization=True)
    diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=enc2, tokenizer=None,
        tokenizer_2=loading.default_tokenizer(pad_token="!"), unet=refiner_unet, scheduler=euler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    ).save_pretrained(root / "refiner", safe_serialization=True)
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    vae.save_pretrained(root / "nan_vae", safe_serialization=True)
    return root


def _generate(capsys, *args):
    code = cli.main(["generate", "a red car", "--steps", "2", "--seed", "4", "--no-progress", *args])
    return code, capsys.readouterr().err


def test_generate_from_an_xl_folder_and_refine_it(folders, tmp_path, capsys):
    code, err = _generate(capsys, "--model", str(folders / "base"), "--out", str(tmp_path / "base.png"))
    assert code == 0, err
    image = Image.open(tmp_path / "base.png")
    assert image.size == (16, 16) and np.asarray(image).std() > 1
    assert "CFG scale: 5.0" in image.info["parameters"]  # SDXL's default guidance
    code, err = _generate(capsys, "--model", str(folders / "refiner"), "--init-image", str(tmp_path / "base.png"),
                          "--steps", "4", "--out", str(tmp_path / "refined.png"))
    assert code == 0, err
    assert "Denoising strength: 0.3" in Image.open(tmp_path / "refined.png").info["parameters"]


def test_the_refiner_without_an_image_is_a_clear_error(folders, tmp_path, capsys):
    code, err = _generate(capsys, "--model", str(folders / "refiner"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "requires_aesthetics_score" in err and "StableDiffusionXLImg2ImgPipeline" in err
    assert not (tmp_path / "x.png").exists()


def test_vae_replacement_is_used_and_a_nan_decode_names_it(folders, tmp_path, capsys):
    code, err = _generate(capsys, "--model", str(folders / "base"), "--vae", str(folders / "nan_vae"),
                          "--out", str(tmp_path / "x.png"))
    assert code == 1 and f"VAE ({folders / 'nan_vae'}) ran in float32" in err and "No file was written" in err
    assert not (tmp_path / "x.png").exists()
    code, err = _generate(capsys, "--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "--vae" in err and "no such folder" in err


def test_generate_and_validate_the_embedded_tiny_xl(tmp_path, capsys):
    code, err = _generate(capsys, "--arch", "tiny-xl", "--size", "64x64", "--out", str(tmp_path / "x.png"))
    assert code == 0 and "SDXL architecture with RANDOM weights" in err
    assert cli.main(["validate", "--arch", "tiny-xl", "--size", "64x64", "--steps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(rows) == 4 and all(r.endswith("PASS") for r in rows)


def test_profile_the_embedded_tiny_xl(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["profile", "--arch", "tiny-xl", "--size", "64x64", "--steps", "1", "--out",
                     str(tmp_path / "prof")]) == 0
    summary = json.loads((tmp_path / "prof" / "summary.json").read_text())
    first = summary["runs"][0] if "runs" in summary else summary
    text = json.dumps(first)
    assert '"text_encoder"' in text and '"unet"' in text


def test_vae_tiling_decodes_tile_by_tile(tmp_path, capsys):
    """--vae-tiling at 384² on tiny-xl (whose VAE tile is 256 px): the image is what the API makes with
    pipe.enable_vae_tiling(), and not the untiled one."""
    from sdcore import embedded

    args = ("--arch", "tiny-xl", "--size", "384x384", "--steps", "1")
    assert _generate(capsys, *args, "--vae-tiling", "--out", str(tmp_path / "tiled.png"))[0] == 0
    assert _generate(capsys, *args, "--out", str(tmp_path / "whole.png"))[0] == 0
    pipe = embedded.build("tiny-xl")
    pipe.enable_vae_tiling()
    want = pipe("a red car", height=384, width=384, num_inference_steps=1, seed=4, progress=False).images[0]
    tiled, whole = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("tiled", "whole"))
    assert np.array_equal(tiled, np.asarray(want))
    assert not np.array_equal(tiled, whole)
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_tiling
