"""The ``sdcore`` command.

Errors a user can make (arguments, files, models, NaN in a generation) print one line and exit 2 (1 for a
generation that went NaN); Ctrl-C prints one line and exits 130; anything else prints one line and
"run with --debug for the traceback". torch is imported inside main, so that even Ctrl-C during start-up
gets the one line."""
from __future__ import annotations

import argparse
import os
import platform
import sys

from . import args as ranges

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}


class UsageError(Exception):
    """A bad command line found after parsing (exit 2, one line)."""


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def cmd_info(args) -> int:
    import torch

    from . import _backend, _ext

    info = _ext.build_info()
    print(f"sdcore        {__import__('sdcore').__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    built_cuda = f"CUDA {info['built_with_cuda']}" if info.get("built_with_cuda") else "no CUDA kernels"
    print(f"built with    torch {info['built_with_torch'] or 'unknown'}, {built_cuda}")
    if info["error"]:
        print(f"extension     NOT LOADED: {info['error']}")
    else:
        built = info["built_with_torch"]
        note = "" if built == torch.__version__ else f"  (built with torch {built}: rebuild if ops fail)"
        print(f"extension     loaded{note}")
        cpu = f"yes, {info['cpu_capability']} build (SDCORE_CPU_CAPABILITY=avx2|default caps it)" if info["cpu"] else "no"
        print(f"cpu kernels   {cpu}")
        archs = ";".join(info["cuda_archs"]) or "-"
        print(f"cuda kernels  {'yes, archs ' + archs if info['cuda'] else 'no (CPU-only build)'}")
        if info["cuda"]:
            hopper = _ext.has_sm90_kernels()
            family = os.environ.get("SDCORE_CUDA_ATTENTION") or "sm80"
            print(f"cuda attn     {family} (SDCORE_CUDA_ATTENTION; sm90, the experimental Hopper kernel, is "
                  f"{'in this build' if hopper else 'not in this build: no 9.0a arch'})")
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


def _check_device(args) -> None:
    """--device, which every model command shares, before any work."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA device")


def _check_kernels_device(args) -> None:
    import torch

    from . import _ext

    reason = _ext.load_error() or (args.device == "cuda" and _ext.cuda_device_reason(torch.cuda.current_device()))
    if reason:
        raise UsageError(reason)


def cmd_validate(args) -> int:
    from . import validate

    _check_device(args)
    _check_kernels_device(args)
    components = args.model is not None or args.arch is not None
    default = ["fp32"] if args.device == "cpu" else (["fp16"] if components else ["fp16", "bf16", "fp32"])
    dtypes = []
    for name in args.dtype or default:
        for part in name.split(","):
            if part not in DTYPE_NAMES:
                raise UsageError(f"--dtype: unknown dtype {part!r}; use fp32, fp16 or bf16")
            dtypes.append(_dtype(part))
    if components:
        return _validate_components(args, dtypes)
    results = validate.run(args.device, dtypes, quick=args.quick)
    return 0 if all(r.passed for r in results) else 1


def _validate_components(args, dtypes) -> int:
    from . import validate_models

    passed = True
    for dtype in dtypes:
        pipe = load_pipeline(args.model, args.arch or "tiny", args.device, dtype, None)
        results = validate_models.run(pipe, size=args.size, steps=args.steps)
        passed = passed and all(r.passed for r in results)
    return 0 if passed else 1


def _size(text: str) -> tuple[int, int]:
    lo, hi = ranges.RANGES["side"]
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT like 512x512, got {text!r}") from None
    if not (lo <= w <= hi and lo <= h <= hi) or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"width and height must be multiples of 8 in {lo}..{hi}, got {text!r}")
    return w, h


def _folder_pipeline(path):
    """The pipeline class for a diffusers folder: SDXL where model_index.json's _class_name says so or the
    folder has a text_encoder_2/ (the refiner, requires_aesthetics_score, is the XL image-to-image one)."""
    from . import loading
    from .pipelines import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    index = loading.read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    name = str(index.get("_class_name", ""))
    if "XL" not in name and not (path / "text_encoder_2").is_dir():
        return StableDiffusionPipeline
    refiner = "Img2Img" in name or index.get("requires_aesthetics_score") is True
    return StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline


def _load_vae(vae: str, device: str, dtype):
    from pathlib import Path

    from .models import AutoencoderKL

    if not Path(vae).is_dir():
        raise UsageError(f"--vae {vae}: no such folder (expected a diffusers AutoencoderKL folder: config.json and "
                         "diffusion_pytorch_model.safetensors)")
    return AutoencoderKL.from_pretrained(vae, device=device, dtype=dtype)


def load_pipeline(model: str | None, arch: str, device: str, dtype, backend: str | None, vae: str | None = None,
                  vae_tiling: bool = False, cuda_graphs: bool = True):
    """A diffusers folder (SD or SDXL), a single checkpoint file, or (no --model) the embedded random-weight
    default; ``vae``, a VAE folder that replaces the model's (e.g. the fp16-fix SDXL VAE); ``vae_tiling``:
    encode and decode tile by tile (pipe.enable_vae_tiling); ``cuda_graphs``: the pipeline's (on CUDA, the
    UNet call is captured and replayed)."""
    from pathlib import Path

    from . import embedded
    from .pipelines import StableDiffusionXLPipeline, from_single_file

    replacement = _load_vae(vae, device, dtype) if vae else None
    path = Path(model) if model is not None else None
    if path is None:
        print(f"sdcore: using the {embedded.describe(arch)}", file=sys.stderr)
        pipe = embedded.build(arch, device=device, dtype=dtype, backend=backend)
    elif path.is_dir():
        cls = _folder_pipeline(path)
        if issubclass(cls, StableDiffusionXLPipeline):
            pipe = cls.from_pretrained(path, device=device, dtype=dtype, backend=backend, vae=replacement)
            replacement = None
        else:
            pipe = cls.from_pretrained(path, device=device, dtype=dtype, backend=backend)
    elif path.is_file():  # SD 1.x / 2.x or SDXL base / refiner, as its tensors say
        pipe = from_single_file(path, device=device, dtype=dtype, backend=backend)
    else:
        raise FileNotFoundError(f"--model {model}: no such folder or file")
    if replacement is not None:
        if replacement.config.latent_channels != pipe.vae.config.latent_channels or \
                len(replacement.config.block_out_channels) != len(pipe.vae.config.block_out_channels):
            raise UsageError(f"--vae {vae}: its latents ({replacement.config.latent_channels} channels, "
                             f"{len(replacement.config.block_out_channels)} stages) are not the model's")
        pipe.vae = replacement
        if isinstance(pipe, StableDiffusionXLPipeline):
            pipe._keep_vae_upcast()
    if vae:
        pipe.vae_source = vae
    if vae_tiling:
        pipe.enable_vae_tiling()
    pipe.cuda_graphs = cuda_graphs
    return pipe


def _outputs(out: str, n: int) -> list:
    from pathlib import Path

    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _open_init_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UsageError(f"--init-image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"--init-image {path}: not an image PIL can read ({exc})") from None
    return image


# ---------------------------------------------------------------------------------------------- LoRA
def _lora_arg(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT]: a text ending in .safetensors is all path; otherwise what follows the last ':'
    is the weight, range-checked (argparse then names --lora in the error)."""
    path, sep, tail = text.rpartition(":")
    if text.lower().endswith(".safetensors") or not sep or not path:
        return text, 1.0
    return path, ranges.cli_type("lora_weight")(tail)


