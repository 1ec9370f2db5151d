"""Stable Diffusion pipeline benchmark: sdcore on the kernels, torch and reference backends (on CUDA also the
kernels with the pipeline's CUDA graphs, "graphs"; "kernels" is then eager), and diffusers itself, on the same random SD-architecture weights and inputs, side by side in one run.

    python bench/pipeline.py --device cpu --sizes 256,512            # CPU fp32 (docs/PERF.md)
    python bench/pipeline.py --device cuda --dtype fp16 --sizes 512  # GPU
    python bench/pipeline.py --arch sdxl --sizes 512 --impls kernels,diffusers   # SDXL base
    python bench/pipeline.py --interleave --impls kernels,torch,diffusers --repeat 9   # UNet ratios, one process

Per image size it reports: one UNet step (CFG batch 2), one VAE decode, the end-to-end latency of a short
generation (text encoder + steps + decode), and peak memory. Each implementation runs in its own process
(the weights are drawn from the same seed, so they are identical), so peak memory is that process's own:
CPU = peak resident set size (weights included), CUDA = torch.cuda.max_memory_allocated. GPU work is timed
with CUDA events after a warm-up; the median of --repeat runs is reported."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timeit, unet_inputs  # noqa: E402  (bench/ is on sys.path when a bench script runs)

# graphs: the kernels backend with the pipeline's CUDA graphs (the UNet call replayed); kernels alone runs eagerly.
IMPLS = ("kernels", "graphs", "torch", "reference", "diffusers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _diffusers_pipeline(pipe):
    """diffusers' own models with the sdcore pipeline's weights (same parameter names), SDPA attention. Built
    on the meta device and given sdcore's tensors themselves (assign=True), so the weights are in memory once
    and the diffusers process's peak RSS is diffusers' own, as sdcore's is."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def adopt(model, source):
        model.load_state_dict(source.state_dict(), assign=True)
        for name, buffer in list(model.named_buffers()):  # non-persistent buffers are in no state dict
            if buffer.is_meta:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, source.get_buffer(name).clone())
        return model.eval()

    blocks = len(pipe.vae.config.block_out_channels)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**pipe.unet.config)
        vae = diffusers.AutoencoderKL(**pipe.vae.config, down_block_types=("DownEncoderBlock2D",) * blocks,
                                      up_block_types=("UpDecoderBlock2D",) * blocks)
        text = CLIPTextModel._from_config(pipe.text_encoder.config, attn_implementation="sdpa")
        text_2 = CLIPTextModelWithProjection._from_config(pipe.text_encoder_2.config, attn_implementation="sdpa") \
            if getattr(pipe, "text_encoder_2", None) is not None else None
    unet, vae, text = adopt(unet, pipe.unet), adopt(vae, pipe.vae), adopt(text, pipe.text_encoder)
    if text_2 is not None:  # SDXL
        text_2 = adopt(text_2, pipe.text_encoder_2)
        ref = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2, unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config)))
        ref.set_progress_bar_config(disable=True)
        return ref.to(pipe.device, pipe.dtype)
    scheduler = diffusers.PNDMScheduler.from_config(dict(pipe.scheduler.config))
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=pipe.tokenizer, unet=unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref.to(pipe.device, pipe.dtype)


