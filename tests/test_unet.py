"""sdcore's UNet2DConditionModel against diffusers' on the same saved weights (fp32, random init, small configs),
and an SD1.5-size UNet on the kernels backend against the reference backend."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdcore
from sdcore import ops
from sdcore.models import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")

CONFIGS = {
    # SD 1.x layout: heads given as attention_head_dim, 1x1-conv projections.
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32,
                norm_num_groups=8, sample_size=16),
    # SD 2.x layout: per-block heads (reversed on the way up), Linear projections, upcast attention.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 4),
                cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                sample_size=16),
    # The remaining keys away from SD's values: sin-first features, shifted frequencies, two transformer blocks
    # per attention, a different number of resnets per block.
    "options": dict(block_out_channels=(32, 64), layers_per_block=(1, 2), transformer_layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                    cross_attention_dim=16, norm_num_groups=16, flip_sin_to_cos=False, freq_shift=1, sample_size=8),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the small models' ops are tiny, and on a busy two-core machine waking the thread pool
    for every op costs more than the ops (2-3x this file's runtime, the SD1.5-size forward included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIGS[request.param]).eval()
    with torch.no_grad():  # random init leaves norms at identity and proj_out at zero: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(f"unet_{request.param}")
    ref.save_pretrained(path, safe_serialization=True)
    return request.param, ref, path


@pytest.fixture(scope="module")
def expected(saved):
    """diffusers' outputs on the input cases, computed once per config."""
    name, ref, _ = saved
    with torch.no_grad():
        return [(x, t, context, ref(x, t, context).sample) for x, t, context in _cases(CONFIGS[name])]


def _inputs(cfg, batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    return x, torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)


def _cases(cfg):
    """(sample, timestep, encoder_hidden_states): a python int; per-sample timesteps at an odd size; the CFG batch
    (one latent twice, uncond and cond text, a 0-d timestep) at 12x10, which sd2's down path rounds up (10 -> 5 ->
    3); a python float."""
    x1, c1 = _inputs(cfg, 1, 16, 16, 1)
    x2, c2 = _inputs(cfg, 2, 9, 11, 2)
    x3, c3 = _inputs(cfg, 2, 12, 10, 3)
    return [(x1, 999, c1), (x2, torch.tensor([10, 500]), c2), (x3[:1].repeat(2, 1, 1, 1), torch.tensor(981), c3),
            (x1, 0.5, c1)]


@pytest.mark.parametrize("backend", ["reference", "kernels", "torch"])
def test_matches_diffusers(saved, expected, backend):
    name, _, path = saved
    unet = UNet2DConditionModel.from_pretrained(path, subfolder=None, variant=None, device=None, dtype=None)
    errors = []
    with torch.no_grad():
        for x, t, context, want in expected:
            with sdcore.use_backend(backend):
                got = unet(x, t, context)
            assert got.shape == want.shape
            errors.append(_rel(got, want))
    assert max(errors) <= 1e-4, errors
    assert isinstance(unet.config, sdcore.loading.Config)
    assert unet.config.sample_size == CONFIGS[name]["sample_size"] and unet.config.in_channels == 4


@pytest.mark.parametrize("saved", ["sd1", "sd2"], indirect=True)
def test_gradients_match_diffusers(saved):
    name, ref, path = saved
    unet = UNet2DConditionModel.from_pretrained(path)
    x, context = _inputs(CONFIGS[name], 1, 8, 8, 4)
    grads = []
    for run in (lambda s: unet(s, 10, context), lambda s: ref(s, 10, context).sample):
        sample = x.clone().requires_grad_()
        run(sample).square().mean().backward()
        grads.append(sample.grad)
    assert grads[0].abs().max() > 0 and _rel(grads[0], grads[1]) <= 1e-4


@pytest.mark.parametrize("saved", ["sd2"], indirect=True)
def test_num_attention_heads_overrides_attention_head_dim(saved):
    _, ref, path = saved
    cfg = dict(CONFIGS["sd2"], num_attention_heads=CONFIGS["sd2"]["attention_head_dim"], attention_head_dim=64)
    unet = UNet2DConditionModel.from_config(cfg)
    unet.load_state_dict(load_file(str(path / "diffusion_pytorch_model.safetensors")))
    x, t, context = _cases(CONFIGS["sd2"])[1]
    with torch.no_grad():
        assert _rel(unet(x, t, context), ref(x, t, context).sample) <= 1e-4


def test_channels_last_matches_contiguous(saved):
    name, _, path = saved
    unet = UNet2DConditionModel.from_pretrained(path)
    x, t, context = _cases(CONFIGS[name])[1]
    with torch.no_grad():
        want = unet(x, t, context)
        got = unet.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, context)
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_and_upcast(saved, dtype, tol, monkeypatch):
    """Half-precision runs close to float32; with upcast_attention the attention itself runs in float32."""
    name, _, path = saved
    unet = UNet2DConditionModel.from_pretrained(path)
    x, t, context = _cases(CONFIGS[name])[1]
    with torch.no_grad():
        want = unet(x, t, context)
        seen, attention = [], ops.attention

        def recording_attention(q, k, v, **kwargs):
            seen.append(q.dtype)
            return attention(q, k, v, **kwargs)

        monkeypatch.setattr(ops, "attention", recording_attention)
        low = unet.to(dtype)(x.to(dtype), t, context.to(dtype))
    assert low.dtype == dtype and _rel(low, want) < tol
    assert set(seen) == {torch.float32 if CONFIGS[name].get("upcast_attention") else dtype}