def _check_loras(loras) -> None:
    """Every --lora file exists and is a safetensors file, before the model is loaded."""
    from . import lora_formats

    for path, _ in loras:
        try:
            lora_formats.check_file(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--lora {exc}") from None


def _apply_loras(pipe, loras) -> dict:
    """Load each --lora; the settings entries that record them (sha256 of the file, first 12 hex digits)."""
    from . import lora, outputs

    if not loras:
        return {}
    hashes, weights = [], []
    for path, weight in loras:
        name = pipe.load_lora_weights(path, weight=weight)
        hashes.append(f"{name}: {lora.state(pipe).adapters[name].sha256[:12]}")
        weights.append(f"{name}: {weight:g}")
    return {"Lora hashes": outputs.Quoted(", ".join(hashes)), "Lora weights": outputs.Quoted(", ".join(weights))}


def cmd_lora_inspect(args) -> int:
    from . import lora

    print(lora.report(lora.inspect(args.file)))
    return 0


def cmd_generate(args) -> int:
    import time

    from . import outputs, schedulers
    from .pipelines import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    _check_device(args)
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image")
    paths = _outputs(args.out, args.n)
    try:
        outputs.check_outputs(paths, args.overwrite)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(f"--out {exc}") from None
    image = _open_init_image(args.init_image) if args.init_image else None
    _check_loras(args.lora or [])
    pipe = load_pipeline(args.model, args.arch, args.device, _dtype(args.dtype), args.backend, args.vae,
                         args.vae_tiling, not args.no_cuda_graphs)
    xl = isinstance(pipe, StableDiffusionXLPipeline)
    if xl and pipe.requires_aesthetics_score and image is None:
        raise UsageError(f"--model {args.model} is an SDXL refiner (requires_aesthetics_score): it refines an image "
                         "(--init-image) with StableDiffusionXLImg2ImgPipeline; it does not draw from noise")
    if args.guidance is None:  # the model family's default, as diffusers
        args.guidance = 5.0 if xl else 7.5
    strength = args.strength if args.strength is not None else (0.3 if xl else 0.8)
    lora_settings = _apply_loras(pipe, args.lora or [])
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    width, height = args.size if args.size else (None, None)
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.n, seed=args.seed,
                  progress=not args.no_progress, allow_nan=args.allow_nan)
    start = time.perf_counter()
    if image is not None:
        from PIL import Image

        if args.size:
            image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
        img2img = StableDiffusionXLImg2ImgPipeline if xl else StableDiffusionImg2ImgPipeline
        result = img2img.from_pipe(pipe)(args.prompt, image=image, strength=strength, **common)
    else:
        result = pipe(args.prompt, height=height, width=width, **common)
    seconds = time.perf_counter() - start
    sampler = args.scheduler or schedulers.name_of(pipe.scheduler)
    for path, picture, seed in zip(paths, result.images, result.seeds):
        settings = outputs.generation_settings(
            steps=args.steps, sampler=sampler, guidance=args.guidance, seed=seed, size=picture.size,
            model=args.model or "embedded " + args.arch, extra=lora_settings,
            strength=None if image is None else strength)
        text = outputs.parameters_text(args.prompt, args.negative_prompt, settings)
        outputs.save(picture, path, text, overwrite=args.overwrite)
        print(f"wrote {path}  ({picture.width}x{picture.height}, seed {seed})")
    print(f"{len(result.images)} image(s), {args.steps} steps, {seconds:.1f} s on {args.device} "
          f"({args.dtype}, backend {pipe.backend or __import__('sdcore').get_backend()})")
    return 0


