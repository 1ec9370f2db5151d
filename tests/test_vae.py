"""sdcore's AutoencoderKL against diffusers' on the same saved weights (fp32, random init, small config)."""
import pytest
import torch

import sdcore
from sdcore.models import AutoencoderKL

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")

CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              norm_num_groups=32, sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**CONFIG).eval()
    with torch.no_grad():  # random init leaves some norms at identity: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["kernels", "reference", "torch"])
def test_encode_and_decode_match_diffusers(saved, backend):
    ref, path = saved
    vae = AutoencoderKL.from_pretrained(path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), sdcore.use_backend(backend):
        post = vae.encode(x)
        want = ref.encode(x).latent_dist
        assert _rel(post.mean, want.mean) < 1e-4
        assert _rel(post.std, want.std) < 1e-4
        assert _rel(vae.decode(z), ref.decode(z).sample) < 1e-4
    assert vae.config.scaling_factor == 0.18215


def test_sample_uses_the_generator(saved):
    vae = AutoencoderKL.from_pretrained(saved[1])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        post = vae.encode(x)
        a = post.sample(torch.Generator().manual_seed(3))
        b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mean)


def test_channels_last_and_bf16(saved):
    vae = AutoencoderKL.from_pretrained(saved[1])
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z)
        got = vae.to(memory_format=torch.channels_last).decode(z.to(memory_format=torch.channels_last))
        assert _rel(got, want) < 1e-4
        low = vae.to(torch.bfloat16).decode(z.bfloat16())
    assert low.dtype == torch.bfloat16 and _rel(low.float(), want) < 5e-2


def test_missing_unexpected_and_wrong_shape_tensors_are_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    target = tmp_path / "diffusion_pytorch_model.safetensors"

    broken = dict(state)
    broken.pop("decoder.conv_out.weight")
    broken["extra.weight"] = torch.zeros(1)
    broken["encoder.conv_in.bias"] = torch.zeros(7)
    save_file(broken, str(target))
    with pytest.raises(ValueError) as info:
        AutoencoderKL.from_pretrained(tmp_path)
    msg = str(info.value)
    assert str(target) in msg and "decoder.conv_out.weight" in msg and "extra.weight" in msg
    assert "encoder.conv_in.bias: file (7,)" in msg

    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        AutoencoderKL.from_pretrained(tmp_path)
    target.unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")
