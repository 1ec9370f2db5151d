"""sdcore profile: the family mapping on real op/kernel names, the attribution rules on a synthetic event tree,
and a real profile of the tiny model (tables add up, files parse, --compare, the CLI's errors)."""
import json
import sys
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdcore import cli, embedded, profile

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
Kernel = namedtuple("Kernel", "name device duration")

NAMES = [
    # PyTorch CPU ops and ours
    ("aten::mkldnn_convolution", "conv"),
    ("aten::_slow_conv2d_forward", "conv"),
    ("aten::cudnn_convolution", "conv"),
    ("sdcore::attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_efficient_attention", "attention"),
    ("aten::softmax", "attention"),
    ("sdcore::group_norm", "group_norm"),
    ("aten::native_group_norm", "group_norm"),
    ("aten::native_layer_norm", "layer_norm"),
    ("sdcore::scheduler_step", "scheduler"),
    ("sdcore::geglu", "elementwise"),
    ("sdcore::linear_add", "linear/matmul"),
    ("aten::addmm", "linear/matmul"),
    ("aten::bmm", "linear/matmul"),
    ("aten::silu", "elementwise"),
    ("aten::copy_", "copy/layout"),
    ("aten::upsample_nearest2d", "copy/layout"),
    ("aten::randn", "other"),
    # CUDA kernels: cuBLAS / CUTLASS / cuDNN / PyTorch / sdcore (csrc/cuda)
    ("void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_relu_f16_256x128_32x3_nn_align8>"
     "(cutlass_80_tensorop_s16816gemm_relu_f16_256x128_32x3_nn_align8::Params)", "linear/matmul"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "linear/matmul"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", "linear/matmul"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_g1_"
     "execute_kernel__5x_cudnn", "conv"),
    ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>"
     "(cudnn::ops::nchw2nhwc_params_t<float>, __half const*, __half*)", "conv"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::half_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, false, false, false, "
     "true, true, false, false>(pytorch_flash::Flash_fwd_params)", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, "
     "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>)",
     "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, "
     "float, float>, unsigned int, float, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, float, "
     "float, float>, unsigned int, float, 4>)", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda()#3}::operator()() const::{lambda(c10::Half)#1}, std::array<char*, 2ul>, 4>", "copy/layout"),
    ("Memcpy HtoD (Pageable -> Device)", "copy/layout"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>"
     "(int, float, c10::Half const*, c10::Half const*, c10::Half const*, float*, float*, c10::Half*)",
     "layer_norm"),
    ("void sdcore::cuda::attn::flash_reg_kernel<64>(sdcore::cuda::attn::FlashArgs)", "attention"),
    ("void sdcore::cuda::attn::flash_wgmma_kernel<__half, 64, 2, 64>(sdcore::cuda::attn::FlashArgs)", "attention"),
    ("void sdcore::cuda::attn::flash_wgmma_tma_kernel<__half, 64, 2, 64, false>(sdcore::cuda::attn::Sm90TmaArgs)",
     "attention"),
    ("void sdcore::cuda::attn::flash_split_kernel<64, 64>(sdcore::cuda::attn::FlashArgs)", "attention"),
    ("void sdcore::cuda::attn::flash_simt_kernel<64, 32>(sdcore::cuda::attn::FlashArgs)", "attention"),
    ("void sdcore::cuda::(anonymous namespace)::gn_fused_kernel<c10::Half>"
     "(sdcore::cuda::(anonymous namespace)::FusedArgs<c10::Half>)", "group_norm"),
    ("void sdcore::cuda::(anonymous namespace)::gn_apply_cl_kernel<float>"
     "(sdcore::cuda::(anonymous namespace)::ApplyTileArgs<float>)", "group_norm"),
    ("void sdcore::cuda::(anonymous namespace)::geglu_kernel<__half, 8, true>(const __half *, const __half *, "
     "__half *, long, long, long)", "elementwise"),
    ("void sdcore::cuda::(anonymous namespace)::step_kernel<c10::BFloat16, 8>"
     "(sdcore::cuda::(anonymous namespace)::StepArgs<c10::BFloat16>)", "scheduler"),
]


