"""LoRA / LyCORIS adapters: parity with diffusers' load_lora_weights (PEFT) for kohya and PEFT files on the UNet
and text encoder; LoCon, LoHa and LoKr against weights merged by hand from the formats' formulas; and the
guarantees: in-place merges, bitwise unload, atomic refusal, drift-free switching, the readers-writer lock."""
import logging
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdcore import lora
from sdcore.pipelines import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")
pytest.importorskip("peft", reason="peft is diffusers' LoRA backend, the oracle here: `make test` installs it")

from test_pipeline import _latents, _max_diff, saved  # noqa: E402,F401  (saved: the module's fixture)

PROMPT = "a photo of a cat"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture
def pipe(saved):  # a fresh one per test: the tests change its weights
    return StableDiffusionPipeline.from_pretrained(saved[1])


def _ref(saved):
    """diffusers' pipeline on the saved weights, fresh (load_lora_weights changes it)."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(saved[1], safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _modules(model, suffixes):
    return {n: m for n, m in model.named_modules() if n.endswith(suffixes) and hasattr(m, "weight")}


def _snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _assert_same(pipe, snap):
    now = _snapshot(pipe)
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k


def _kohya(pipe, seed, rank=4, alpha=2.0, te=True, conv=False):
    """A kohya/A1111 file for ``pipe``'s modules (names: diffusers' with dots as underscores)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    targets = [("lora_unet_", _modules(pipe.unet, ATTN))]
    if te:
        targets.append(("lora_te_text_model_", _modules(pipe.text_encoder, TE)))
    if conv:
        targets.append(("lora_unet_", {n: m for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d)}))
    for prefix, modules in targets:
        for name, m in modules.items():
            name = name.removeprefix("text_model.")
            key = prefix + name.replace(".", "_")
            w = m.weight
            kernel = tuple(w.shape[2:])
            out[key + ".lora_down.weight"] = torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.3
            out[key + ".lora_up.weight"] = torch.randn(w.shape[0], rank, *((1, 1) if kernel else ()), generator=g) * 0.3
            out[key + ".alpha"] = torch.tensor(alpha)
    return out