def worker(args) -> dict:
    """One implementation, every size: runs in its own process."""
    import sdcore
    from sdcore import embedded

    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    pipe = embedded.build(args.arch, dtype=dtype)
    pipe.to(device)
    impl = args.worker
    if impl == "graphs" and device != "cuda":
        raise SystemExit("graphs: CUDA graphs need --device cuda")
    backend = {"diffusers": "torch", "graphs": "kernels"}.get(impl, impl)
    pipe.cuda_graphs = impl == "graphs"
    ref = _diffusers_pipeline(pipe) if impl == "diffusers" else None
    if ref is not None:  # from here on the weights are diffusers' alone
        pipe.unet = pipe.vae = pipe.text_encoder = pipe.text_encoder_2 = None
    unet = ref.unet if ref is not None else pipe.unet
    vae = ref.vae if ref is not None else pipe.vae
    # The end-to-end run reuses the warmed-up UNet and VAE, so it gets a warm-up only on a GPU (where the
    # first call also pays for kernel selection at a new shape).
    measure = lambda fn, repeat, warmup=1: timeit(fn, device, repeat, warmup=warmup)  # noqa: E731
    e2e_warmup = 1 if device == "cuda" else 0
    g = torch.Generator().manual_seed(1)
    results = []
    for size in args.sizes:
        lat = size // pipe.vae_scale_factor
        x, text, added = unet_inputs(unet.config, lat, size, device, dtype, g)
        z = torch.randn(1, 4, lat, lat, generator=g).to(device, dtype)
        t = torch.tensor(500, device=device)
        z_vae = z.to(next(vae.parameters()).dtype)  # sdcore keeps SDXL's force_upcast VAE in float32
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), sdcore.use_backend(backend):
            if ref is not None:
                unet_ms = measure(lambda: unet(x, t, encoder_hidden_states=text, **added).sample, args.repeat)
                vae_ms = measure(lambda: vae.decode(z_vae).sample, args.repeat)
                e2e_ms = measure(lambda: ref("a photo of a cat", height=size, width=size,
                                             num_inference_steps=args.steps, output_type="pt",
                                             generator=torch.Generator().manual_seed(0)), 1, e2e_warmup)
            else:
                call = pipe._unet_call()  # the graph cache for "graphs", the UNet itself otherwise
                unet_ms = measure(lambda: call(x, t, text, **added), args.repeat)
                vae_ms = measure(lambda: vae.decode(z_vae), args.repeat)
                e2e_ms = measure(lambda: pipe("a photo of a cat", height=size, width=size,
                                              num_inference_steps=args.steps, output_type="pt", seed=0,
                                              progress=False), 1, e2e_warmup)
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        results.append(dict(impl=impl, size=size, unet_ms=unet_ms, vae_ms=vae_ms, e2e_ms=e2e_ms,
                            peak_mib=peak / 2**20))
    return dict(results=results)


