"""Times every sdcore op on the Stable Diffusion shapes, kernels vs torch vs reference, side by side.

    python bench/ops.py --device cpu            # fp32 on the CPU
    python bench/ops.py --device cuda --json out.json   # fp16 on the GPU, numbers also as JSON

Median of repeats after warm-up (on the CPU, kernels and torch alternate for --rounds rounds and the median
of the rounds' medians is shown); CUDA times come from CUDA events. `speedup` = torch time / kernels time.
GB/s counts the bytes an op must move (inputs read once, outputs written once); GFLOP/s counts 4*N*M*D
per head for attention (half that when causal).

`of peak` puts the kernels' rate beside a yardstick measured in the same run: GB/s beside a large copy's
(read + write, `copy`), GFLOP/s beside a large matmul's in the same dtype (`mm`), or, on a GPU whose spec
sheet is known, beside its dense fp16/bf16 tensor-core peak (`spec`). The header line gives all three.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdcore  # noqa: E402
from sdcore import ops, schedulers  # noqa: E402
from timing import timeit  # noqa: E402  (bench/ is on sys.path when a bench script runs)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_LIMIT_BYTES = 1 << 30  # skip the reference where its materialized scores would exceed 1 GiB

# Spec sheets (dense, no sparsity): fp16/bf16 tensor-core TFLOP/s and memory GB/s, by device-name substring,
# most specific first.
GPU_SPECS = [("H200", 989.4, 4800), ("H100 NVL", 835.0, 3900), ("H100 PCIe", 756.0, 2000), ("H100", 989.4, 3350),
             ("A100-SXM4-80GB", 312.0, 2039), ("A100 80GB PCIe", 312.0, 1935), ("A100", 312.0, 1555)]


def yardsticks(dev, dtype, repeat):
    """What the op rates are put beside, measured here and now: the GB/s of a copy too large for any cache
    (2 x 128 MiB on the CPU, 2 x 512 MiB on a GPU) and the GFLOP/s of a square matmul in the bench's dtype;
    on a GPU whose spec sheet GPU_SPECS knows, also its tensor-core peak and memory bandwidth."""
    nbytes = (128 if dev == "cpu" else 512) << 20
    src = torch.randn(nbytes // torch.finfo(dtype).bits * 8, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = timeit(lambda: dst.copy_(src), dev, max(3, repeat // 5))
    size = 2048 if dev == "cpu" else 8192
    a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
    mm_ms = timeit(lambda: a @ b, dev, max(3, repeat // 5))
    y = dict(copy_gbs=2 * src.numel() * src.element_size() / copy_ms / 1e6, mm_gflops=2 * size ** 3 / mm_ms / 1e6,
             spec_tflops=None, spec_gbs=None)
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        spec = next(((tf, gb) for key, tf, gb in GPU_SPECS if key in name), None)
        if spec is not None:
            y["spec_gbs"] = spec[1]
            if dtype in (torch.float16, torch.bfloat16):
                y["spec_tflops"] = spec[0]
    return y


def of_peak(case, ms, y):
    """(fraction, yardstick name) of the kernels' rate, or (None, "") for an op with neither count."""
    if case["flops"]:
        gflops = case["flops"] / ms / 1e6
        if y["spec_tflops"]:
            return gflops / (y["spec_tflops"] * 1e3), "spec"
        return gflops / y["mm_gflops"], "mm"
    if case["bytes"]:
        return case["bytes"] / ms / 1e6 / y["copy_gbs"], "copy"
    return None, ""


