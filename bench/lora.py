"""LoRA switch benchmark: how long it takes to swap adapters on an SD 1.5- or SDXL-size UNet + text encoder(s).

    python bench/lora.py --device cpu                 # ranks 4,16,32,64 (docs/PERF.md, "LoRA switch, CPU")
    python bench/lora.py --device cpu --arch sdxl --ranks 32
    python bench/lora.py --device cuda --dtype fp16

The model is sdcore's embedded ``sd15`` (or ``sdxl``) architecture with random weights. For each rank a kohya-format LoRA
(fp16 factors, as trained LoRAs are shipped) on every attention projection of the UNet and text encoder(s) and
every UNet conv (resnets, shortcuts, down/upsamplers, proj_in/out, conv_in/out) is written to a temp dir and
read once, so later loads come from the page cache. Reported, median of --repeat:
  load     load_lora_weights(file): read, map every key, check every shape, merge (W0 kept)
  unload   unload_lora_weights(): every touched weight copied back from W0
  switch   unload one adapter and load another (the user-visible "change LoRA")
  reweight set_adapters(name, 0.5): recompute every touched weight from W0
and, with --step, one UNet call (CFG batch 2, 256x256) without and with an adapter merged, interleaved.
Each rank starts with one untimed load/unload (first-touch page faults of the kept originals)."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcore import embedded  # noqa: E402
from timing import unet_inputs  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTN = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def lora_file(pipe, rank: int, path: Path, seed: int) -> int:
    """A kohya LoRA of ``rank`` on all attention and conv layers; returns the number of modules."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out = {}
    xl = getattr(pipe, "text_encoder_2", None) is not None  # kohya: SDXL's encoders are te1/te2, SD's te
    parts = [("lora_unet_", pipe.unet), ("lora_te1_text_model_" if xl else "lora_te_text_model_", pipe.text_encoder),
             ("lora_te2_text_model_", pipe.text_encoder_2 if xl else None)]
    for prefix, model in ((p, m) for p, m in parts if m is not None):
        for name, m in model.named_modules():
            name = name.removeprefix("text_model.")
            conv = isinstance(m, torch.nn.Conv2d)
            if not (conv or (isinstance(m, torch.nn.Linear) and name.endswith(ATTN))):
                continue
            key = prefix + name.replace(".", "_")
            o, i, *kernel = m.weight.shape
            out[key + ".lora_down.weight"] = (torch.randn(rank, i, *kernel, generator=g) * 0.01).half()
            out[key + ".lora_up.weight"] = (torch.randn(o, rank, *([1, 1] if conv else []), generator=g) * 0.01).half()
            out[key + ".alpha"] = torch.tensor(float(rank) / 2).half()
    save_file(out, path)
    return len(out) // 3


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat, setup=None):
    """Median seconds of ``fn()``; ``setup()`` runs untimed before each repeat."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--ranks", default="4,16,32,64")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--step", action="store_true", help="also time a UNet call without / with an adapter")
    args = parser.parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]

    t = time.perf_counter()
    pipe = embedded.build(args.arch, device=device, dtype=dtype)
    print(f"{args.arch} (random weights) on {device} {args.dtype}: built in {time.perf_counter() - t:.1f} s; "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (int(r) for r in args.ranks.split(",")):
            a, b = Path(tmp) / f"a{rank}.safetensors", Path(tmp) / f"b{rank}.safetensors"
            modules = lora_file(pipe, rank, a, 1)
            lora_file(pipe, rank, b, 2)
            for f in (a, b):
                f.read_bytes()  # into the page cache
            mb = a.stat().st_size / 2**20
            pipe.load_lora_weights(a, adapter_name="a")  # warm-up: first-touch page faults, allocator
            pipe.unload_lora_weights()
            load = timed(lambda: pipe.load_lora_weights(a, adapter_name="a"), device, args.repeat,
                         setup=pipe.unload_lora_weights)
            unload = timed(pipe.unload_lora_weights, device, args.repeat,
                           setup=lambda: (pipe.unload_lora_weights(), pipe.load_lora_weights(a, adapter_name="a")))
            pipe.load_lora_weights(a, adapter_name="a")
            state = {"on": "a"}

            def switch():
                other = "b" if state["on"] == "a" else "a"
                pipe.unload_lora_weights()
                pipe.load_lora_weights(a if other == "a" else b, adapter_name=other)
                state["on"] = other

            switch_s = timed(switch, device, args.repeat)
            reweight = timed(lambda: pipe.set_adapters(state["on"], 0.5), device, args.repeat)
            pipe.unload_lora_weights()
            rows.append((rank, mb, modules, load, unload, switch_s, reweight))
            print(f"rank {rank}: done", flush=True)
        step = None
        if args.step:
            latents, text, added = unet_inputs(pipe.unet.config, 32, 256, device, dtype)
            t_ = torch.tensor([500.0] * 2, device=device)
            path = Path(tmp) / f"a{rows[-1][0]}.safetensors"
            with torch.no_grad():
                call = lambda: pipe.unet(latents, t_, text, **added)  # noqa: E731
                call()
                without, with_lora = [], []
                for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
                    without.append(timed(call, device, 1))
                    pipe.load_lora_weights(path, adapter_name="a")
                    with_lora.append(timed(call, device, 1))
                    pipe.unload_lora_weights()
            without, with_lora = statistics.median(without), statistics.median(with_lora)
            step = (without, with_lora)

    print(f"\nLoRA on all attention + conv layers of {args.arch} (UNet + text encoders), {device} {args.dtype}, "
          f"median of {args.repeat}")
    print(f"{'rank':>5} {'file MB':>8} {'modules':>8} {'load s':>8} {'unload s':>9} {'switch s':>9} {'reweight s':>11}")
    for rank, mb, modules, load, unload, switch_s, reweight in rows:
        print(f"{rank:>5} {mb:>8.1f} {modules:>8} {load:>8.2f} {unload:>9.3f} {switch_s:>9.2f} {reweight:>11.2f}")
    if step:
        print(f"\nUNet call (CFG batch 2, 256x256): {step[0]:.2f} s without an adapter, {step[1]:.2f} s with "
              f"a rank-{rows[-1][0]} adapter merged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