def interleaved(args, impls) -> list[dict]:
    """The UNet step of every implementation in this one process, call by call in turn (A B C A B C ...): a
    machine whose speed drifts by tens of percent within minutes moves every implementation alike, so the
    ratios hold where per-process medians do not. diffusers' UNet reads the sdcore UNet's very tensors."""
    import sdcore
    from sdcore import embedded

    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    pipe = embedded.build(args.arch, dtype=dtype)
    pipe.to(device)
    ref = _diffusers_pipeline(pipe) if "diffusers" in impls else None
    g = torch.Generator().manual_seed(1)
    rows = []
    for size in args.sizes:
        lat = size // pipe.vae_scale_factor
        x, text, added = unet_inputs(pipe.unet.config, lat, size, device, dtype, g)
        t = torch.tensor(500, device=device)
        calls = {}
        for impl in impls:
            if impl == "diffusers":
                calls[impl] = ("torch", lambda: ref.unet(x, t, encoder_hidden_states=text, **added).sample)
            else:
                graphs = impl == "graphs"
                pipe.cuda_graphs = graphs
                calls[impl] = ("kernels" if graphs else impl, pipe._unet_call() if graphs else pipe.unet)
        times = {impl: [] for impl in impls}
        with torch.no_grad():
            for turn in range(args.repeat + 1):  # the first turn warms every implementation up
                for impl, (backend, call) in calls.items():
                    with sdcore.use_backend(backend):
                        fn = call if impl == "diffusers" else (lambda call=call: call(x, t, text, **added))
                        ms = timeit(fn, device, 1, warmup=0)
                    if turn:
                        times[impl].append(ms)
        for impl in impls:
            rows.append(dict(impl=impl, size=size, unet_ms=statistics.median(times[impl]), runs=times[impl]))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--arch", choices=["tiny", "sd15", "sd21", "tiny-xl", "sdxl"], default="sd15")
    p.add_argument("--sizes", default="256,512", help="image sizes (square), comma-separated")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the end-to-end run")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--impls", default=None, help=f"subset of {','.join(IMPLS)} (default: all; graphs on cuda only)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every implementation this many times, in turn (A B C A B C ...), and report each "
                        "one's median: on a shared machine the process that runs first or last can be 10-30%% "
                        "off, and alternating spreads that over all of them")
    p.add_argument("--interleave", action="store_true",
                   help="time only the UNet step, of every implementation in one process, call by call in turn, "
                        "--repeat calls each: the ratios a drifting machine moves least (no VAE, end-to-end or "
                        "peak memory)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    args.impls = args.impls or ",".join(i for i in IMPLS if args.device == "cuda" or i != "graphs")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"unknown impl {impl!r}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    if args.interleave:
        rows = interleaved(args, impls)
        print(f"# sdcore bench/pipeline.py --interleave  arch={args.arch}  device={args.device} ({name})  "
              f"dtype={args.dtype}  torch={torch.__version__}  UNet step (CFG batch 2), median of {args.repeat} "
              "calls each, in turn in one process")
        print(f"{'size':>5} {'impl':<10} {'UNet step ms':>13} {'UNet vs diffusers':>18} {'each call ms':>14}")
        for size in args.sizes:
            base = next((r for r in rows if r["size"] == size and r["impl"] == "diffusers"), None)
            for r in (r for r in rows if r["size"] == size):
                speed = f"{base['unet_ms'] / r['unet_ms']:.2f}x" if base else "-"
                print(f"{size:>5} {r['impl']:<10} {r['unet_ms']:>13.1f} {speed:>18}   "
                      + " ".join(f"{v:.0f}" for v in r["runs"]))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(device=name, dtype=args.dtype, arch=args.arch, interleave=True,
                                                       torch=torch.__version__, rows=rows), indent=1))
        return 0
    runs = []
    for _ in range(max(1, args.rounds)):
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", impl, "--device", args.device, "--dtype", args.dtype,
                   "--arch", args.arch, "--sizes", ",".join(map(str, args.sizes)), "--steps", str(args.steps),
                   "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{impl}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs += json.loads(done.stdout.strip().splitlines()[-1])["results"]
    rows = []  # per (impl, size): the median over rounds of each time, the largest peak
    for impl in impls:
        for size in args.sizes:
            mine = [r for r in runs if r["impl"] == impl and r["size"] == size]
            if mine:
                rows.append(dict(impl=impl, size=size, rounds=len(mine), peak_mib=max(r["peak_mib"] for r in mine),
                                 **{k: statistics.median(r[k] for r in mine) for k in ("unet_ms", "vae_ms", "e2e_ms")}))

    print(f"# sdcore bench/pipeline.py  arch={args.arch}  device={args.device} ({name})  dtype={args.dtype}  "
          f"torch={torch.__version__}  e2e = {args.steps} steps + text encoder + VAE decode  "
          f"rounds={max(1, args.rounds)}")
    print(f"{'size':>5} {'impl':<10} {'UNet step ms':>13} {'VAE decode ms':>14} {'end-to-end ms':>14} "
          f"{'peak MiB':>9} {'UNet vs diffusers':>18}")
    for size in args.sizes:
        base = next((r for r in rows if r["size"] == size and r["impl"] == "diffusers"), None)
        for r in (r for r in rows if r["size"] == size):
            speed = f"{base['unet_ms'] / r['unet_ms']:.2f}x" if base else "-"
            print(f"{size:>5} {r['impl']:<10} {r['unet_ms']:>13.1f} {r['vae_ms']:>14.1f} {r['e2e_ms']:>14.1f} "
                  f"{r['peak_mib']:>9.0f} {speed:>18}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, dtype=args.dtype, arch=args.arch, steps=args.steps,
                                                   torch=torch.__version__, rows=rows, runs=runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
