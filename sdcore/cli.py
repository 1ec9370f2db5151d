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


def _setup_error(args) -> str | None:
    """What the device and size arguments of generate / validate / profile can get wrong, before any work."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but torch sees no CUDA device"
    if args.size and any(v <= 0 or v % 8 for v in args.size):
        return f"--size {args.size[0]}x{args.size[1]}: width and height must be positive multiples of 8"
    return None


def cmd_validate(args) -> int:
    from . import _ext, validate

    error = _ext.load_error() or _setup_error(args)
    if error:
        print(f"sdcore validate: {error}", file=sys.stderr)
        return 2
    device = args.device
    if device == "cuda":
        reason = _ext.cuda_device_reason(torch.cuda.current_device())
        if reason:
            print(f"sdcore validate: {reason}", file=sys.stderr)
            return 2
    components = args.model is not None or args.arch is not None
    default = ["fp32"] if device == "cpu" else (["fp16"] if components else ["fp16", "bf16", "fp32"])
    names = args.dtype or default
    dtypes = []
    for name in names:
        for part in name.split(","):
            if part not in DTYPES:
                print(f"sdcore validate: unknown dtype {part!r}; use fp32, fp16 or bf16", file=sys.stderr)
                return 2
            dtypes.append(DTYPES[part])
    if components:
        return _validate_components(args, device, dtypes)
    results = validate.run(device, dtypes, quick=args.quick)
    return 0 if all(r.passed for r in results) else 1


def _validate_components(args, device, dtypes) -> int:
    from . import validate_models

    passed = True
    for dtype in dtypes:
        try:
            pipe = load_pipeline(args.model, args.arch or "tiny", device, dtype, None)
        except (ValueError, FileNotFoundError, NotImplementedError) as exc:
            print(f"sdcore validate: {exc}", file=sys.stderr)
            return 2
        results = validate_models.run(pipe, size=args.size, steps=args.steps)
        passed = passed and all(r.passed for r in results)
    return 0 if passed else 1


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT like 512x512, got {text!r}") from None
    return w, h


def load_pipeline(model: str | None, arch: str, device: str, dtype: torch.dtype, backend: str | None):
    """A diffusers folder, a single checkpoint file, or (no --model) the embedded random-weight default."""
    from pathlib import Path

    from . import embedded
    from .pipeline import StableDiffusionPipeline

    if model is None:
        print(f"sdcore: using the {embedded.describe(arch)}", file=sys.stderr)
        return embedded.build(arch, device=device, dtype=dtype, backend=backend)
    path = Path(model)
    if path.is_dir():
        return StableDiffusionPipeline.from_pretrained(path, device=device, dtype=dtype, backend=backend)
    if path.is_file():
        return StableDiffusionPipeline.from_single_file(path, device=device, dtype=dtype, backend=backend)
    raise FileNotFoundError(f"--model {model}: no such folder or file")


def _outputs(out: str, n: int) -> list:
    from pathlib import Path

    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def cmd_generate(args) -> int:
    import time

    from PIL import PngImagePlugin

    from . import schedulers
    from .pipeline import StableDiffusionImg2ImgPipeline

    error = _setup_error(args)
    if error:
        print(f"sdcore generate: {error}", file=sys.stderr)
        return 2
    if args.strength is not None and args.init_image is None:
        print("sdcore generate: --strength needs --init-image", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(args.model, args.arch, args.device, DTYPES[args.dtype], args.backend)
        if args.scheduler:
            pipe.set_scheduler(args.scheduler)
        width, height = args.size if args.size else (None, None)
        common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, num_images_per_prompt=args.n, seed=args.seed,
                      progress=not args.no_progress)
        start = time.perf_counter()
        if args.init_image:
            from PIL import Image

            image = Image.open(args.init_image)
            if args.size:
                image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
            result = StableDiffusionImg2ImgPipeline.from_pipe(pipe)(
                args.prompt, image, strength=0.8 if args.strength is None else args.strength, **common)
        else:
            result = pipe(args.prompt, height=height, width=width, **common)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"sdcore generate: {exc}", file=sys.stderr)
        return 2
    sampler = args.scheduler or next((k for k, (cls, _) in schedulers.NAMES.items()
                                      if type(pipe.scheduler) is cls), type(pipe.scheduler).__name__)
    for path, image, seed in zip(_outputs(args.out, len(result.images)), result.images, result.seeds):
        meta = PngImagePlugin.PngInfo()  # the A1111-style "parameters" chunk: how to make this image again
        meta.add_text("parameters", f"{args.prompt}\nNegative prompt: {args.negative_prompt or ''}\n"
                                    f"Steps: {args.steps}, Sampler: {sampler}, CFG scale: {args.guidance}, "
                                    f"Seed: {seed}, Size: {image.width}x{image.height}, "
                                    f"Model: {args.model or 'embedded ' + args.arch}")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, pnginfo=meta)
        print(f"wrote {path}  ({image.width}x{image.height}, seed {seed})")
    print(f"{len(result.images)} image(s), {args.steps} steps, {seconds:.1f} s on {args.device} "
          f"({args.dtype}, backend {pipe.backend or __import__('sdcore').get_backend()})")
    return 0


def cmd_profile(args) -> int:
    from . import _backend, _ext, profile

    def fail(message: str) -> int:
        print(f"sdcore profile: {message}", file=sys.stderr)
        return 2

    error = _setup_error(args)
    if error:
        return fail(error)
    if args.steps < 1 or args.batch < 1:
        return fail("--steps and --batch must be at least 1")
    if args.compare:
        backends = list(dict.fromkeys(b.strip() for b in args.compare.split(",")))
        unknown = [b for b in backends if b not in _backend.BACKENDS]
        if unknown or len(backends) < 2:
            return fail(f"--compare takes two or more of {', '.join(_backend.BACKENDS)}, comma-separated; "
                        f"got {args.compare!r}")
    else:
        backends = [args.backend or _backend.get_backend()]
    if "kernels" in backends:  # else every op would fall back to torch and the table would be mislabeled
        reason = _ext.load_error() or (args.device == "cuda" and _ext.cuda_device_reason(torch.cuda.current_device()))
        if reason:
            return fail(f"the kernels backend can't run here ({reason}); profile --backend torch instead")
    if args.out:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of profiling, not after)
        except ImportError:
            return fail("--out writes hotspots.png, which needs matplotlib: pip install matplotlib")
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    try:
        pipe = load_pipeline(args.model, args.arch, args.device, DTYPES[dtype], None)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        width, height = args.size or (size, size)
        summary = profile.run(pipe, backends, height=height, width=width, steps=args.steps, batch=args.batch,
                              model=args.model or f"embedded {args.arch}", out=args.out)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        return fail(str(exc))
    print(profile.report(summary))
    if args.out:
        print(f"\nwrote {args.out}/summary.json, {args.out}/hotspots.png and "
              + ", ".join(f"{args.out}/trace_{b}.json" for b in backends) + " (open in ui.perfetto.dev)")
    return 0


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
    from . import embedded

    models = p.add_argument_group(
        "component validation",
        "With --model or --arch, validate a whole model instead: the text encoder, one UNet step (CFG batch 2), "
        "the VAE decode and a short generation from seed 0, each on the kernels and the reference backend, "
        "reporting max abs / max rel error and the image's PSNR. float32: rel <= 1e-4 and PSNR >= 60 dB; "
        "fp16/bf16: within 2x of the torch backend's own difference from the reference (PSNR: torch - 6 dB). "
        "Default dtype: fp32 on cpu, fp16 on cuda.")
    source = models.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR|FILE", help="a diffusers folder or a single checkpoint file")
    source.add_argument("--arch", choices=embedded.ARCHS, help="the embedded random-weight model")
    models.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size (default: native)")
    models.add_argument("--steps", type=int, default=4, help="steps of the generation (default 4)")
    p.set_defaults(func=cmd_validate)

    from . import schedulers

    p = sub.add_parser(
        "generate", help="text-to-image (or image-to-image with --init-image) to a PNG",
        description="Generates images with Stable Diffusion 1.x/2.x. --model takes a diffusers-format folder or "
                    "an original .safetensors/.ckpt checkpoint; without it, an embedded model with the SD "
                    "architecture and RANDOM weights runs (--arch), which shows the pipeline works and how fast, "
                    "but draws noise. Prompts over 77 CLIP tokens are truncated with a warning. The PNG keeps "
                    "the prompt, seed and settings in its 'parameters' text chunk.")
    p.add_argument("prompt")
    p.add_argument("--model", metavar="DIR|FILE", help="diffusers folder or single checkpoint file")
    p.add_argument("--arch", choices=embedded.ARCHS, default="tiny",
                   help="embedded random-weight model when no --model is given (default tiny)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i")
    p.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size)")
    p.add_argument("--scheduler", choices=list(schedulers.NAMES), default=None,
                   help="sampler (default: the model's own)")
    p.add_argument("--n", type=int, default=1, help="images for the prompt (default 1)")
    p.add_argument("--backend", choices=["kernels", "torch", "reference"], default=None,
                   help="where attention/GroupNorm/steps run (default: kernels when built)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--init-image", metavar="IMG", help="image-to-image: start from this picture")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the schedule to redo, 0..1 (default 0.8)")
    p.add_argument("--out", default="out.png", help="output PNG (with --n > 1: out-0.png, out-1.png, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "profile", help="where the time of one image goes: per component, op family and op",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs the whole pipeline once to warm up, then once under torch.profiler, with a range "
                    "(and on CUDA an NVTX range)\naround each component: text_encoder, unet, scheduler_step, "
                    "vae_decode. Without --model the embedded\nrandom-weight model runs (--arch); its timing is "
                    "that of the real architecture.",
        epilog="""output (times in ms per image; docs/PROFILING.md explains every table):
  components  each component's time, share of the wall time, calls and peak memory (MiB allocated above
              what was live when it started); 'pipeline overhead' = wall time minus the components.
              CPU: self CPU time of the ops in the component's ranges; CUDA: GPU time of the kernels they
              launched.
  families    each component split into attention, group_norm, layer_norm, conv, linear/matmul,
              elementwise, copy/layout, scheduler, other (sdcore.profile.OP_FAMILIES/KERNEL_PATTERNS);
              'other' includes the time between ops and the unknown names, which are listed.
  top ops     the 15 ops (CPU) or kernels (CUDA) with the most self time, with call counts.
  UNet FLOPs  analytic GFLOP per UNet call and the achieved rate (on CUDA also the fraction of the
              card's dense fp16/bf16 peak).
  --compare   the same tables side by side, with X/first = X's time / the first backend's time.
  --out DIR   trace_<backend>.json (Perfetto, chrome://tracing), summary.json, hotspots.png.

example: sdcore profile --arch sd15 --size 256x256 --steps 2 --compare kernels,torch --out prof""")
    p.add_argument("--model", metavar="DIR|FILE", help="diffusers folder or single checkpoint file")
    p.add_argument("--arch", choices=embedded.ARCHS, default="tiny",
                   help="embedded random-weight model when no --model is given (default tiny)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--backend", choices=["kernels", "torch", "reference"], default=None,
                       help="backend to profile (default: kernels when built)")
    which.add_argument("--compare", metavar="A,B", help="profile each backend in turn, e.g. kernels,torch")
    p.add_argument("--out", metavar="DIR", help="write traces, summary.json and hotspots.png here")
    p.set_defaults(func=cmd_profile)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
