"""Runs each CUDA op once on small, awkward shapes so compute-sanitizer can watch every access:
    compute-sanitizer --tool memcheck python bench/sanitize_ops.py
    SDCORE_CUDA_ATTENTION=sm90 compute-sanitizer --tool racecheck python bench/sanitize_ops.py --attention-only
Exits non-zero if a result disagrees with the reference."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcore import ops, reference, schedulers  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention-only", action="store_true", help="only the attention cases (racecheck is slow)")
    args = p.parse_args(argv)
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    bad = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n, m, d, causal in [(97, 77, 40, False), (33, 33, 59, True), (130, 65, 512, False), (1, 1, 80, False),
                                (70, 70, 160, True), (200, 200, 64, False)]:
            q, k, v = (torch.randn(1, 2, length, d, generator=g).to(dev, dtype) for length in (n, m, m))
            out = ops.attention(q, k, v, causal=causal)
            ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            bad += not err < 2e-2
            print(f"attention {dtype} N{n} M{m} D{d} causal={causal}: rel err {err:.2e}")
        if args.attention_only:
            continue
        for shape, groups, cl in [((2, 64, 9, 11), 8, False), ((2, 64, 9, 11), 8, True), ((1, 6, 1, 1), 3, False),
                                  ((1, 320, 64, 64), 32, True)]:
            x = torch.randn(*shape, generator=g).to(dev, dtype)
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            # weight in x's dtype (read as it is), bias as float32 (so both are read as float32): both paths
            w = torch.randn(shape[1], generator=g).to(dev, dtype)
            b = torch.randn(shape[1], generator=g).to(dev) if cl else torch.randn(shape[1], generator=g).to(dev, dtype)
            out = ops.group_norm(x, groups, w, b, silu=True)
            ref = reference.group_norm(x.double(), groups, w.double(), b.double(), silu=True)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            bad += not err < 2e-2
            print(f"group_norm {dtype} {shape} nhwc={cl}: rel err {err:.2e}")
        for shape, bias, stride in [((3, 5, 74), True, 74), ((2, 256), False, 256), ((4, 40), True, 56)]:
            wide = torch.randn(*shape[:-1], stride, generator=g).to(dev, dtype)
            hh = wide[..., :shape[-1]]  # rows `stride` apart (a slice of a wider GEMM output when stride > 2F)
            b = torch.randn(shape[-1], generator=g).to(dev, dtype) if bias else None
            out = torch.ops.sdcore.geglu(hh, b)
            ref = reference.gated_gelu(hh.double(), None if b is None else b.double())
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            bad += not err < 2e-2
            print(f"geglu {dtype} {shape} row stride {stride}: rel err {err:.2e}")
        for lead, k, n, bias, x_stride in [((3, 5), 7, 33, True, 7), ((2, 64), 320, 320, False, 336),
                                           ((9,), 40, 8, True, 48)]:
            x = torch.randn(*lead, x_stride, generator=g).to(dev, dtype)[..., :k]  # rows x_stride apart
            w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dev, dtype)
            b = torch.randn(n, generator=g).to(dev, dtype) if bias else None
            r = torch.randn(*lead, n, generator=g).to(dev, dtype)
            out = torch.ops.sdcore.linear_add(x, w, b, r)
            ref = reference.linear_add(x.double(), w.double(), None if b is None else b.double(), r.double())
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            bad += not err < 2e-2
            print(f"linear_add {dtype} {lead} {k}->{n} bias={bias} x row stride {x_stride}: rel err {err:.2e}")
        c = schedulers.dpmpp_2m(4.0, 3.0, 5.0)
        x = torch.randn(1, 4, 7, 9, generator=g).to(dev, dtype)
        mo = torch.randn(2, 4, 7, 9, generator=g).to(dev, dtype)
        h = torch.randn(1, 4, 7, 9, generator=g).to(dev, dtype)
        out, state = ops.scheduler_step(mo, x, c, history=[h], guidance_scale=7.5)
        ref, _ = reference.scheduler_step(mo.double(), x.double(), c, history=[h.double()], guidance_scale=7.5)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        bad += not err < 2e-2
        print(f"scheduler_step {dtype}: rel err {err:.2e}")
    torch.cuda.synchronize()
    print("FAILED" if bad else "all ops ran")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