@pytest.mark.parametrize("saved", ["sd1"], indirect=True)
def test_missing_tensor_is_named(saved, tmp_path):
    _, _, path = saved
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    state.pop("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing tensors: mid_block\.attentions\.0\.transformer_blocks\.0\.attn2"):
        UNet2DConditionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_image"), ("only_cross_attention", True),
    ("only_cross_attention", [False, True]), ("mid_block_type", "UNetMidBlock2D"), ("dual_cross_attention", True),
    ("time_embedding_type", "fourier"), ("resnet_time_scale_shift", "scale_shift"), ("norm_num_groups", None),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]), ("transformer_layers_per_block", [[1, 2], [1, 2]]),
    ("attention_head_dim", [2, 4, 8]), ("up_block_types", ["UpBlock2D"]),
])
def test_unsupported_config_is_rejected_by_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel.from_config(dict(CONFIGS["sd1"], **{key: value}))


def test_unknown_keys_are_ignored():
    unet = UNet2DConditionModel.from_config(dict(CONFIGS["sd1"], _class_name="UNet2DConditionModel",
                                                 _diffusers_version="0.6.0", dropout=0.0))
    assert "_class_name" not in unet.config and unet.config.block_out_channels == (32, 64)


SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, sample_size=64)
SD21 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True, sample_size=96)


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_real_sizes_have_diffusers_parameters(config):
    """Every parameter name and shape of the real SD 1.5 / 2.1 UNets, built on the meta device (no memory)."""
    with torch.device("meta"):
        want = diffusers.UNet2DConditionModel(**config).state_dict()
        got = UNet2DConditionModel.from_config(config).state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


@pytest.fixture(scope="module")
def sd15():
    """The SD1.5 UNet with seeded random weights. Initialising 860M parameters module by module takes ~15 s on
    two cores, so the weights are cut from one seeded ring of normals: matrices scaled by 1/sqrt(fan_in), norm
    weights around 1, biases small."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15)
    unet = unet.to_empty(device="cpu").eval()
    ring_size = 1_000_003  # prime, so equal-length rows never repeat each other
    ring = torch.randn(ring_size, generator=torch.Generator().manual_seed(0)).repeat(2)
    offset = 0
    with torch.no_grad():
        for name, p in unet.named_parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), ring_size):
                n = min(ring_size, flat.numel() - start)
                flat[start:start + n] = ring[offset:offset + n]
                offset = (offset + n) % ring_size
            if p.dim() > 1:
                p.mul_(p[0].numel() ** -0.5)
            else:
                p.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return unet


def test_sd15_size_kernels_match_reference(sd15):
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964  # SD1.5's UNet
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        with sdcore.use_backend("reference"):
            want = sd15(x, torch.tensor(981), context)
        with sdcore.use_backend("kernels"):
            got = sd15(x, torch.tensor(981), context)
    assert got.shape == x.shape and want.std() > 0.1
    assert _rel(got, want) <= 1e-4


def _gemms(module, *args) -> int:
    """How many matrix products ``module(*args)`` runs (aten mm / addmm / bmm, however F.linear lowers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in products
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        module(*args)
    return Count.n


def test_attention_projections_are_one_fused_gemm(saved):
    """q, k, v (self-attention) and k, v (cross-attention) are one GEMM each over views of one fused weight;
    the parameters keep diffusers' names and stay those views through loading, .to(), and in-place changes."""
    unet = UNet2DConditionModel.from_pretrained(saved[2])
    block = next(b for b in unet.down_blocks if getattr(b, "attentions", None)).attentions[0].transformer_blocks[0]
    attn1, attn2 = block.attn1, block.attn2
    for attn, group in ((attn1, ("to_q", "to_k", "to_v")), (attn2, ("to_k", "to_v"))):
        rows = attn.to_q.weight.shape[0]
        for i, name in enumerate(group):
            w = getattr(attn, name).weight
            assert w.data_ptr() == attn.fused.data_ptr() + i * w.numel() * w.element_size(), name
            assert torch.equal(attn.fused[i * rows:(i + 1) * rows], w)
    assert "fused" not in "".join(unet.state_dict()) and any(k.endswith("attn1.to_q.weight") for k in unet.state_dict())
    x = torch.randn(2, 16, attn1.to_q.weight.shape[1])
    text = torch.randn(2, 7, attn2.to_k.weight.shape[1])
    assert _gemms(attn1, x) == 2 and _gemms(attn2, x, text) == 3  # (q,k,v) + out; q + (k,v) + out

    before = attn1(x)
    with torch.no_grad():  # an in-place change of a parameter (what a LoRA merge does) is the fused weight's
        attn1.to_k.weight.mul_(2.0)
    assert torch.equal(attn1.fused[attn1.to_q.weight.shape[0]:][:attn1.to_k.weight.shape[0]], attn1.to_k.weight)
    assert not torch.equal(attn1(x), before)

    ptr = attn1.fused.data_ptr()
    unet.to(torch.float32)  # a .to() that changes nothing keeps every storage (captured graphs stay valid)
    assert attn1.fused.data_ptr() == ptr
    unet.to(torch.float64)
    assert attn1.fused.dtype == torch.float64 and attn1.to_v.weight.dtype == torch.float64
    assert attn1.to_v.weight.data_ptr() == attn1.fused.data_ptr() + 2 * attn1.to_v.weight.numel() * 8