@pytest.mark.parametrize("name,family", NAMES, ids=[n[:48] for n, _ in NAMES])
def test_classify_real_names(name, family):
    assert profile.classify(name) == family


@pytest.mark.parametrize("name", ["aten::some_future_op", "mystery_kernel_v2", "void at::native::align_kernel<4>"])
def test_classify_unknown_is_none(name):
    assert profile.classify(name) is None


def _event(name, parent=None, self_us=0.0, total_us=0.0, kernels=(), device_type=CPU):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=self_us, cpu_time_total=total_us,
                           kernels=list(kernels), device_type=device_type, is_async=False)


def test_attribution_cpu_rules():
    """Self times go to the enclosing range and the outermost known op's family; range self time and
    unknown ops are 'other' and listed; ops outside every range are in no component."""
    unet = _event("unet", self_us=10, total_us=110)
    conv = _event("aten::conv2d", unet, self_us=5)
    mkl = _event("aten::mkldnn_convolution", conv, self_us=60)
    empty = _event("aten::empty", mkl, self_us=1)
    mystery = _event("mystery::op", unet, self_us=4)
    copy = _event("aten::copy_", mystery, self_us=30)
    outside = _event("aten::randn", self_us=3)
    gpu_side = _event("unet", device_type=CUDA, total_us=999)  # the GPU-timeline twin of a range: ignored
    found = profile.attribute([unet, conv, mkl, empty, mystery, copy, outside, gpu_side], "cpu")
    fams = {f: us for f, us in found["families"]["unet"].items() if us}
    assert fams == {"conv": 66, "copy/layout": 30, "other": 14}
    assert sum(fams.values()) == found["totals"]["unet"] == 110
    assert found["calls"]["unet"] == 1 and found["calls"]["vae_decode"] == 0
    assert found["unknown"] == {profile.GAPS: 10, "mystery::op": 4}
    assert found["ops"]["aten::randn"] == [3, 1, {"other": 3}]
    assert found["ops"]["aten::empty"] == [1, 1, {"conv": 1}]  # the top table shows where its time went


def test_attribution_cuda_kernels():
    """On CUDA a kernel counts in its launching op's family, or by its own name where the op is unknown."""
    vae = _event("vae_decode", self_us=500, total_us=900)
    linear = _event("aten::linear", vae)
    addmm = _event("aten::addmm", linear, kernels=[Kernel("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", 0, 7.0)])
    mystery = _event("mystery::op", vae, kernels=[Kernel("void at::native::vectorized_elementwise_kernel<4>", 0, 2.0),
                                                  Kernel("weird_kernel", 0, 1.5)])
    found = profile.attribute([vae, linear, addmm, mystery], "cuda")
    fams = {f: us for f, us in found["families"]["vae_decode"].items() if us}
    assert fams == {"linear/matmul": 7.0, "elementwise": 2.0, "other": 1.5}
    assert found["totals"]["vae_decode"] == 10.5  # kernel time, not the range's host time
    assert found["unknown"] == {"weird_kernel": 1.5}


