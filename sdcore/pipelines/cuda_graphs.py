"""CUDA graphs of the UNet call, the way stable-fast uses them: the first call at a new shape is captured into
a graph, later calls copy their inputs into the graph's static input tensors and replay it, so a denoising
step costs one graph launch instead of hundreds of kernel launches and their host-side work.

* One graph per (input shapes and strides, dtypes, device, backend), in a bounded LRU cache; all graphs share
  one memory pool, so their intermediate buffers are reused across shapes.
* Weights are read from their own storage by the graph: a LoRA merged in place (sdcore.lora) changes what the
  next replay computes, with no recapture. Anything that reallocates the weights (``pipe.to(dtype)``, another
  UNet) changes the cache's weight signature, and the graphs are dropped and recaptured.
* Every new graph is checked once: its first replay must equal, bitwise, the eager call on the same inputs.
  If capture fails or the replay differs, the pipeline warns and runs eagerly from then on (never a wrong
  image for the sake of speed).
* One lock: a graph's static inputs and output are shared, so two threads replay one after the other. Captures
  (rare) also take a process-wide lock, so two UNets (SDXL's base and refiner) never capture at once.
* Capture and replay run with the UNet's device current, on a capture stream of that device: a pipeline on
  cuda:1 while cuda:0 is current would otherwise capture nothing (its kernels run eagerly on their own
  device's stream), and the check below is made to catch that too."""
from __future__ import annotations

import collections
import contextlib
import logging
import threading

import torch

from .. import _backend

log = logging.getLogger("sdcore")

CAPACITY = 8  # graphs kept; each holds its static inputs and output (its activations are in the shared pool)
# eager calls on a side stream before capture (cuDNN/cuBLAS workspaces, lazy inits); the eager reference call
# that the first replay is checked against has already run once on the main stream
WARMUP_CALLS = 1
_CAPTURE_LOCK = threading.Lock()


class LRU:
    """At most ``capacity`` values by key; ``get`` refreshes a key, ``put`` drops the least recently used."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._items: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def keys(self) -> list:
        return list(self._items)

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype


class _Graph:
    """One captured UNet call: its static inputs (filled before each replay) and output."""

    def __init__(self, unet, pool, stream, sample, timestep, context, added):
        self.sample, self.context = sample.clone(), context.clone()
        self.timestep = timestep.clone()
        self.added = {k: v.clone() for k, v in added.items()}
        kwargs = {"added_cond_kwargs": self.added} if self.added else {}
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                unet(self.sample, self.timestep, self.context, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a server's preview of the latents) doesn't break capture
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.output = unet(self.sample, self.timestep, self.context, **kwargs)
        # Capture only records kernels, so the output holds stale memory, or, for work that escaped capture (run
        # eagerly on another device's stream), the right answer for these very inputs. Poisoned, a graph that
        # doesn't write all of it fails the first replay's check.
        self.output.fill_(float("nan"))

    def replay(self, sample, timestep, context, added) -> torch.Tensor:
        self.sample.copy_(sample)
        self.timestep.copy_(timestep)
        self.context.copy_(context)
        for k, v in added.items():
            self.added[k].copy_(v)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the static output


class UNetGraphs:
    """``graphs(sample, timestep, context, added_cond_kwargs)``: the UNet's output, from a CUDA graph where
    one is (or can be) captured, else from the eager call."""

    def __init__(self, unet, capacity: int = CAPACITY):
        self.unet = unet
        self.graphs = LRU(capacity)
        self.pool = None
        self.stream = None  # the capture stream, on the UNet's device
        self.weights = None
        self.disabled: str | None = None  # why graphs are off for this UNet, after a failed capture or check
        self.lock = threading.Lock()

    def _weights_signature(self) -> tuple:
        """What a graph's validity depends on besides its inputs: the weights' storage. A .to() or a reload
        reallocates every weight, so the first parameter's address and dtype tell (and cost nothing per step)."""
        first = next(self.unet.parameters())
        return id(self.unet), first.data_ptr(), first.dtype, first.device

    def __call__(self, sample, timestep, context, added_cond_kwargs=None) -> torch.Tensor:
        added = dict(added_cond_kwargs or {})
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
        timestep = timestep.expand(sample.shape[0]).contiguous()
        kwargs = {"added_cond_kwargs": added} if added else {}
        if self.disabled is not None:
            return self.unet(sample, timestep, context, **kwargs)
        key = (_signature(sample), _signature(context), sample.device, _backend.get_backend(),
               tuple((k, _signature(v)) for k, v in sorted(added.items())))
        with self.lock, (torch.cuda.device(sample.device) if sample.is_cuda else contextlib.nullcontext()):
            weights = self._weights_signature()
            if weights != self.weights:
                self.graphs.clear()
                self.pool = self.stream = None
                self.weights = weights
            graph = self.graphs.get(key)
            if graph is not None:
                return graph.replay(sample, timestep, context, added)
            want = self.unet(sample, timestep, context, **kwargs)
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                    self.stream = torch.cuda.Stream(sample.device)
                with _CAPTURE_LOCK:
                    graph = _Graph(self.unet, self.pool, self.stream, sample, timestep, context, added)
                got = graph.replay(sample, timestep, context, added)
            except Exception as exc:  # an op that can't be captured: stay correct, eager from now on
                self._disable(f"capture failed ({type(exc).__name__}: {exc})")
                return want
            if not torch.equal(got, want):
                self._disable("the captured graph's output differs from the eager call's")
                return want
            self.graphs.put(key, graph)
            return got

    def _disable(self, why: str) -> None:
        self.disabled = why
        self.graphs.clear()
        log.warning("sdcore: CUDA graphs off for this UNet, running eagerly: %s. (cuda_graphs=False / "
                    "--no-cuda-graphs turns them off up front.)", why)

    def clear(self) -> None:
        with self.lock:
            self.graphs.clear()
            self.weights = None
