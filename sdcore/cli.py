"""The ``sdcore`` command."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def cmd_info(args) -> int:
    from . import _backend, _ext

    info = _ext.build_info()
    print(f"sdcore        {__import__('sdcore').__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    if info["error"]:
        print(f"extension     NOT LOADED: {info['error']}")
    else:
        built = info["built_with_torch"]
        note = "" if built == torch.__version__ else f"  (built with torch {built}: rebuild if ops fail)"
        print(f"extension     loaded{note}")
        print(f"cpu kernels   {'yes' if info['cpu'] else 'no'}")
        archs = ";".join(info["cuda_archs"]) or "-"
        print(f"cuda kernels  {'yes, archs ' + archs if info['cuda'] else 'no (CPU-only build)'}")
    print(f"cpu           {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            reason = _ext.cuda_device_reason(i)
            state = "kernels run here" if reason is None else f"kernels can't run: {reason}"
            print(f"cuda:{i}        {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}): {state}")
    else:
        print("cuda devices  none visible")
    print(f"backend       {_backend.get_backend()} (default; set SDCORE_BACKEND or sdcore.use_backend)")
    return 0


def cmd_validate(args) -> int:
    from . import _ext, validate

    if _ext.load_error():
        print(f"sdcore validate: {_ext.load_error()}", file=sys.stderr)
        return 2
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            print("sdcore validate: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        reason = _ext.cuda_device_reason(torch.cuda.current_device())
        if reason:
            print(f"sdcore validate: {reason}", file=sys.stderr)
            return 2
    names = args.dtype or (["fp32"] if device == "cpu" else ["fp16", "bf16", "fp32"])
    dtypes = []
    for name in names:
        for part in name.split(","):
            if part not in DTYPES:
                print(f"sdcore validate: unknown dtype {part!r}; use fp32, fp16 or bf16", file=sys.stderr)
                return 2
            dtypes.append(DTYPES[part])
    results = validate.run(device, dtypes, quick=args.quick)
    return 0 if all(r.passed for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdcore", description="Stable Diffusion on fused CPU/CUDA kernels with a reference path.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled kernels and archs, devices, default backend")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "validate", help="run every op over the Stable Diffusion shapes: kernels vs reference",
        description="Runs attention, group_norm(+SiLU) and the fused scheduler step over the shapes SD 1.x/2.x "
                    "use, on the kernels backend, and compares with a float64 reference. float32 must agree "
                    "within 1e-5 relative; float16/bfloat16 within 2x the error of PyTorch's own ops in the "
                    "same precision. Prints a table; exit code 1 on any FAIL.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the kernels run (default cpu)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="fp32, fp16 or bf16; repeat or comma-separate (default: fp32 on cpu, all three on cuda)")
    p.add_argument("--quick", action="store_true", help="skip the two largest VAE GroupNorm shapes")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
