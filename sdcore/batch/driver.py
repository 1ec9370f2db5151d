"""``sdcore batch``: the driver. Reads and checks the prompts file, sets up the output folder, hands groups of
images to an engine (in-process, or Ray Data actors), writes what comes back, and reports.

The workers return encoded PNGs and the driver alone writes files. Why not let Ray workers write: the output
folder then only needs to exist on the machine that runs the command (no shared filesystem across the
cluster); a block that Ray retries after a worker died can't write an image twice or race its first attempt
for a name (the driver drops a name it already wrote); and the manifest has one writer, so its lines never
interleave. Encoding stays on the workers, so the driver's share per image is one write and one fsync."""
from __future__ import annotations

import logging
import sys
import time

from . import prompts, store
from .worker import Worker, encode_group


def options(args) -> dict:
    """The engine-independent checks of the command line."""
    if args.engine == "local" and args.address:
        raise ValueError("--address joins a Ray cluster: it needs --engine ray")
    if args.engine == "local" and args.workers not in (None, 1):
        raise ValueError("--workers N needs --engine ray (local runs in this process, on one device)")
    return {"negative_prompt": args.negative_prompt, "steps": args.steps, "guidance": args.guidance,
            "size": list(args.size) if args.size else None, "scheduler": args.scheduler, "n": args.n,
            "lora": [list(x) for x in args.lora or []]}


def run(args, worker_cls=Worker) -> int:
    """The whole command; returns its exit code (1 if any image failed). ``worker_cls`` is the worker the
    engines run (a test subclasses it to kill a Ray worker mid-run)."""
    import torch

    import sdcore

    started = time.perf_counter()
    defaults = options(args)
    requests = prompts.read(args.prompts, defaults, args.seed)  # the whole file, before anything runs
    images = prompts.images(requests)
    engine = RayEngine(args.address) if args.engine == "ray" else None
    folder = None
    try:
        device = engine.device if engine else args.device
        if engine is None and device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device")
        threads = args.threads or (1 if engine else torch.get_num_threads()) if device == "cpu" else None
        config = {"model": args.model, "arch": None if args.model else args.arch, "dtype": args.dtype,
                  "backend": args.backend or sdcore.get_backend(), "device": device, "threads": threads,
                  "vae": args.vae, "vae_tiling": args.vae_tiling, "allow_nan": args.allow_nan,
                  "cuda_graphs": not args.no_cuda_graphs}
        # allow_nan and cuda_graphs don't change the pixels: a resumed run may differ in them
        settings = {**{k: v for k, v in config.items() if k not in ("allow_nan", "cuda_graphs")},
                    "batch_size": args.batch_size,
                    "seed": args.seed, "defaults": defaults,
                    "lines": {str(r["line"]): {k: v for k, v in r.items() if k != "line"} for r in requests}}
        folder = store.Folder(args.out, settings, images, args.overwrite)
        folder.check_settings()
        todo = folder.start()
        skipped = len(images) - len(todo)
        groups = prompts.groups(todo, args.batch_size)
        if engine is None:
            rows = local_rows(config, groups, worker_cls)
        else:
            rows = engine.rows(config, groups, args.workers or engine.default_workers(threads), worker_cls)
        made, failures = _collect(folder, {i.name: i for i in todo}, rows, len(todo), args.no_progress)
    finally:
        if engine:
            engine.close()
        if folder:
            folder.finish()
    seconds = time.perf_counter() - started
    print(f"sdcore batch: {made} made, {skipped} skipped (already present), {len(failures)} failed, "
          f"{seconds:.1f} s{f' ({made / seconds:.2f} images/s)' if made else ''}; {args.out}/{store.MANIFEST}")
    for image, error in failures:
        print(f"  failed: line {image.line} image {image.index} (seed {image.seed}): {error}", file=sys.stderr)
    if failures:
        lines = sorted({image.line for image, _ in failures})
        print(f"sdcore batch: {len(failures)} image(s) failed, prompts lines {', '.join(map(str, lines))}; "
              "rerun the same command to retry them", file=sys.stderr)
    return 1 if failures else 0


def _collect(folder, by_name: dict, rows, total: int, no_progress: bool):
    """Write each finished image as it arrives, under a progress bar (images done, images/s, ETA)."""
    from tqdm.auto import tqdm

    made, failures, seen = 0, [], set()
    with tqdm(total=total, unit="img", desc="sdcore batch", file=sys.stderr, disable=no_progress) as bar:
        for row in rows:
            name = row["name"]
            if name in seen:  # a retried block's second answer
                continue
            seen.add(name)
            if row["error"]:
                failures.append((by_name[name], row["error"]))
            elif folder.add(by_name[name], row["png"], row["parameters"]):
                made += 1
            bar.update(1)
    return made, failures


def local_rows(config, groups, worker_cls):
    if not groups:  # nothing to make: no model to load
        return
    worker = worker_cls(config)
    for group in groups:
        out = worker({"group": [encode_group(group)]})
        for i in range(len(out["name"])):
            yield {key: column[i] for key, column in out.items()}


class RayEngine:
    """Ray Data over a local Ray (started here, stopped at the end) or the cluster at ``address``; a Ray
    session that is already initialized in this process is used as it is."""

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise ValueError("--engine ray needs Ray: pip install 'sdcore[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
        self.resources = ray.cluster_resources()
        self.device = "cuda" if self.resources.get("GPU", 0) >= 1 else "cpu"

    def default_workers(self, threads: int | None) -> int:
        """One worker per GPU; without GPUs, as many as the CPUs hold at ``threads`` each."""
        if self.device == "cuda":
            return int(self.resources["GPU"])
        return max(1, int(self.resources.get("CPU", 1)) // threads)

    def rows(self, config, groups, workers: int, worker_cls):
        import ray.data

        if not groups:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's bar counts images
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # the summary line is the driver's
        # One block per group: a block is what Ray hands an actor and what it retries, so the smallest
        # blocks spread work evenly and redo the least after a worker dies.
        ds = ray.data.from_items([{"group": encode_group(g)} for g in groups], override_num_blocks=len(groups))
        resources = {"num_gpus": 1} if config["device"] == "cuda" else {"num_cpus": config["threads"]}
        ds = ds.map_batches(worker_cls, fn_constructor_args=(config,), batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=min(workers, len(groups))),
                            **resources)  # Ray Data's actor pools restart a dead actor and rerun its blocks
        for row in ds.iter_rows():
            yield {key: row[key] for key in ("name", "png", "parameters", "error")}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