def cmd_batch(args) -> int:
    from . import batch

    return batch.run(args)


def cmd_profile(args) -> int:
    from . import _backend, profile

    _check_device(args)
    if args.compare:
        backends = list(dict.fromkeys(b.strip() for b in args.compare.split(",")))
        unknown = [b for b in backends if b not in _backend.BACKENDS]
        if unknown or len(backends) < 2:
            raise UsageError(f"--compare takes two or more of {', '.join(_backend.BACKENDS)}, comma-separated; "
                             f"got {args.compare!r}")
    else:
        backends = [args.backend or _backend.get_backend()]
    if "kernels" in backends:  # else every op would fall back to torch and the table would be mislabeled
        try:
            _check_kernels_device(args)
        except UsageError as exc:
            raise UsageError(f"the kernels backend can't run here ({exc}); profile --backend torch instead") \
                from None
    if args.out:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of profiling, not after)
        except ImportError:
            raise UsageError("--out writes hotspots.png, which needs matplotlib: pip install matplotlib") from None
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    pipe = load_pipeline(args.model, args.arch, args.device, _dtype(dtype), None)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = args.size or (size, size)
    summary = profile.run(pipe, backends, height=height, width=width, steps=args.steps, batch=args.batch,
                          model=args.model or f"embedded {args.arch}", out=args.out)
    print(profile.report(summary))
    if args.out:
        print(f"\nwrote {args.out}/summary.json, {args.out}/hotspots.png and "
              + ", ".join(f"{args.out}/trace_{b}.json" for b in backends) + " (open in ui.perfetto.dev)")
    return 0