def attention_cases(dev, dtype, quick):
    shapes = [
        ("SD1 64x64 self", 2, 8, 4096, 4096, 40, False),
        ("SD1 64x64 cross", 2, 8, 4096, 77, 40, False),
        ("N4096 D80 self", 2, 8, 4096, 4096, 80, False),
        ("SD1 32x32 self", 2, 8, 1024, 1024, 80, False),
        ("SD1 16x16 self", 2, 8, 256, 256, 160, False),
        ("SD2 64x64 self", 2, 5, 4096, 4096, 64, False),
        ("VAE mid 512^2", 1, 1, 4096, 4096, 512, False),
        ("CLIP-L causal", 2, 12, 77, 77, 64, True),
    ]
    if quick:
        shapes = [s for s in shapes if s[3] * s[4] <= 1024 * 1024 or s[0].startswith("SD1 64x64 self")]
    for name, b, h, n, m, d, causal in shapes:
        q, k, v = (torch.randn(b, h, length, d, device=dev, dtype=dtype) for length in (n, m, m))
        flops = 4 * b * h * n * m * d * (0.5 if causal else 1.0)
        ref_bytes = b * h * n * m * 4 * 3  # scores, softmax, mask/temporaries
        yield dict(op="attention", shape=f"{name} B{b} H{h} N{n} M{m} D{d}", flops=flops, bytes=None,
                   fn=lambda q=q, k=k, v=v, c=causal: ops.attention(q, k, v, causal=c),
                   reference_ok=ref_bytes <= REFERENCE_LIMIT_BYTES)


