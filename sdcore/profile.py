"""``sdcore profile``: where the time of one image goes.

One warm-up run, then the whole pipeline once more under ``torch.profiler`` (CPU, plus CUDA on a GPU), with a
``record_function`` range (and, on CUDA, an NVTX range) around each component: every text encoder forward,
UNet call, scheduler step and VAE decode. The pipeline itself is not edited: those four methods are wrapped on
the instances for the profiled run and restored afterwards.

Attribution. Each time slice goes to the component range that encloses it and to a family (:data:`FAMILIES`):

- CPU: the self time of every op (its time minus its children's). Time inside a range that no op covers
  (Python between ops) is that component's ``other``, listed as ``(between ops)``. A component's total is the
  wall time of its ranges, so families sum to it exactly.
- CUDA: the device time of every kernel (and memcpy/memset), attributed to the op that launched it; the
  component total is the sum of those kernels.
- The family of an op call is that of the outermost op above it (up to the component range) that the mapping
  knows, so the allocations, views and GEMMs inside a convolution count as conv. A GPU kernel takes its
  launching op's family, or its own name's where the op is unknown. Names nothing knows are ``other`` and are
  listed in ``unknown``.
- ``pipeline overhead`` is the wall time of the profiled run minus the components: tokenization, noise,
  glue ops, the image conversion, and on CUDA the time the GPU sits idle.

Peak memory per component is read from the profiler's allocation records (``profile_memory=True``) on both
devices: the most bytes allocated above what was live when the component started (weights and inputs
excluded), the max over its calls.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import platform
import re
import time
from pathlib import Path

import torch

from . import _backend, loading

COMPONENTS = ("text_encoder", "unet", "scheduler_step", "vae_decode")
OVERHEAD = "pipeline overhead"
FAMILIES = ("attention", "group_norm", "layer_norm", "conv", "linear/matmul", "elementwise", "copy/layout",
            "scheduler", "other")
GAPS = "(between ops)"
PROMPT = "a photo of an astronaut riding a horse on the moon"

# Ops by exact name. The reference attention is matmul + softmax: its matmuls count as linear/matmul and its
# softmax as attention (in SD, softmax only runs in attention). Reductions count as elementwise.
_ATEN = {
    "attention": "scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu "
                 "_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention "
                 "_scaled_dot_product_cudnn_attention _scaled_dot_product_attention_math "
                 "_flash_attention_forward _efficient_attention_forward softmax _softmax _safe_softmax",
    "group_norm": "group_norm native_group_norm",
    "layer_norm": "layer_norm native_layer_norm",
    "conv": "conv2d convolution _convolution mkldnn_convolution _slow_conv2d_forward thnn_conv2d "
            "cudnn_convolution _nnpack_spatial_convolution _nnpack_available slow_conv_dilated2d",
    "linear/matmul": "linear addmm mm bmm baddbmm matmul _addmm_activation einsum",
    "elementwise": "add add_ sub sub_ rsub mul mul_ div div_ silu silu_ gelu sigmoid exp cos sin clamp clamp_ "
                   "tanh neg pow sqrt rsqrt eq ne lt gt where round masked_fill masked_fill_ lerp abs "
                   "bitwise_not tril triu mean sum std var argmax",
    "copy/layout": "copy_ contiguous cat stack clone to _to_copy permute transpose t view reshape _reshape_alias "
                   "_unsafe_view flatten unflatten expand expand_as as_strided as_strided_ unsqueeze squeeze slice "
                   "select result_type "
                   "narrow split split_with_sizes chunk unbind alias detach detach_ empty empty_like "
                   "empty_strided resize_ repeat repeat_interleave index_select index flip pad constant_pad_nd "
                   "upsample_nearest2d embedding lift_fresh resolve_conj resolve_neg fill_ zero_ zeros "
                   "zeros_like ones ones_like full item _local_scalar_dense",
    "other": "randn normal_ arange nonzero",  # noise and index generation: known, just not a compute family
}
OP_FAMILIES = {f"aten::{name}": family for family, names in _ATEN.items() for name in names.split()}
OP_FAMILIES.update({"sdcore::attention": "attention", "sdcore::group_norm": "group_norm",
                    "sdcore::geglu": "elementwise", "sdcore::linear_add": "linear/matmul", "sdcore::conv3x3": "conv",
                    "sdcore::scheduler_step": "scheduler", "detach": "copy/layout", "detach_": "copy/layout"})

# GPU kernels (and op names the table above lacks) by pattern, first match wins, so the specific names come
# before the generic ones: cuDNN's attention and CUTLASS's fmha say "fprop"/"cutlass" too, and cuDNN's conv
# kernels say "gemm". sdcore's own kernels are in csrc/cuda (flash_*_kernel, gn_*_kernel, geglu_kernel,
# step_kernel).
KERNEL_PATTERNS = [
    ("scheduler", r"\bstep_kernel"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("group_norm", r"group_?norm|\bgn_\w+_kernel|computefusedparams"),
    ("layer_norm", r"layer_?norm"),
    ("conv", r"conv(?!ert)|fprop|dgrad|wgrad|winograd|implicit_gemm|im2col|cudnn|nchwtonhwc|nhwctonchw"),
    ("linear/matmul", r"gemm|gemv|cutlass|cublas|nvjet|xmma|splitkreduce"),
    ("copy/layout", r"copy|memcpy|memset|transpose|permute|cat_?array|index|gather|upsample|fill"),
    ("elementwise", r"elementwise|reduce_kernel|silu|gelu|geglu|sigmoid|triu_tril"),
]
_KERNEL_RES = [(family, re.compile(pattern, re.IGNORECASE)) for family, pattern in KERNEL_PATTERNS]

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), most specific name first.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0)]


def classify(name: str) -> str | None:
    """The family of an op or kernel name, or None when the mapping does not know it."""
    family = OP_FAMILIES.get(name)
    if family is None:
        family = next((f for f, regex in _KERNEL_RES if regex.search(name)), None)
    return family


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


# ---------------------------------------------------------------------------------------------- running
def _ranged(fn, name: str, nvtx: bool):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()
    return wrapper


@contextlib.contextmanager
def component_ranges(pipe, nvtx: bool = False):
    """Wrap the four component entry points of ``pipe`` in ranges named after :data:`COMPONENTS`."""
    def ranged_scheduler(make):
        # Each call denoises on its own copy of the scheduler: range the step of the copy it makes.
        def wrapper(*args, **kwargs):
            sched = make(*args, **kwargs)
            sched.step = _ranged(sched.step, "scheduler_step", nvtx)
            return sched
        return wrapper

    # SDXL's two text encoders count as one component (the refiner has only the second)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    targets = [*((e, "forward", _ranged, "text_encoder") for e in encoders), (pipe.unet, "forward", _ranged, "unet"),
               (pipe, "_scheduler_for_call", lambda fn, *_: ranged_scheduler(fn), None),
               (pipe.vae, "decode", _ranged, "vae_decode")]
    saved = [(obj, attr, vars(obj).get(attr)) for obj, attr, _, _ in targets]
    for obj, attr, wrap, name in targets:
        setattr(obj, attr, wrap(getattr(obj, attr), name, nvtx))
    try:
        yield
    finally:
        for obj, attr, previous in saved:  # drop our instance attribute; the class's method shows again
            delattr(obj, attr)
            if previous is not None:
                setattr(obj, attr, previous)


def _component_of(evt):
    """(component range enclosing evt or None, the outermost op below it that the mapping knows)."""
    known, node = None, evt
    while node is not None and node.name not in COMPONENTS:
        if classify(node.name) is not None:
            known = node
        node = node.cpu_parent
    return (node.name if node is not None else None), known


def attribute(events, device: str):
    """Time (us) per component and family, per op/kernel name, and of unknown names, from profiler
    FunctionEvents (see the module docstring for the rules)."""
    comps = {c: dict.fromkeys(FAMILIES, 0.0) for c in COMPONENTS}
    totals, calls = dict.fromkeys(COMPONENTS, 0.0), dict.fromkeys(COMPONENTS, 0)
    ops, unknown = {}, {}

    def add(comp, family, name, us):
        if comp is not None:
            comps[comp][family or "other"] += us
        if family is None:
            unknown[name] = unknown.get(name, 0.0) + us
        entry = ops.setdefault(name, [0.0, 0, {}])
        entry[0] += us
        entry[1] += 1
        entry[2][family or "other"] = entry[2].get(family or "other", 0.0) + us

    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU or evt.is_async or evt.name.startswith("["):
            continue
        if evt.name in COMPONENTS:
            calls[evt.name] += 1
            if device == "cpu":
                totals[evt.name] += evt.cpu_time_total
                comps[evt.name]["other"] += evt.self_cpu_time_total
                unknown[GAPS] = unknown.get(GAPS, 0.0) + evt.self_cpu_time_total
            continue
        comp, known = _component_of(evt)
        op_family = classify(known.name) if known is not None else None
        if device == "cpu":
            add(comp, op_family, evt.name, evt.self_cpu_time_total)
            continue
        for kernel in evt.kernels:
            add(comp, op_family or classify(kernel.name), kernel.name, kernel.duration)
            if comp is not None:
                totals[comp] += kernel.duration
    return dict(families=comps, totals=totals, calls=calls, ops=ops, unknown=unknown)


def peak_memory(kineto_events, device: str) -> dict:
    """Per component: the most bytes allocated above the level at the start of a call, max over calls."""
    DT = torch.autograd.DeviceType
    kinds = (DT.CPU, DT.MKLDNN, DT.IDEEP) if device == "cpu" else (DT.CUDA,)
    records = sorted((e.start_ns(), e.nbytes()) for e in kineto_events
                     if e.name() == "[memory]" and e.device_type() in kinds)
    times = [t for t, _ in records]
    level = list(itertools.accumulate(n for _, n in records))
    peaks = dict.fromkeys(COMPONENTS, 0)
    for e in kineto_events:
        if e.name() in COMPONENTS and e.device_type() == DT.CPU:
            i, j = bisect.bisect_left(times, e.start_ns()), bisect.bisect_right(times, e.end_ns())
            base = level[i - 1] if i else 0
            peaks[e.name()] = max(peaks[e.name()], max(level[i:j], default=base) - base)
    return peaks


def unet_flops(pipe, height: int, width: int, batch: int) -> int:
    """FLOPs of one UNet call with CFG (batch 2B): convs, linears and attention matmuls, counted by
    FlopCounterMode on a copy of the UNet on the meta device (no compute, no memory) and the reference
    backend, whose attention is plain matmuls the counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = loading.build_empty(type(pipe.unet), dict(pipe.unet.config))
    f = pipe.vae_scale_factor
    x = torch.zeros(2 * batch, unet.config.in_channels, height // f, width // f, device="meta")
    tokens = (pipe.tokenizer or pipe.tokenizer_2).model_max_length  # the SDXL refiner has only tokenizer_2
    text = torch.zeros(2 * batch, tokens, unet.config.cross_attention_dim, device="meta")
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + 6 time ids (the refiner: 5)
        n = 5 if pipe.requires_aesthetics_score else 6
        pooled = unet.config.projection_class_embeddings_input_dim - n * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(2 * batch, pooled, device="meta"),
                                      "time_ids": torch.zeros(2 * batch, n, device="meta")}
    with _backend.use_backend("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500, device="meta"), text, **extra)
    return counter.get_total_flops()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_backend(pipe, backend: str, *, height: int, width: int, steps: int, batch: int,
                    trace: Path | None = None) -> dict:
    """Warm up, profile one pipeline run on ``backend``; times in ms per image. The UNet runs eagerly (no CUDA
    graphs): the components are told apart by module hooks, which a graph replay doesn't call, and the point
    here is each kernel's time (bench/pipeline.py's graphs row measures what graphs save)."""
    device = pipe.device.type
    graphs, pipe.cuda_graphs = pipe.cuda_graphs, False
    try:
        return _profile_run(pipe, backend, device, height=height, width=width, steps=steps, batch=batch,
                            trace=trace)
    finally:
        pipe.cuda_graphs = graphs


def _profile_run(pipe, backend: str, device: str, *, height: int, width: int, steps: int, batch: int,
                 trace: Path | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    kwargs = dict(height=height, width=width, num_inference_steps=steps, num_images_per_prompt=batch,
                  seed=0, progress=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with _backend.use_backend(backend):
        pipe(PROMPT, **kwargs)
        with component_ranges(pipe, nvtx=device == "cuda"), \
                profile(activities=activities, profile_memory=True) as prof:
            _sync(device)
            start = time.perf_counter()
            pipe(PROMPT, **kwargs)
            _sync(device)
            wall_us = (time.perf_counter() - start) * 1e6
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    found = attribute(prof.events(), device)
    peaks = peak_memory(prof.profiler.kineto_results.events(), device)
    per_image = 1e-3 / batch  # us per run -> ms per image
    components = {}
    for c in COMPONENTS:
        components[c] = dict(ms_per_image=found["totals"][c] * per_image, calls=found["calls"][c],
                             pct=100 * found["totals"][c] / wall_us, peak_bytes=peaks[c],
                             families={f: us * per_image for f, us in found["families"][c].items() if us})
    overhead = wall_us - sum(found["totals"].values())
    top = sorted(found["ops"].items(), key=lambda kv: -kv[1][0])[:15]
    return dict(wall_ms_per_image=wall_us * per_image, components=components,
                overhead=dict(ms_per_image=overhead * per_image, pct=100 * overhead / wall_us),
                top=[dict(name=n, ms_per_image=us * per_image, calls=k, family=max(fams, key=fams.get))
                     for n, (us, k, fams) in top],
                unknown={n: us * per_image for n, us in sorted(found["unknown"].items(), key=lambda kv: -kv[1])})


def run(pipe, backends, *, height: int, width: int, steps: int, batch: int = 1, model: str = "",
        out: str | Path | None = None) -> dict:
    """Profile ``pipe`` on each backend; the summary (also written as summary.json, trace_<backend>.json and
    hotspots.png under ``out``)."""
    device = pipe.device.type
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results = {b: profile_backend(pipe, b, height=height, width=width, steps=steps, batch=batch,
                                  trace=out / f"trace_{b}.json" if out is not None else None) for b in backends}
    device_name = (torch.cuda.get_device_name(pipe.device) if device == "cuda" else f"{platform.machine()}, "
                   f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    flops = unet_flops(pipe, height, width, batch)
    peak = peak_tflops(device_name, pipe.dtype) if device == "cuda" else None
    for r in results.values():
        unet = r["components"]["unet"]
        rate = flops * unet["calls"] / (unet["ms_per_image"] * batch * 1e-3) / 1e12
        r["flops"] = dict(unet_gflop_per_call=flops / 1e9, unet_calls=unet["calls"], achieved_tflops=rate,
                          peak_tflops=peak, fraction_of_peak=rate / peak if peak else None)
    summary = dict(settings=dict(device=device, device_name=device_name, dtype=str(pipe.dtype).split(".")[-1],
                                 size=f"{width}x{height}", steps=steps, batch=batch, model=model,
                                 backends=list(backends), torch=torch.__version__,
                                 sdcore=__import__("sdcore").__version__),
                   backends=results)
    if out is not None:
        from . import profile_chart

        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        profile_chart.render(summary, out / "hotspots.png")
    return summary


# ---------------------------------------------------------------------------------------------- report
def _ratio(base: float, other: float) -> str:
    return f"{other / base:.2f}x" if base > 0 and other > 0 else "-"


def _component_table(res: dict, names: list, width: int) -> list:
    base = names[0]
    head = f"{'component':<18}{'calls':>6}" + "".join(f"{n + ' ms':>{width}}{'%':>7}{'peak MiB':>10}" for n in names)
    head += "".join(f"{n + '/' + base:>{width + 6}}" for n in names[1:])
    lines = [head, "-" * len(head)]
    rows = [(c, res[base]["components"][c]["calls"], [res[n]["components"][c] for n in names]) for c in COMPONENTS]
    rows.append((OVERHEAD, "", [dict(res[n]["overhead"], peak_bytes=None) for n in names]))
    for label, calls, cells in rows:
        line = f"{label:<18}{calls:>6}"
        for cell in cells:
            mib = "-" if cell["peak_bytes"] is None else f"{cell['peak_bytes'] / 2**20:.1f}"
            line += f"{cell['ms_per_image']:>{width}.2f}{cell['pct']:>6.1f}%{mib:>10}"
        lines.append(line + "".join(f"{_ratio(cells[0]['ms_per_image'], c['ms_per_image']):>{width + 6}}"
                                    for c in cells[1:]))
    walls = [res[n]["wall_ms_per_image"] for n in names]
    lines.append(f"{'total (wall)':<24}" + "".join(f"{w:>{width}.2f}{'100.0%':>7}{'':>10}" for w in walls)
                 + "".join(f"{_ratio(walls[0], w):>{width + 6}}" for w in walls[1:]))
    return lines


def _family_table(res: dict, names: list, width: int) -> list:
    head = f"{'component':<16}{'family':<15}" + "".join(f"{n:>{width}}" for n in names)
    head += "".join(f"{n + '/' + names[0]:>{width + 6}}" for n in names[1:])
    lines = ["per family (ms per image)", head, "-" * len(head)]
    for c in COMPONENTS:
        for f in FAMILIES:
            ms = [res[n]["components"][c]["families"].get(f, 0.0) for n in names]
            if any(ms):
                lines.append(f"{c:<16}{f:<15}" + "".join(f"{m:>{width}.3f}" for m in ms)
                             + "".join(f"{_ratio(ms[0], m):>{width + 6}}" for m in ms[1:]))
    return lines


def _backend_details(name: str, r: dict, s: dict) -> list:
    what = "ops by self CPU time" if s["device"] == "cpu" else "GPU kernels by time"
    lines = [f"[{name}] top {len(r['top'])} {what} (whole run); family = where their time was counted",
             f"{'ms/image':>10}{'calls':>7}{'family':>15}  name"]
    lines += [f"{op['ms_per_image']:>10.3f}{op['calls']:>7}{op['family']:>15}  {op['name'][:80]}" for op in r["top"]]
    lines.append(f"[{name}] unknown names (ms/image, counted as 'other'):" + ("" if r["unknown"] else " none"))
    lines += [f"{ms:>10.3f}  {n[:100]}" for n, ms in r["unknown"].items()]
    fl, per_call = r["flops"], f"{r['flops']['unet_gflop_per_call']:.1f} GFLOP per call"
    if s["device"] == "cpu":
        lines.append(f"[{name}] UNet: {per_call} (CFG batch {2 * s['batch']}), {fl['unet_calls']} calls, "
                     f"achieved {fl['achieved_tflops'] * 1e3:.1f} GFLOP/s")
        return lines
    lines.append(f"[{name}] UNet: {per_call} (CFG batch {2 * s['batch']}), {fl['unet_calls']} calls, "
                 f"achieved {fl['achieved_tflops']:.1f} TFLOP/s")
    if fl["peak_tflops"]:
        floor = r["components"]["unet"]["ms_per_image"] * fl["fraction_of_peak"]
        lines.append(f"[{name}] FLOP floor {floor:.2f} ms/image at the {fl['peak_tflops']:.0f} TFLOP/s dense "
                     f"{s['dtype']} peak: reached {100 * fl['fraction_of_peak']:.1f}% of it")
    else:
        lines.append(f"[{name}] no dense peak known for {s['device_name']} in {s['dtype']}: achieved rate only")
    return lines


def report(summary: dict) -> str:
    """The tables ``sdcore profile`` prints: components, families per component, top ops, FLOP rate."""
    s, res = summary["settings"], summary["backends"]
    names = list(res)
    width = max(11, 4 + max(map(len, names)))  # room for 'reference ms'
    lines = [f"# sdcore profile  model={s['model']}  device={s['device']} ({s['device_name']})  "
             f"dtype={s['dtype']}  size={s['size']}  steps={s['steps']}  batch={s['batch']}  torch={s['torch']}",
             "# ms per image; components: " + ("self CPU time" if s["device"] == "cpu" else "GPU kernel time")
             + f"; X/{names[0]} = X's time / {names[0]}'s (above 1: {names[0]} is faster)", ""]
    lines += _component_table(res, names, width) + [""] + _family_table(res, names, width)
    for name in names:
        lines += [""] + _backend_details(name, res[name], s)
    return "\n".join(lines)
