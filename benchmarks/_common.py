"""Timing and memory helpers shared by the side-by-side benchmarks in this folder.

* :func:`time_alternating`: median-of-repeats wall-clock timer for several peers measured in ONE process, with
  warmup, interleaving the peers (and rotating their order every round) so that drifting machine load (the CPU
  is shared) hits every peer alike instead of whichever happened to run last.
* :func:`peak_memory`: peak memory of one callable.
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (what the tensors hold at the
    peak, parameters included; the caching allocator's reserve is not counted), minus what the process held
    before the callable was built.
  - CPU: there is no allocator statistic, so the callable runs in a FRESH spawned process: the process builds
    its state (model, optimiser, batch), runs ``warmup`` calls, resets the kernel's peak-RSS counter (writing
    ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current RSS, Linux >= 4.0), runs the measured calls
    and reads ``VmHWM``. The result is ``peak RSS - RSS before the measured calls`` (what the calls added at
    their peak) plus the bytes of every tensor the build reported as resident (the parameters and optimiser
    state), so that it means the same as the CUDA number: everything held at the step's peak. glibc's dynamic
    mmap threshold would let freed large blocks stay in the heap and blur the peak, so the child runs with
    ``MALLOC_MMAP_THRESHOLD_`` fixed: every large tensor is its own mapping, returned to the kernel when freed.
    A fresh process also keeps one peer's allocator history from inflating the other's number.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

__all__ = ["bf16_autocast", "peak_memory", "median", "sync", "time_alternating", "tensor_bytes", "fmt_bytes"]


def bf16_autocast(device: torch.device | str, on: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast(device type, bfloat16)`` when ``on``, else a no-op context (the benchmarks' ``--bf16``)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels so that a wall-clock reading covers them (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of every callable in ``fns``: ``{name: [t_1 .. t_repeats]}``.

    Each round calls every peer once; the order rotates every round (A B, B A, ...). ``warmup`` rounds run
    first and are discarded (allocator growth, lazy initialisation, oneDNN/cuDNN kernel selection).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not fns:
        raise ValueError("fns must name at least one callable")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensor storages (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------- peak memory
# A "build" is a picklable (module-level) function returning (step, resident_bytes): ``step()`` is the callable
# to measure and ``resident_bytes()`` the bytes of state it keeps between calls (parameters, gradients,
# optimiser state), counted as held at the peak on CPU (on CUDA the allocator already counts them).
Build = Callable[[], tuple[Callable[[], Any], Callable[[], int]]]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _measure_in_child(build: Build, warmup: int, calls: int, threads: int) -> dict[str, int]:
    torch.set_num_threads(threads)
    step, resident = build()
    for _ in range(warmup):
        step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _rss_kib("VmRSS")
    held = resident()
    for _ in range(calls):
        step()
    peak = _rss_kib("VmHWM")
    return {"added": (peak - before) * 1024, "resident_before": held, "rss_before": before * 1024}


def peak_memory(
    build: Build,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    calls: int = 1,
    threads: int | None = None,
    timeout_s: float = 600.0,
) -> dict[str, int]:
    """Peak bytes held while ``step()`` runs (see the module docstring for the method on each device).

    Returns ``{"peak": bytes, "added": bytes the calls added on top of the state before them}``. ``warmup``
    calls run first so that lazily created state (gradients, AdamW moments) exists and is counted as held.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        # In process: whatever the process already holds (baseline) is not counted.
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(dev)
        step, _ = build()
        for _ in range(warmup):
            step()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(calls):
            step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del step
        gc.collect()  # the step's closures may sit in reference cycles: free the model before the next build
        torch.cuda.empty_cache()
        return {"peak": int(peak - baseline), "added": int(peak - before)}
    if dev.type != "cpu":
        raise ValueError(f"peak_memory supports cpu and cuda devices, got {dev}")
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("CPU peak memory needs Linux /proc (clear_refs and VmHWM)")
    threads = threads or torch.get_num_threads()
    # The child inherits the environment at spawn time: fix the mmap threshold (128 KiB) for it only.
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            r = pool.submit(_measure_in_child, build, warmup, calls, threads).result(timeout=timeout_s)
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    return {"peak": int(r["added"] + r["resident_before"]), "added": int(r["added"])}