def cmd_serve(args) -> int:
    from pathlib import Path

    _check_device(args)
    try:
        from .serve import requests, runner, server
    except ImportError as exc:
        raise UsageError(f"sdcore serve needs FastAPI and uvicorn: pip install 'sdcore[serve]' ({exc})") from None
    for flag, folder in (("--models-dir", args.models_dir), ("--lora-dir", args.lora_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"{flag} {folder}: no such folder")
    if args.api_auth:
        server.parse_credentials(args.api_auth)  # a malformed one is a usage error, before the model loads
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    engine = runner.Engine(model=args.model, arch=args.arch, models_dir=args.models_dir, lora_dir=args.lora_dir,
                           device=args.device, dtype=_dtype(dtype), backend=args.backend, outdir=args.outdir,
                           cuda_graphs=not args.no_cuda_graphs)
    engine.ensure(engine.options["sd_model_checkpoint"])  # a model that can't load stops here, not at a request
    limits = requests.Limits(max_steps=args.max_steps, max_side=args.max_side,
                             max_batch_pixels=args.max_batch_pixels)
    return server.run(args, engine, limits)


# ---------------------------------------------------------------------------------------------- parsers
def _ranged(key: str, what: str, default) -> dict:
    """add_argument keywords for a range-checked number whose help shows the range and the default."""
    lo, hi = ranges.RANGES[key]
    return dict(type=ranges.cli_type(key), default=default, metavar="N" if isinstance(lo, int) else "X",
                help=f"{what}, {ranges.describe(lo, hi)} (default {default})")


def _int_in(name: str, lo: int, hi: int):
    """An argparse ``type=`` for an integer option in [lo, hi] (a server setting, not in ranges.RANGES)."""
    def parse(text: str) -> int:
        try:
            return ranges.check_int("value", int(text), lo, hi)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}, got {text!r}") from None

    parse.__name__ = name
    return parse


