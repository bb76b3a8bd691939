"""CUDA graphs for inference calls of fixed shapes: capture a call once, then replay it.

A small model's inference call on a GPU is hundreds of tiny kernels, and launching them one by one from Python
takes longer than running them. A CUDA graph records the launches once and replays them in one go; it needs fixed
shapes and fixed memory addresses, so inputs are copied into static buffers and outputs are read from the graph's
own buffers (overwritten by the next replay).

:func:`mmxattn.generate` uses this for the image encoder and the cached decoding step on CUDA (``cuda_graph``).
Captured graphs are kept per model (weakly: they go with the model) and per key, a few per model, and captured
again when the model's parameters moved (``model.to``, a new ``load_state_dict`` with ``assign=True``). Each holds
its own GPU memory pool (an encoder graph: the activations of one forward at its batch size); :func:`clear` drops
them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .vision.windows import _autocast_state

__all__ = ["GraphedCall", "autocast_state", "cached", "capture", "clear", "held_graphs"]

_PER_MODEL = 6
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, tuple[tuple[int, ...], Any]]] = (
    weakref.WeakKeyDictionary()
)


def autocast_state(device_type: str = "cuda") -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast for ``device_type`` (dtype None when disabled)."""
    _, enabled, dtype = _autocast_state(device_type)
    return enabled, (dtype if enabled else None)


def capture(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 2,
    before_capture: Callable[[], None] | None = None,
) -> tuple[Any, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (lazy buffers, kernel choice), call ``before_capture``, then
    capture one call of ``fn`` in a CUDA graph. Returns ``(graph, output of the captured call)``.

    The caller's autocast state is kept, with autocast's weight-cast cache off: cached casts made outside the graph
    would be freed while the graph still reads them."""
    enabled, dtype = autocast_state("cuda")
    autocast = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if enabled else contextlib.nullcontext()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast:
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's unsafe calls may break the capture; with the default ("global") a CUDA call
    # from any other thread of the process during the capture would (a DataLoader's pin-memory thread, NCCL's
    # watchdog under DDP: NVIDIA/physicsnemo#107 reports the watchdog crash, pytorch/pytorch#105182 discusses it)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), autocast:
        out = fn()
    return graph, out


def cached(model: nn.Module, key: tuple, build: Callable[[], Any]) -> Any:
    """The object ``build()`` made for ``(model, key, current autocast state)``, built on first use and again when
    the model's parameters moved; at most a few per model (least recently used dropped)."""
    weights = tuple(p.data_ptr() for p in model.parameters())
    key = (*key, autocast_state("cuda"))
    held = _REGISTRY.setdefault(model, OrderedDict())
    entry = held.get(key)
    if entry is None or entry[0] != weights:
        # never out of inference tensors: Lightning evaluates under torch.inference_mode(), and a graph's static
        # buffers built there could not be refilled in place by a later call outside it (model.caption after fit)
        with torch.inference_mode(False):
            entry = (weights, build())
        held[key] = entry
        while len(held) > _PER_MODEL:
            held.popitem(last=False)
    held.move_to_end(key)
    return entry[1]


def clear(model: nn.Module | None = None) -> None:
    """Drop the captured graphs (and the GPU memory pools they hold) of ``model``, or of every model."""
    if model is None:
        _REGISTRY.clear()
    else:
        _REGISTRY.pop(model, None)


def held_graphs(model: nn.Module) -> int:
    """How many captured objects ``model`` holds (for tests and diagnostics)."""
    return len(_REGISTRY.get(model, ()))


class GraphedCall:
    """``fn(x)`` for one shape and dtype of ``x``, captured: calling it copies ``x`` into the static input and
    replays. The result is the graph's own output buffer, valid until the next call."""

    def __init__(self, fn: Callable[[Tensor], Any], example: Tensor) -> None:
        self.input = example.detach().clone()
        self.graph, self.output = capture(lambda: fn(self.input), example.device)

    def __call__(self, x: Tensor) -> Any:
        if x.shape != self.input.shape or x.dtype != self.input.dtype:
            raise ValueError(
                f"this graph was captured for {tuple(self.input.shape)} {self.input.dtype}, got "
                f"{tuple(x.shape)} {x.dtype}"
            )
        self.input.copy_(x)
        self.graph.replay()
        return self.output