def _peft(pipe, seed, rank=4):
    """A diffusers/PEFT-format state dict (unet.* / text_encoder.*, lora_A / lora_B, scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, modules in (("unet.", _modules(pipe.unet, ATTN)),
                            ("text_encoder.text_model.", _modules(pipe.text_encoder, TE))):
        for name, m in modules.items():
            key = prefix + name.removeprefix("text_model.")
            out[key + ".lora_A.weight"] = torch.randn(rank, m.weight.shape[1], generator=g) * 0.3
            out[key + ".lora_B.weight"] = torch.randn(m.weight.shape[0], rank, generator=g) * 0.3
    return out


def _run(p, **kw):
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", **kw)
    if isinstance(p, StableDiffusionPipeline):
        kw["progress"] = False
    return p(PROMPT, latents=_latents(), **kw).images


# ------------------------------------------------------------------------------------------ diffusers parity
def test_kohya_and_peft_files_and_mixing_match_diffusers(saved, pipe, tmp_path):
    ref = _ref(saved)
    kohya = _kohya(pipe, 1)
    peft = _peft(pipe, 2)
    save_file(kohya, tmp_path / "style.safetensors")
    save_file(peft, tmp_path / "peft.safetensors")
    base = _run(pipe)

    pipe.load_lora_weights(tmp_path / "style.safetensors")
    ref.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    got, want = _run(pipe), _run(ref)
    assert _max_diff(got, base) > 0.02  # the adapter does something
    assert _max_diff(got, want) <= 2e-3

    pipe.load_lora_weights(tmp_path / "peft.safetensors", adapter_name="peft")
    ref.load_lora_weights(str(tmp_path / "peft.safetensors"), adapter_name="peft")
    pipe.set_adapters(["peft"])
    ref.set_adapters(["peft"])
    assert _max_diff(_run(pipe), _run(ref)) <= 2e-3

    pipe.set_adapters(["style", "peft"], [0.7, 0.4])
    ref.set_adapters(["style", "peft"], [0.7, 0.4])
    assert _max_diff(_run(pipe), _run(ref)) <= 2e-3

    pipe.set_adapters("style", 0.5)
    ref.set_adapters("style", 0.5)
    assert pipe.get_active_adapters() == ["style"]
    assert _max_diff(_run(pipe), _run(ref)) <= 2e-3

    pipe.unload_lora_weights()
    assert _run(pipe).tobytes() == base.tobytes()


# ------------------------------------------------------------------------------------------ LyCORIS by hand
def _rand(g, *shape):
    return torch.randn(*shape, generator=g) * 0.2


def test_locon_loha_lokr_match_weights_merged_by_hand(pipe, tmp_path):
    """Each ΔW written here from the formats' definitions (loops / explicit products), not from sdcore."""
    g = torch.Generator().manual_seed(3)
    u = pipe.unet
    W = {n: m.weight.detach().clone() for n, m in u.named_modules() if hasattr(m, "weight") and m.weight is not None}
    sd, want = {}, {}

    def key(name):
        return "lora_unet_" + name.replace(".", "_")

    # LoCon: conv 3x3 (resnet), 1x1 (shortcut, SD 1.x proj_in), the downsampler; down [r, in, kh, kw], up [out, r, 1, 1]
    for name in ("down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
                 "down_blocks.0.attentions.0.proj_in", "down_blocks.0.downsamplers.0.conv"):
        o, i, kh, kw = W[name].shape
        r, alpha = 3, 1.5
        down, up = _rand(g, r, i, kh, kw), _rand(g, o, r, 1, 1)
        sd |= {key(name) + ".lora_down.weight": down, key(name) + ".lora_up.weight": up,
               key(name) + ".alpha": torch.tensor(alpha)}
        delta = torch.zeros(o, i, kh, kw)
        for k in range(r):
            delta += up[:, k, 0, 0][:, None, None, None] * down[k][None]
        want[name] = W[name] + delta * alpha / r
    # LoCon with a CP mid: up [out, r], mid [r, r, kh, kw], down [r, in]
    name = "up_blocks.0.upsamplers.0.conv"
    o, i, kh, kw = W[name].shape
    r = 2
    down, mid, up = _rand(g, r, i, 1, 1), _rand(g, r, r, kh, kw), _rand(g, o, r, 1, 1)
    sd |= {key(name) + ".lora_down.weight": down, key(name) + ".lora_mid.weight": mid,
           key(name) + ".lora_up.weight": up}  # no alpha: scale 1
    delta = torch.zeros(o, i, kh, kw)
    for a in range(r):
        for b in range(r):
            delta += up[:, a, 0, 0][:, None, None, None] * mid[a, b][None, None] * down[b, :, 0, 0][None, :, None, None]
    want[name] = W[name] + delta

    # LoHa on a Linear: (w1a @ w1b) * (w2a @ w2b) * alpha / r
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    o, i = W[name].shape
    r, alpha = 4, 2.0
    w1a, w1b, w2a, w2b = _rand(g, o, r), _rand(g, r, i), _rand(g, o, r), _rand(g, r, i)
    sd |= {key(name) + ".hada_w1_a": w1a, key(name) + ".hada_w1_b": w1b, key(name) + ".hada_w2_a": w2a,
           key(name) + ".hada_w2_b": w2b, key(name) + ".alpha": torch.tensor(alpha)}
    want[name] = W[name] + torch.mm(w1a, w1b) * torch.mm(w2a, w2b) * alpha / r
    # LoHa with Tucker cores on a 3x3 conv: each factor W[o, i, k, l] = Σ t[a, b, k, l] wa[a, o] wb[b, i]
    name = "up_blocks.0.resnets.0.conv2"
    o, i, kh, kw = W[name].shape
    r, alpha = 2, 1.0
    t1, a1, b1 = _rand(g, r, r, kh, kw), _rand(g, r, o), _rand(g, r, i)
    t2, a2, b2 = _rand(g, r, r, kh, kw), _rand(g, r, o), _rand(g, r, i)
    sd |= {key(name) + ".hada_t1": t1, key(name) + ".hada_w1_a": a1, key(name) + ".hada_w1_b": b1,
           key(name) + ".hada_t2": t2, key(name) + ".hada_w2_a": a2, key(name) + ".hada_w2_b": b2,
           key(name) + ".alpha": torch.tensor(alpha)}

    def tucker(t, wa, wb):
        out = torch.zeros(o, i, kh, kw)
        for a in range(r):
            for b in range(r):
                out += wa[a][:, None, None, None] * wb[b][None, :, None, None] * t[a, b][None, None]
        return out
    want[name] = W[name] + tucker(t1, a1, b1) * tucker(t2, a2, b2) * alpha / r

    # LoKr, both factors full: kron(w1, w2), scale 1 whatever alpha says
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    o, i = W[name].shape
    w1, w2 = _rand(g, 2, 4), _rand(g, o // 2, i // 4)
    sd |= {key(name) + ".lokr_w1": w1, key(name) + ".lokr_w2": w2, key(name) + ".alpha": torch.tensor(7.0)}
    kron = torch.zeros(o, i)
    for p in range(2):
        for q in range(4):
            kron[p * (o // 2):(p + 1) * (o // 2), q * (i // 4):(q + 1) * (i // 4)] = w1[p, q] * w2
    want[name] = W[name] + kron
    # LoKr, w2 low-rank: kron(w1, w2a @ w2b) * alpha / r
    name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    o, i = W[name].shape
    r, alpha = 2, 3.0
    w1, w2a, w2b = _rand(g, 4, 2), _rand(g, o // 4, r), _rand(g, r, i // 2)
    sd |= {key(name) + ".lokr_w1": w1, key(name) + ".lokr_w2_a": w2a, key(name) + ".lokr_w2_b": w2b,
           key(name) + ".alpha": torch.tensor(alpha)}
    w2 = w2a @ w2b
    want[name] = W[name] + torch.cat([torch.cat([w1[p, q] * w2 for q in range(2)], 1) for p in range(4)], 0) * alpha / r
    # LoKr on a 3x3 conv, w1 factorized and w2 in Tucker form
    name = "up_blocks.1.resnets.0.conv1"
    o, i, kh, kw = W[name].shape
    r, alpha = 2, 1.0
    w1a, w1b = _rand(g, 2, r), _rand(g, r, 4)
    o2, i2 = o // 2, i // 4
    t2, w2a, w2b = _rand(g, r, r, kh, kw), _rand(g, r, o2), _rand(g, r, i2)
    sd |= {key(name) + ".lokr_w1_a": w1a, key(name) + ".lokr_w1_b": w1b, key(name) + ".lokr_t2": t2,
           key(name) + ".lokr_w2_a": w2a, key(name) + ".lokr_w2_b": w2b, key(name) + ".alpha": torch.tensor(alpha)}
    w1 = w1a @ w1b
    w2 = torch.einsum("abkl,ao,bi->oikl", t2, w2a, w2b)
    delta = torch.zeros(o, i, kh, kw)
    for p in range(2):
        for q in range(4):
            delta[p * o2:(p + 1) * o2, q * i2:(q + 1) * i2] = w1[p, q] * w2
    want[name] = W[name] + delta * alpha / r

    save_file(sd, tmp_path / "lyco.safetensors")
    pipe.load_lora_weights(tmp_path / "lyco.safetensors", weight=0.8, strict=True)
    for name, w in W.items():
        got = u.get_submodule(name).weight
        expect = W[name] + (want[name] - W[name]) * 0.8 if name in want else w
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6, msg=name)
    pipe.unload_lora_weights()
    for name, w in W.items():
        assert torch.equal(u.get_submodule(name).weight, w), name


# ------------------------------------------------------------------------------------------ guarantees
def test_merge_is_in_place_and_unload_is_bitwise(pipe, tmp_path):
    snap = _snapshot(pipe)
    ptrs = {n: p.data_ptr() for c in (pipe.unet, pipe.text_encoder) for n, p in c.named_parameters()}
    save_file(_kohya(pipe, 5, conv=True), tmp_path / "a.safetensors")
    pipe.load_lora_weights(tmp_path / "a.safetensors")
    pipe.load_lora_weights(_peft(pipe, 6), adapter_name="b", weight=-0.5)
    assert pipe.get_active_adapters() == ["a", "b"]
    changed = _snapshot(pipe)
    assert not torch.equal(changed["unet.conv_in.weight"], snap["unet.conv_in.weight"])
    for c in (pipe.unet, pipe.text_encoder):
        for n, p in c.named_parameters():
            assert p.data_ptr() == ptrs.get(n), n
    pipe.delete_adapters("a")
    assert pipe.get_active_adapters() == ["b"]
    assert torch.equal(pipe.unet.conv_in.weight, snap["unet.conv_in.weight"])  # only "a" touched it
    pipe.unload_lora_weights()
    _assert_same(pipe, snap)
    assert pipe.get_active_adapters() == []


def test_hundred_weight_changes_drift_by_nothing(pipe):
    pipe.load_lora_weights(_kohya(pipe, 7, conv=True), adapter_name="a")
    pipe.load_lora_weights(_peft(pipe, 8), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.25])
    once = _snapshot(pipe)
    rng = np.random.default_rng(0)
    for _ in range(100):
        pipe.set_adapters(["a", "b"], rng.uniform(-2, 2, size=2).tolist())
    pipe.set_adapters(["a", "b"], [0.5, 0.25])
    _assert_same(pipe, once)


def test_bf16_weights_merge_in_float32_and_cast_once(pipe):
    pipe.unet.to(torch.bfloat16)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    w0 = pipe.unet.get_submodule(name).weight.detach().clone()
    down, up = torch.randn(4, w0.shape[1]), torch.randn(w0.shape[0], 4)
    key = "lora_unet_" + name.replace(".", "_")
    pipe.load_lora_weights({key + ".lora_down.weight": down, key + ".lora_up.weight": up,
                            key + ".alpha": torch.tensor(2.0)}, weight=0.3)
    exact = w0.float() + 0.3 * (up @ down) * 0.5
    got = pipe.unet.get_submodule(name).weight
    assert got.dtype == torch.bfloat16
    # within bf16's rounding of the float32 result (merging in bf16 itself would lose far more)
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-6)
    pipe.unload_lora_weights()
    assert torch.equal(pipe.unet.get_submodule(name).weight, w0)


def test_a_lora_for_another_base_model_is_refused_and_changes_nothing(pipe, tmp_path):
    snap = _snapshot(pipe)
    sd = _kohya(pipe, 9)
    # SD 2.x-like: cross-attention to_k takes wider text features than this model's
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    k = "lora_unet_" + name.replace(".", "_")
    sd[k + ".lora_down.weight"] = torch.randn(4, 48)
    save_file(sd, tmp_path / "sd2.safetensors")
    with pytest.raises(ValueError) as err:
        pipe.load_lora_weights(tmp_path / "sd2.safetensors")
    out = pipe.unet.get_submodule(name).out_features
    assert k in str(err.value) and f"[{out}, 48]" in str(err.value) and f"[{out}, 32]" in str(err.value)
    _assert_same(pipe, snap)
    assert pipe.get_active_adapters() == []


@pytest.mark.parametrize("change,fragment", [
    (lambda sd: sd.update({"lora_unet_conv_in.dora_scale": torch.ones(1, 4, 1, 1)}), "DoRA"),
    (lambda sd: sd.pop(next(k for k in sd if k.endswith("lora_up.weight"))), "without up"),
])
def test_bad_files_are_refused_and_change_nothing(pipe, change, fragment):
    snap = _snapshot(pipe)
    sd = _kohya(pipe, 10)
    change(sd)
    with pytest.raises(ValueError, match=fragment):
        pipe.load_lora_weights(sd)
    _assert_same(pipe, snap)


def test_pickled_and_missing_files_are_refused(pipe, tmp_path):
    torch.save(_kohya(pipe, 11), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        pipe.load_lora_weights(tmp_path / "x.pt")
    (tmp_path / "fake.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="safetensors"):
        pipe.load_lora_weights(tmp_path / "fake.safetensors")
    with pytest.raises(FileNotFoundError):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")


def test_unknown_keys_warn_or_fail_with_strict(pipe, caplog):
    sd = _kohya(pipe, 12) | {"lora_unet_nonexistent_block.lora_down.weight": torch.zeros(1, 2),
                            "lora_unet_nonexistent_block.lora_up.weight": torch.zeros(2, 1), "something_else": torch.zeros(1)}
    snap = _snapshot(pipe)
    with pytest.raises(ValueError, match="3 key"):
        pipe.load_lora_weights(sd, strict=True)
    _assert_same(pipe, snap)
    with caplog.at_level(logging.WARNING, logger="sdcore"):
        pipe.load_lora_weights(sd)
    assert "3 key(s)" in caplog.text and "something_else" in caplog.text


def test_names_and_weights_are_checked(pipe):
    sd = _kohya(pipe, 13, te=False)
    pipe.load_lora_weights(sd, adapter_name="x")
    with pytest.raises(ValueError, match="'x' is already loaded"):
        pipe.load_lora_weights(sd, adapter_name="x")
    with pytest.raises(ValueError, match="'nope', 'nada'"):
        pipe.set_adapters(["x", "nope", "nada"])
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        pipe.delete_adapters("nope")
    for bad in (float("nan"), float("inf"), 11.0):
        with pytest.raises(ValueError, match="finite number in"):
            pipe.set_adapters("x", bad)
        with pytest.raises(ValueError, match="weight"):
            pipe.load_lora_weights(sd, adapter_name="y", weight=bad)
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        pipe.set_adapters(["x"], [1.0, 2.0])
    assert pipe.get_active_adapters() == ["x"]


def test_from_pipe_shares_the_adapters(pipe):
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    pipe.load_lora_weights(_kohya(pipe, 14, te=False), adapter_name="s")
    assert img2img.get_active_adapters() == ["s"]
    img2img.unload_lora_weights()
    assert pipe.get_active_adapters() == []


def test_a_switch_waits_for_the_running_generation(pipe):
    """The generation blocks in its callback while another thread loads and then unloads: neither may happen
    until the generation ends, and the generation sees the weights it started with."""
    sd = _kohya(pipe, 15, te=False)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = pipe.unet.get_submodule(name).weight.detach().clone()
    in_step, release, switched = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def callback(p, i, t, kw):
        seen.append(torch.equal(p.unet.get_submodule(name).weight, w0))
        in_step.set()
        release.wait(10)
        seen.append(torch.equal(p.unet.get_submodule(name).weight, w0))
        return {}

    def switch():
        pipe.load_lora_weights(sd, adapter_name="late")
        switched.set()

    gen = threading.Thread(target=lambda: pipe(PROMPT, num_inference_steps=1, output_type="latent",
                                               latents=_latents(), progress=False, callback_on_step_end=callback))
    gen.start()
    assert in_step.wait(30)
    other = threading.Thread(target=switch)
    other.start()
    assert not switched.wait(1.0)  # blocked behind the generation
    assert pipe.get_active_adapters() == []
    release.set()
    gen.join(30)
    other.join(30)
    assert switched.is_set() and seen == [True, True]
    assert not torch.equal(pipe.unet.get_submodule(name).weight, w0)

    def switch_inside(p, i, t, kw):
        p.unload_lora_weights()
    with pytest.raises(RuntimeError, match="inside a generation"):
        pipe(PROMPT, num_inference_steps=1, output_type="latent", latents=_latents(), progress=False,
             callback_on_step_end=switch_inside)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_generate_records_lora_hashes_and_inspect_describes_the_file(tmp_path, capsys):
    import hashlib

    from sdcore import cli, embedded, outputs

    tiny = embedded.build("tiny")
    save_file(_kohya(tiny, 16, conv=True), tmp_path / "style.safetensors")
    assert cli.main(["lora", "inspect", str(tmp_path / "style.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "kohya/A1111: LoCon, LoRA" in out and "rank        4" in out and "alpha       2" in out
    assert "unknown     0 key(s)" in out and "attn 32" in out

    sha = hashlib.sha256((tmp_path / "style.safetensors").read_bytes()).hexdigest()[:12]
    image = tmp_path / "out.png"
    argv = ["generate", "a cat", "--steps", "1", "--size", "64x64", "--no-progress", "--seed", "1",
            "--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--out", str(image)]
    assert cli.main(argv) == 0
    text = outputs.read_parameters(image)
    assert f'Lora hashes: "style: {sha}"' in text and 'Lora weights: "style: 0.5"' in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
@torch.no_grad()
def test_a_captured_cuda_graph_replays_with_the_merged_weights():
    """The merge writes into the weights' storage, so a graph captured before loading uses the adapter."""
    import types

    net = torch.nn.Sequential(torch.nn.Linear(64, 64)).cuda()
    holder = types.SimpleNamespace(unet=net, text_encoder=None)
    x = torch.randn(8, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        net(x)  # warm-up off the capture stream, as torch.cuda.graph's docs ask
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = net(x)
    graph.replay()
    base = out.clone()
    sd = {"lora_unet_0.lora_down.weight": torch.randn(4, 64), "lora_unet_0.lora_up.weight": torch.randn(64, 4)}
    lora.state(holder).load(holder, sd, "a", 1.0, False)
    graph.replay()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, net[0].weight, net[0].bias))
    assert not torch.allclose(out, base)
    lora.state(holder).unload()
    graph.replay()
    assert torch.equal(out, base)
