"""`sdcore batch` throughput: images per second of the local engine and of Ray Data with 1 and 2 workers, on
the same images, after start-up (docs/PERF.md, "Batch generation"). On the CPU every worker (the local
engine's process, each Ray actor) runs --threads torch threads, so the rows compare engines, not thread counts.

    python bench/batch.py                       # tiny model, 64x64, 4 steps, 48 images per row (64 in docs/PERF.md), CPU
    python bench/batch.py --arch sd15 --size 512x512 --steps 25 --images 64 --device cuda

Each row (the best of --repeat alternating rounds) times the images as they reach the driver, from the
moment every worker has finished two images (model load, the first call's warm-up and Ray's start are left
out) to the last: images/s = the images after that point / the time they took. Ray runs on a local Ray started once (num_cpus = this machine's cores);
on a GPU machine each Ray worker gets one GPU. The files are not written: this measures the engines."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(rows, warm: int) -> tuple[float, int]:
    stamps = [time.perf_counter() for _ in rows]
    timed = len(stamps) - warm
    return timed / (stamps[-1] - stamps[warm - 1]), timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads of every worker (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every row; the best is reported")
    args = parser.parse_args()

    import ray
    import torch

    import sdcore
    from sdcore.batch import driver, prompts
    from sdcore.batch.worker import Worker

    width, height = (int(v) for v in args.size.split("x"))
    requests = [dict(line=i + 1, prompt=f"prompt {i}", negative_prompt=None, seed=i, n=1, steps=args.steps,
                     guidance=7.5, size=[width, height], scheduler=None, lora=[]) for i in range(args.images)]
    groups = prompts.groups(prompts.images(requests), 1)
    cores = os.cpu_count()
    base = dict(model=None, arch=args.arch, dtype="fp32", backend=sdcore.get_backend(), device=args.device,
                allow_nan=False)
    config = dict(base, threads=args.threads if args.device == "cpu" else None)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    engine = driver.RayEngine(None)
    best = {}  # rounds alternate the rows, so a burst of other load on the machine hits them all alike
    try:
        for _ in range(args.repeat):
            for name, workers in (("local", 1), ("ray", 1), ("ray", 2)):
                rows = (driver.local_rows(config, groups, Worker) if name == "local"
                        else engine.rows(config, groups, workers, Worker))
                rate, n = measure(rows, 2 * workers)
                best[name, workers] = max(best.get((name, workers), (0, n)), (rate, n))
    finally:
        ray.shutdown()
    results = [(name, workers, n, rate) for (name, workers), (rate, n) in best.items()]

    local = results[0][3]
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"cpu ({cores} cores, {args.threads} thread(s) per worker)")
    print(f"# sdcore bench/batch.py  arch={args.arch}  size={args.size}  steps={args.steps}  device={device}  "
          f"torch={torch.__version__}  ray={ray.__version__}")
    print(f"# best of {args.repeat} rounds; per worker: images/s / (workers x local's images/s); "
          "1 - that is the Ray path's overhead")
    print(f"{'engine':<8}{'workers':>8}{'images':>8}{'images/s':>10}{'vs local':>10}{'per worker':>12}")
    for engine_name, workers, n, rate in results:
        print(f"{engine_name:<8}{workers:>8}{n:>8}{rate:>10.2f}{rate / local:>9.2f}x{rate / local / workers:>11.2f}x")


if __name__ == "__main__":
    main()