@pytest.fixture(scope="module")
def tiny():
    return embedded.build("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def profiled(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    return profile.run(tiny, ["kernels"], height=64, width=64, steps=2, batch=1, model="embedded tiny", out=out), out


def test_tables_add_up(profiled, tiny):
    summary, _ = profiled
    r = summary["backends"]["kernels"]
    for name in profile.COMPONENTS:
        c = r["components"][name]
        assert c["ms_per_image"] > 0 and c["calls"] > 0, name
        assert set(c["families"]) <= set(profile.FAMILIES)
        assert abs(sum(c["families"].values()) - c["ms_per_image"]) <= max(0.01 * c["ms_per_image"], 0.05), name
    assert r["components"]["text_encoder"]["calls"] == 2  # prompt and negative prompt (CFG)
    assert r["components"]["unet"]["calls"] == r["components"]["scheduler_step"]["calls"] >= 2
    assert r["components"]["vae_decode"]["calls"] == 1
    assert r["components"]["unet"]["families"]["conv"] > 0 and r["components"]["unet"]["families"]["attention"] > 0
    assert r["components"]["scheduler_step"]["families"]["scheduler"] > 0  # the fused step, on kernels
    parts = sum(c["ms_per_image"] for c in r["components"].values())
    assert r["overhead"]["ms_per_image"] >= 0
    assert parts + r["overhead"]["ms_per_image"] == pytest.approx(r["wall_ms_per_image"])
    assert r["components"]["unet"]["peak_bytes"] > 0 and r["components"]["vae_decode"]["peak_bytes"] > 0
    assert len(r["top"]) == 15 and r["top"][0]["ms_per_image"] >= r["top"][-1]["ms_per_image"]
    assert profile.GAPS in r["unknown"]  # Python between ops inside the ranges is shown, not hidden
    # the profiled methods are the class's again
    assert "forward" not in vars(tiny.unet) and "step" not in vars(tiny.scheduler) and "decode" not in vars(tiny.vae)


def test_files_parse(profiled):
    summary, out = profiled
    trace = json.loads((out / "trace_kernels.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(profile.COMPONENTS) <= names and "sdcore::attention" in names
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written["settings"]) >= {"device", "dtype", "size", "steps", "batch", "model", "torch"}
    assert set(written["backends"]["kernels"]) >= {"components", "overhead", "top", "unknown", "flops"}
    Image = pytest.importorskip("PIL.Image")
    png = np.asarray(Image.open(out / "hotspots.png").convert("RGB"))
    assert png.shape[0] > 400 and png.shape[1] > 600
    assert png.std() > 10 and len(np.unique(png.reshape(-1, 3), axis=0)) > 20


def test_report_lists_everything(profiled):
    text = profile.report(profiled[0])
    for name in (*profile.COMPONENTS, profile.OVERHEAD, "unknown names", "GFLOP per call", "sdcore::attention"):
        assert name in text


def test_unet_flops(tiny):
    """The meta-device count equals FlopCounterMode on the real UNet (reference backend), and scales with batch."""
    import sdcore
    from torch.utils.flop_counter import FlopCounterMode

    flops = profile.unet_flops(tiny, 64, 64, batch=1)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, tiny.unet.config.cross_attention_dim)
    with sdcore.use_backend("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        tiny.unet(x, torch.tensor(500), text)
    assert flops == counter.get_total_flops() > 0
    assert profile.unet_flops(tiny, 64, 64, batch=2) == 2 * flops


def test_peak_tflops_table():
    assert profile.peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert profile.peak_tflops("NVIDIA H100 PCIe", torch.float16) == 756.0
    assert profile.peak_tflops("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0
    assert profile.peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert profile.peak_tflops("Some Future GPU", torch.float16) is None


def test_cli_compare(tmp_path, capsys):
    rc = cli.main(["profile", "--arch", "tiny", "--device", "cpu", "--size", "64x64", "--steps", "2",
                   "--compare", "kernels,torch", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "torch/kernels" in out and "[kernels] top" in out and "[torch] top" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["backends"]) == ["kernels", "torch"]
    assert (tmp_path / "trace_kernels.json").exists() and (tmp_path / "trace_torch.json").exists()
    fams = {b: summary["backends"][b]["components"]["scheduler_step"]["families"] for b in ("kernels", "torch")}
    assert fams["kernels"].get("scheduler", 0) > 0 and "scheduler" not in fams["torch"]  # torch: unfused step


# The profile command's bad arguments are in tests/test_cli_errors.py's table.


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_cuda_without_gpu(capsys):
    assert cli.main(["profile", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_kernels_unavailable(monkeypatch, capsys):
    """A kernels profile that would silently run torch's ops instead is refused."""
    from sdcore import _ext

    monkeypatch.setattr(_ext, "load_error", lambda: "sdcore._C failed to import")
    assert cli.main(["profile", "--device", "cpu", "--backend", "kernels"]) == 2
    assert "kernels backend can't run here" in capsys.readouterr().err


def test_cli_out_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["profile", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before profiling, nothing half-written