def _parents(default_device: str):
    """The options several commands share, defined once."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                        help=f"where to run (default {default_device}: cuda when torch sees a GPU, else cpu)")

    from . import embedded

    model = argparse.ArgumentParser(add_help=False)
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR|FILE", help="a diffusers folder or a single checkpoint file")
    source.add_argument("--arch", choices=embedded.ARCHS, default=None,
                        help="the embedded random-weight model when no --model is given (default tiny)")
    lo, hi = ranges.RANGES["side"]
    model.add_argument("--size", type=_size, default=None, metavar="WxH",
                       help=f"image size, width and height multiples of 8 in {lo}..{hi} (default: the model's "
                            "native size)")
    return common, device, model


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    """How the pipeline is put together, the same for generate and batch."""
    p.add_argument("--vae", metavar="DIR",
                   help="a diffusers AutoencoderKL folder that replaces the model's VAE (e.g. the fp16-fix SDXL "
                        "VAE, which decodes in float16 without NaN)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="encode/decode the image tile by tile with blended seams: bounded memory for large "
                        "images (e.g. 2048x2048 SDXL), slightly different pixels")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the UNet eagerly instead of capturing it into a CUDA graph per image size "
                        "and replaying it (default: graphs; same pixels, fewer launches)")


def build_parser() -> argparse.ArgumentParser:
    import torch

    from . import schedulers

    common, device, model = _parents("cuda" if torch.cuda.is_available() else "cpu")
    parser = argparse.ArgumentParser(
        prog="sdcore", description="Stable Diffusion on fused CPU/CUDA kernels with a reference path.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", parents=[common], help="versions, compiled kernels and archs, devices, default backend")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "validate", parents=[common, device, model], help="run every op over the Stable Diffusion shapes: kernels vs reference",
        description="Runs every op (attention, group_norm(+SiLU), the 3x3 convolution, GEGLU, linear_add and "
                    "the fused scheduler step) over the shapes SD 1.x/2.x use, on the kernels backend, and compares with a float64 reference. float32 must agree "
                    "within 1e-5 relative; float16/bfloat16 within 2x the error of PyTorch's own ops in the "
                    "same precision. Prints a table; exit code 1 on any FAIL.")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="fp32, fp16 or bf16; repeat or comma-separate (default: fp32 on cpu, all three on cuda)")
    p.add_argument("--quick", action="store_true", help="skip the largest VAE shapes (two GroupNorm, one conv)")
    models = p.add_argument_group(
        "component validation",
        "With --model or --arch, validate a whole model instead: the text encoder, one UNet step (CFG batch 2), "
        "the VAE decode and a short generation from seed 0, each on the kernels and the reference backend, "
        "reporting max abs / max rel error and the image's PSNR. float32: rel <= 1e-4 and PSNR >= 60 dB; "
        "fp16/bf16: within 2x of the torch backend's own difference from the reference (PSNR: torch - 6 dB). "
        "Default dtype: fp32 on cpu, fp16 on cuda. --size sets the image size of the generation.")
    models.add_argument("--steps", **_ranged("steps", "steps of the generation", 4))
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "generate", parents=[common, device, model],
        help="text-to-image (or image-to-image with --init-image) to a PNG, JPEG or WebP",
        description="Generates images with Stable Diffusion 1.x/2.x or SDXL. --model takes a diffusers-format folder or "
                    "an original .safetensors/.ckpt checkpoint; without it, an embedded model with the SD "
                    "architecture and RANDOM weights runs (--arch), which shows the pipeline works and how fast, "
                    "but draws noise. Prompts over 77 CLIP tokens are truncated with a warning. Every number is "
                    "checked before any work. The image keeps the prompt, seed and settings (PNG: 'parameters' "
                    "text chunk; JPEG/WebP: EXIF UserComment), is written atomically, and never replaces an "
                    "existing file without --overwrite.")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", **_ranged("steps", "denoising steps (at most the model's training timesteps)", 25))
    lo, hi = ranges.RANGES["guidance"]
    p.add_argument("--guidance", type=ranges.cli_type("guidance"), default=None, metavar="X",
                   help=f"classifier-free guidance scale, {ranges.describe(lo, hi)}; <= 1 turns it off (default "
                        "7.5; SDXL 5.0)")
    p.add_argument("--seed", type=ranges.cli_type("seed"), default=None, metavar="N",
                   help=f"seed of the first image, {ranges.describe(*ranges.RANGES['seed'])}; image i uses seed + i "
                        "(default: random, printed)")
    p.add_argument("--scheduler", choices=list(schedulers.NAMES), default=None,
                   help="sampler (default: the model's own)")
    p.add_argument("--n", **_ranged("images", "images for the prompt", 1))
    p.add_argument("--backend", choices=["kernels", "torch", "reference"], default=None,
                   help="where attention/GroupNorm/steps run (default: kernels when built)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="(default fp32)")
    p.add_argument("--init-image", metavar="IMG", help="image-to-image: start from this picture")
    p.add_argument("--strength", type=ranges.cli_type("strength"), default=None, metavar="X",
                   help="img2img: how much of the schedule to redo, [0, 1] (default 0.8; SDXL 0.3)")
    _pipeline_options(p)
    p.add_argument("--out", default="out.png",
                   help="output image, .png, .jpg/.jpeg or .webp (default out.png; with --n > 1: out-0.png, "
                        "out-1.png, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--allow-nan", action="store_true",
                   help="write the image even if the generation went NaN/Inf (for debugging; default: stop "
                        "with an error naming the component and step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    lo, hi = ranges.RANGES["lora_weight"]
    p.add_argument("--lora", action="append", type=_lora_arg, metavar="FILE[:WEIGHT]",
                   help=f"merge a LoRA/LyCORIS .safetensors file (kohya/A1111, diffusers/PEFT, LoCon, LoHa, LoKr) "
                        f"with WEIGHT in {ranges.describe(lo, hi)} (default 1.0); repeat for several. The image "
                        "records them as 'Lora hashes' (sha256 of the file, 12 hex digits) and 'Lora weights'")
    p.set_defaults(func=cmd_generate, arch_default="tiny")

    p = sub.add_parser(
        "batch", parents=[common, device, model],
        help="many images from a prompts file, on one device or a Ray cluster, resumable",
        description="Generates every image a prompts file asks for into a folder: a .txt file with one prompt "
                    "per line, or a .jsonl file with one object per line: prompt, and optionally "
                    "negative_prompt, seed, n, steps, guidance, size, scheduler, lora, each overriding the "
                    "option of the same name for that line. The whole file is checked first. Images are named "
                    "LINE-INDEX-SEED.png (image i of a line uses its seed + i; a line without a seed gets one "
                    "derived from --seed and its line number) and equal `sdcore generate PROMPT --seed SEED`; "
                    "DIR/manifest.jsonl gets a line per image. Rerunning makes only the missing images; other "
                    "settings for the same folder are refused unless --overwrite. --device is the local engine's; Ray "
                    "workers take one GPU each where the cluster has GPUs, else run on its CPUs.")
    p.add_argument("prompts", metavar="PROMPTS", help="prompts file, .txt or .jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (made if missing)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process, one device (default); ray: Ray Data workers, one per GPU")
    p.add_argument("--address", default=None, help="with --engine ray: join this Ray cluster (default: start a "
                                                    "local Ray)")
    _pipeline_options(p)
    p.add_argument("--workers", type=ranges.cli_type("workers"), default=None, metavar="N",
                   help="with --engine ray: worker processes (default: one per GPU, else one per CPU)")
    p.add_argument("--batch-size", **_ranged("batch", "images per pipeline call; above 1 the last bits of "
                                                      "batched math may differ from sdcore generate's", 1))
    p.add_argument("--threads", type=ranges.cli_type("threads"), default=None, metavar="N",
                   help="on CPU: torch threads per worker; CPU results depend on it (default: torch's, as "
                        "sdcore generate; 1 per Ray worker)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", **_ranged("steps", "denoising steps (at most the model's training timesteps)", 25))
    p.add_argument("--guidance", **_ranged("guidance", "classifier-free guidance scale; <= 1 turns it off", 7.5))
    p.add_argument("--seed", type=ranges.cli_type("seed"), default=0, metavar="N",
                   help="the run's seed, from which each line without a seed gets one (default 0)")
    p.add_argument("--scheduler", choices=list(schedulers.NAMES), default=None,
                   help="sampler (default: the model's own)")
    p.add_argument("--n", **_ranged("images", "images per prompt", 1))
    p.add_argument("--backend", choices=["kernels", "torch", "reference"], default=None,
                   help="where attention/GroupNorm/steps run (default: kernels when built)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="(default fp32)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the folder over: remake its images, also with other settings (default: refuse)")
    p.add_argument("--allow-nan", action="store_true", help="write images even if a generation went NaN/Inf")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lora", action="append", type=_lora_arg, metavar="FILE[:WEIGHT]",
                   help="merge a LoRA/LyCORIS .safetensors file, as in sdcore generate; repeat for several")
    p.set_defaults(func=cmd_batch, arch_default="tiny")

    p = sub.add_parser("lora", help="LoRA/LyCORIS files: inspect")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    q = lora_sub.add_parser(
        "inspect", parents=[common], help="format, base model, rank/alpha, targeted modules, unknown keys",
        description="Reads a LoRA/LyCORIS .safetensors file (no model needed) and prints its format, the base "
                    "model it looks like (SD 1.x / SD 2.x, from the cross-attention and text-encoder widths), "
                    "rank and alpha per module (range), the targeted module kinds with counts (checked against "
                    "the embedded SD 1.5 or 2.1 architecture), and the keys that match nothing.")
    q.add_argument("file", metavar="FILE")
    q.set_defaults(func=cmd_lora_inspect)

    p = sub.add_parser(
        "profile", parents=[common, device, model],
        help="where the time of one image goes: per component, op family and op",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs the whole pipeline once to warm up, then once under torch.profiler, with a range "
                    "(and on CUDA an NVTX range)\naround each component: text_encoder, unet, scheduler_step, "
                    "vae_decode. Without --model the embedded\nrandom-weight model runs (--arch); its timing is "
                    "that of the real architecture.\nThe UNet runs eagerly here (no CUDA graphs), so that each "
                    "kernel is seen and attributed;\nbench/pipeline.py's graphs row measures what the graphs "
                    "save.",
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
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--steps", **_ranged("steps", "denoising steps", 2))
    p.add_argument("--batch", **_ranged("batch", "images per prompt", 1))
    which = p.add_mutually_exclusive_group()
    which.add_argument("--backend", choices=["kernels", "torch", "reference"], default=None,
                       help="backend to profile (default: kernels when built)")
    which.add_argument("--compare", metavar="A,B", help="profile each backend in turn, e.g. kernels,torch")
    p.add_argument("--out", metavar="DIR", help="write traces, summary.json and hotspots.png here")
    p.set_defaults(func=cmd_profile, arch_default="tiny")

    p = sub.add_parser(
        "serve", parents=[common, device, model],
        help="an HTTP server speaking AUTOMATIC1111's /sdapi/v1 API, with a web page at /",
        description="Serves txt2img, img2img, options, sd-models, samplers, schedulers, loras, progress, "
                    "interrupt, skip and scripts under /sdapi/v1, with A1111's field names and defaults, so A1111 "
                    "clients work unchanged; fields asking for what sdcore lacks (hires fix, inpainting, face "
                    "restoration, scripts, unknown samplers) are refused with a 422 naming them. One job runs at "
                    "a time; --queue more wait, and beyond that requests get 503 with Retry-After. --size sets "
                    "the size of requests that give none (default A1111's 512x512). Binds 127.0.0.1 unless told "
                    "otherwise; SIGTERM finishes the running job, refuses new ones and exits.")
    p.add_argument("--models-dir", metavar="DIR",
                   help="checkpoints (.safetensors/.ckpt files, diffusers folders) that sd_model_checkpoint may "
                        "switch to; the first is loaded at start when there is no --model")
    p.add_argument("--lora-dir", metavar="DIR", help="LoRA .safetensors files that <lora:name:weight> may name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in("port", 1, 65535), default=7860, metavar="N",
                   help="(default 7860, as A1111)")
    p.add_argument("--api-auth", metavar="USER:PASS", help="HTTP basic auth for everything served, as A1111's "
                                                             "(several: comma-separated)")
    p.add_argument("--queue", type=_int_in("queue", 1, 1000), default=16, metavar="N",
                   help="jobs that may wait behind the running one, 1..1000 (default 16)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--backend", choices=["kernels", "torch", "reference"], default=None,
                   help="where attention/GroupNorm/steps run (default: kernels when built)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the UNet eagerly instead of replaying a CUDA graph per image size")
    p.add_argument("--outdir", metavar="DIR", help="where requests with save_images write their PNGs (default: "
                                                   "none; save_images is refused)")
    p.add_argument("--max-steps", type=_int_in("max-steps", 1, 1000), default=150, metavar="N",
                   help="most steps a request may ask for (default 150)")
    p.add_argument("--max-side", type=_int_in("max-side", 8, 8192), default=2048, metavar="N",
                   help="largest width or height (default 2048)")
    p.add_argument("--max-batch-pixels", type=_int_in("max-batch-pixels", 64, 2**40), default=4 << 20,
                   metavar="N", help="most width x height x batch_size per request (default 4194304: four "
                                     "1024x1024 images)")
    p.add_argument("--max-body-mb", type=_int_in("max-body-mb", 1, 4096), default=32, metavar="N",
                   help="largest request body, init images included (default 32)")
    p.set_defaults(func=cmd_serve, arch_default="tiny")
    return parser


def _run(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "arch_default", None) and getattr(args, "arch", None) is None:
        args.arch = args.arch_default
    try:
        return args.func(args)
    except Exception as exc:
        return _report(args, exc)


def _report(args, exc: Exception) -> int:
    """One line for the error; the traceback only with --debug."""
    from .pipelines import NonFiniteError

    name = f"sdcore {args.command}"
    if isinstance(exc, NonFiniteError):
        print(f"{name}: {str(exc).replace('allow_nan=True (sdcore generate --allow-nan)', '--allow-nan')}"
              " No file was written.", file=sys.stderr)
        return 1
    if args.debug:
        raise exc
    if isinstance(exc, (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError,
                        NotImplementedError, PermissionError, IsADirectoryError)):
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and exc.errno is not None:  # disk full, read-only folder, ...
        print(f"{name}: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
        return 2
    print(f"{name}: internal error: {type(exc).__name__}: {exc}\nrun with --debug for the traceback",
          file=sys.stderr)
    return 1


def main(argv=None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # Outputs are written through a temporary file that is removed on the way out: nothing partial stays.
        print("sdcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
