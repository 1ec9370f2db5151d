"""VAE decode with and without tiling (AutoencoderKL.enable_tiling) at growing image sizes.

    python bench/vae_tiling.py --device cpu                  # 512, 1024, 2048 (docs/PERF.md, "VAE tiling")
    python bench/vae_tiling.py --device cuda --dtype fp16 --config sd

--config small (default): an SD-shaped VAE (4 stages, 8x downsampling, mid-block attention, tiles of 512
px) with narrow channels (32, 64, 64, 64), so that 2048² runs on a laptop CPU; --config sd: SD's own sizes
(128, 256, 512, 512). Random weights (speed and memory do not depend on them). Each case runs in its own
process, so its peak RSS is its own. Reported per size, untiled and tiled:
  ms        median decode time of --repeat (after one warm-up), latents of size/8
  act MiB   the largest tensor any layer outputs during the decode (a forward hook on every module): what
            tiling bounds; the input and output images still grow with the size
  peak MiB  the process's peak resident memory (CPU) or the allocator's peak (CUDA), over the whole case"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timeit  # noqa: E402  (bench/ is on sys.path when a bench script runs)
from sdcore.models import AutoencoderKL  # noqa: E402

CONFIGS = {"small": (32, 64, 64, 64), "sd": (128, 256, 512, 512)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def largest_activation(module, fn) -> int:
    """Bytes of the largest tensor a submodule of ``module`` outputs while ``fn`` runs."""
    largest = [0]

    def hook(_, __, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules() if m is not module]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def run_case(args) -> dict:
    torch.manual_seed(0)
    ch = CONFIGS[args.config]
    vae = AutoencoderKL(block_out_channels=ch, layers_per_block=2 if args.config == "sd" else 1, sample_size=512,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    vae = vae.to(args.device, DTYPES[args.dtype]).eval()
    if args.tiled:
        vae.enable_tiling()
    z = torch.randn(1, 4, args.size // 8, args.size // 8, device=args.device, dtype=DTYPES[args.dtype])
    with torch.no_grad():
        act = largest_activation(vae, lambda: vae.decode(z))
        ms = timeit(lambda: vae.decode(z), args.device, args.repeat, warmup=0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return dict(size=args.size, tiled=args.tiled, ms=ms, act_mib=act / 2**20, peak_mib=peak / 2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--config", default="small", choices=CONFIGS)
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.size:
        print(json.dumps(run_case(args)))
        return
    threads = torch.get_num_threads()
    print(f"# sdcore bench/vae_tiling.py  device={args.device} ({threads} threads)  dtype={args.dtype}  "
          f"config={args.config} {CONFIGS[args.config]}  torch={torch.__version__}  decode, median of {args.repeat}")
    print(f"{'size':>6} {'tiling':>7} {'ms':>10} {'act MiB':>9} {'peak MiB':>9}")
    for size in map(int, args.sizes.split(",")):
        for tiled in (False, True):
            cmd = [sys.executable, __file__, "--size", str(size), "--device", args.device, "--dtype", args.dtype,
                   "--config", args.config, "--repeat", str(args.repeat)] + (["--tiled"] if tiled else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{size:>6} {'on' if tiled else 'off':>7} {r['ms']:>10.0f} {r['act_mib']:>9.1f} "
                  f"{r['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