def group_norm_cases(dev, dtype, quick):
    shapes = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8), (1, 512, 128, 128),
              (1, 256, 256, 256)]
    if not quick:
        shapes.append((1, 128, 512, 512))
    for shape in shapes:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            x = torch.randn(*shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
            w, b = torch.randn(shape[1], device=dev, dtype=dtype), torch.randn(shape[1], device=dev, dtype=dtype)
            yield dict(op="group_norm+silu", shape="x".join(map(str, shape)) + " " + fmt_name, flops=None,
                       bytes=2 * x.numel() * x.element_size(),
                       fn=lambda x=x, w=w, b=b: ops.group_norm(x, 32, w, b, 1e-5, silu=True), reference_ok=True)


def geglu_cases(dev, dtype, quick):
    """The feed-forward's GEGLU layer (GEMM to 2F, then bias, GELU and gate) at the UNet's token counts: the
    kernels run the epilogue as one pass, torch as three; the GEMM is the same on both sides."""
    shapes = [("SD1 64x64", 2, 4096, 320), ("SD1 32x32", 2, 1024, 640), ("SD1 16x16", 2, 256, 1280),
              ("SDXL 32x32", 2, 1024, 1280)]
    if quick:
        shapes = shapes[1:3]
    for name, b, n, d in shapes:
        x = torch.randn(b, n, d, device=dev, dtype=dtype)
        w = torch.randn(8 * d, d, device=dev, dtype=dtype) * d ** -0.5
        bias = torch.randn(8 * d, device=dev, dtype=dtype)
        yield dict(op="geglu", shape=f"{name} {b}x{n}x{d} -> {4 * d}", flops=2 * b * n * d * 8 * d, bytes=None,
                   fn=lambda x=x, w=w, bias=bias: ops.geglu(x, w, bias), reference_ok=True)


def linear_add_cases(dev, dtype, quick):
    """The projections that end a branch of the UNet's transformer blocks (attention's to_out, the feed-forward's
    last layer) with the residual added: the kernels add it in the GEMM (cuBLASLt's C and bias epilogue on CUDA;
    residual + bias, then a GEMM accumulating into it, on the CPU), torch runs Linear, then an add."""
    shapes = [("SD1 64x64 to_out", 2, 4096, 320, 320), ("SD1 64x64 FF out", 2, 4096, 1280, 320),
              ("SD1 32x32 to_out", 2, 1024, 640, 640), ("SD1 16x16 FF out", 2, 256, 5120, 1280)]
    if quick:
        shapes = shapes[2:]
    for name, b, n, d_in, d_out in shapes:
        x = torch.randn(b, n, d_in, device=dev, dtype=dtype)
        w = torch.randn(d_out, d_in, device=dev, dtype=dtype) * d_in ** -0.5
        bias, residual = torch.randn(d_out, device=dev, dtype=dtype), torch.randn(b, n, d_out, device=dev, dtype=dtype)
        yield dict(op="linear_add", shape=f"{name} {b}x{n}x{d_in} -> {d_out}", flops=2 * b * n * d_in * d_out,
                   bytes=None, fn=lambda x=x, w=w, bias=bias, r=residual: ops.linear_add(x, w, bias, r),
                   reference_ok=True)


def conv3x3_cases(dev, dtype, quick):
    """The 3x3 convolutions of the SD 1.5 UNet (CFG batch 2, 512^2) and VAE decoder: on the CPU the kernels take
    Winograd F(2x2, 3x3) where sdcore.ops.conv3x3 routes it, one GEMM over the 3x3 patches for the 4x4 level of a
    256^2 UNet (else the same F.conv2d as torch; on CUDA, always).
    The rate counts the direct convolution's FLOPs, so above the matmul yardstick is possible."""
    shapes = [("UNet conv_in", 2, 4, 320, 64), ("UNet 64x64", 2, 320, 320, 64), ("UNet up 64x64", 2, 640, 320, 64),
              ("UNet 32x32", 2, 640, 640, 32), ("UNet up 32x32", 2, 960, 640, 32), ("UNet 16x16", 2, 1280, 1280, 16),
              ("UNet 8x8", 2, 1280, 1280, 8), ("UNet up 8x8", 2, 2560, 1280, 8), ("UNet 256^2 4x4", 2, 1280, 1280, 4),
              ("UNet 256^2 up 4x4", 2, 2560, 1280, 4),
              ("UNet conv_out", 2, 320, 4, 64), ("VAE 64x64", 1, 512, 512, 64), ("VAE 128x128", 1, 512, 512, 128),
              ("VAE 256x256", 1, 256, 256, 256)]
    if quick:
        shapes = [shapes[i] for i in (1, 3, 6)]
    else:
        shapes.append(("VAE 512x512", 1, 128, 128, 512))
    for name, b, cin, cout, hw in shapes:
        x = torch.randn(b, cin, hw, hw, device=dev, dtype=dtype)
        w = torch.randn(cout, cin, 3, 3, device=dev, dtype=dtype) * (9 * cin) ** -0.5
        bias = torch.randn(cout, device=dev, dtype=dtype)
        yield dict(op="conv3x3", shape=f"{name} {b}x{cin}x{hw}x{hw} -> {cout}", flops=2 * 9 * b * hw * hw * cin * cout,
                   bytes=None, fn=lambda x=x, w=w, bias=bias: ops.conv3x3(x, w, bias), reference_ok=False)


def step_cases(dev, dtype, quick):
    cases = [("DDIM CFG", schedulers.ddim(0.3, 0.45), 1, 64), ("Euler-a CFG", schedulers.euler_ancestral(4.0, 3.1), 1, 64),
             ("DPM++2M CFG", schedulers.dpmpp_2m(4.0, 3.1, 5.0), 1, 64), ("DPM++2M CFG", schedulers.dpmpp_2m(4.0, 3.1, 5.0), 4, 96)]
    for name, c, batch, hw in cases:
        shape = (batch, 4, hw, hw)
        mo = torch.randn((2 * batch, 4, hw, hw), device=dev, dtype=dtype)
        x = torch.randn(shape, device=dev, dtype=dtype)
        hist = [torch.randn(shape, device=dev, dtype=dtype) for _ in c.history]
        noise = torch.randn(shape, device=dev, dtype=dtype) if c.next_from_noise else None
        tensors = 2 + 1 + len(hist) + (noise is not None) + 2  # model output (2B), x, history, noise, out, state
        yield dict(op="scheduler_step", shape=f"{name} {batch}x4x{hw}x{hw}", flops=None,
                   bytes=tensors * x.numel() * x.element_size(),
                   fn=lambda mo=mo, x=x, c=c, h=hist, z=noise: ops.scheduler_step(mo, x, c, history=h, noise=z,
                                                                                guidance_scale=7.5),
                   reference_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on cpu, fp16 on cuda")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 5 cpu, 50 cuda)")
    p.add_argument("--ops", default="attention,group_norm,geglu,linear_add,conv3x3,scheduler_step",
                   help="comma-separated subset")
    p.add_argument("--rounds", type=int, default=None,
                   help="kernels/torch alternations per case, median of their medians (default 3 cpu, 1 cuda)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller attention and GroupNorm shapes")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides (default: torch's). 1 keeps a busy machine from descheduling a "
                        "thread mid-op, which distorts 2-thread times far more than it distorts 1-thread ones")
    p.add_argument("--skip-reference", action="store_true", help="time kernels and torch only")
    args = p.parse_args(argv)
    gens = {"attention": attention_cases, "group_norm": group_norm_cases, "geglu": geglu_cases,
            "linear_add": linear_add_cases, "conv3x3": conv3x3_cases, "scheduler_step": step_cases}
    unknown = [name for name in args.ops.split(",") if name not in gens]
    if unknown:
        p.error(f"--ops: unknown op(s) {', '.join(map(repr, unknown))}; choose from {', '.join(gens)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    dtype = DTYPES[args.dtype or ("fp32" if dev == "cpu" else "fp16")]
    repeat = args.repeat or (5 if dev == "cpu" else 50)
    rounds = args.rounds or (3 if dev == "cpu" else 1)
    torch.manual_seed(0)
    # Both sides' CPU builds: sdcore's (SDCORE_CPU_CAPABILITY caps it) and ATen's (ATEN_CPU_CAPABILITY caps it),
    # so an AVX2-core comparison can be run on an AVX-512 machine by capping both.
    machine = (torch.cuda.get_device_name() if dev == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, sdcore "
               f"{sdcore._ext.build_info()['cpu_capability']} build, torch {torch.backends.cpu.get_cpu_capability()}")
    print(f"# sdcore bench/ops.py  device={dev} ({machine})  dtype={dtype}  torch={torch.__version__}  "
          f"median of {repeat}, {rounds} alternating round(s)")
    y = yardsticks(dev, dtype, repeat)
    spec = (f"; spec sheet {y['spec_tflops'] or '-'} TFLOP/s dense, {y['spec_gbs']} GB/s"
            if y["spec_gbs"] else "; spec sheet unknown" if dev == "cuda" else "")
    print(f"# yardsticks (measured in this run): copy {y['copy_gbs']:.1f} GB/s (read + write), matmul "
          f"{y['mm_gflops']:.1f} GFLOP/s{spec}")
    rows = []
    head = (f"{'op':<16} {'shape':<40} {'kernels ms':>11} {'torch ms':>10} {'reference ms':>13} {'speedup':>8} "
            f"{'kernels rate':>14} {'of peak':>10}")
    print(head)
    print("-" * len(head))
    for name in args.ops.split(","):
        for case in gens[name](dev, dtype, args.quick):
            # kernels and torch alternate for `rounds` rounds (median of the rounds' medians), so a machine whose
            # speed drifts (a shared VM) moves both sides alike; the slow reference runs once.
            per_round = {"kernels": [], "torch": []}
            for _ in range(rounds):
                for backend in per_round:
                    with sdcore.use_backend(backend):
                        per_round[backend].append(timeit(case["fn"], dev, repeat))
            t = {backend: statistics.median(ts) for backend, ts in per_round.items()}
            t["reference"] = None
            if not args.skip_reference and case["reference_ok"]:
                with sdcore.use_backend("reference"):
                    t["reference"] = timeit(case["fn"], dev, max(1, repeat // 2))
            rate = ""
            if case["flops"]:
                rate = f"{case['flops'] / t['kernels'] / 1e6:.1f} GFLOP/s"
            elif case["bytes"]:
                rate = f"{case['bytes'] / t['kernels'] / 1e6:.1f} GB/s"
            speedup = t["torch"] / t["kernels"]
            ref = f"{t['reference']:.3f}" if t["reference"] is not None else "skipped"
            frac, yard = of_peak(case, t["kernels"], y)
            peak = f"{100 * frac:.0f}% {yard}" if frac is not None else ""
            print(f"{case['op']:<16} {case['shape']:<40} {t['kernels']:>11.3f} {t['torch']:>10.3f} {ref:>13} "
                  f"{speedup:>7.2f}x {rate:>14} {peak:>10}", flush=True)
            rows.append(dict(op=case["op"], shape=case["shape"], kernels_ms=t["kernels"], torch_ms=t["torch"],
                             reference_ms=t["reference"], speedup=speedup, flops=case["flops"],
                             bytes=case["bytes"], of_peak=frac, yardstick=yard))
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, machine=machine, dtype=str(dtype), torch=torch.__version__,
                                             repeat=repeat, rounds=rounds, yardsticks=y, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
