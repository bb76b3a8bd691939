"""Process-level settings for CPU runs.

:func:`tune_cpu_allocator` keeps glibc's malloc from handing large tensor buffers back to the kernel. By default
glibc serves every allocation above its mmap threshold (128 KiB, raised adaptively to at most 32 MiB) with a fresh
``mmap`` and trims freed memory at the top of the heap back to the kernel, so each new activation of a few MB
starts as untouched pages: the first write to every 4 KiB page is a page fault in which the kernel zeroes it. A
CPU training step allocates and frees hundreds of such tensors, and the faults can cost more than the arithmetic
of the elementwise ops that write them (profiled on this project's 2-core machine: inside the main job's step an
exact GELU over a 16384 x 192 fp32 activation took 5.2 ms and its backward 12.4 ms, the same ops looping over
recycled buffers 1.1 and 2.0 ms; 19,000 minor page faults a step). With the threshold at its maximum and trimming off,
freed buffers stay in the heap and are reused. Results are bit-identical; the price is that the process keeps
its peak heap instead of returning it to the system. PyTorch's CPU tuning guides reach the same end by
preloading jemalloc or tcmalloc (``LD_PRELOAD``), which this does not need.

Set ``MMXATTN_TUNE_MALLOC=0`` to leave the allocator alone. Only glibc (Linux) is touched; elsewhere this does
nothing.

:func:`remove_orphaned_files` deletes the temporary files of writers that were killed mid-write (checkpoints, the
shapes cache), named with the writer's process id.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["tune_cpu_allocator", "MALLOC_SETTINGS", "remove_orphaned_files"]


def host_reads_unavailable(x: Any) -> bool:
    """Whether a check that reads tensor ``x``'s values on the host cannot run now: while torch.compile traces,
    or while a CUDA graph is being captured (a host sync there is an error)."""
    import torch

    if torch.compiler.is_compiling():
        return True
    return bool(x.is_cuda) and torch.cuda.is_current_stream_capturing()


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the first frame
    outside this package and torch (``torch.no_grad``'s wrappers): the user's line, whatever public function and
    wrappers led there."""
    import torch

    roots = tuple(os.path.join(os.path.dirname(os.path.abspath(f)), "") for f in (__file__, torch.__file__))
    frame, level = sys._getframe(1), 1  # the caller of this function: the one that warns (stacklevel 1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_files(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete the files in ``folder`` matching the glob ``pattern`` whose name carries the id of a process that no
    longer runs (``pid<N>`` or ``tmp<N>``): what a writer killed mid-write (SIGKILL, power) left behind. Files of
    live processes (a concurrent writer) and files without a process id are kept. Returns the deleted paths."""
    gone = []
    folder = Path(folder)
    if not folder.is_dir():
        return gone
    for p in folder.glob(pattern):
        m = re.search(r"(?:pid|tmp)(\d+)", p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            p.unlink()
            gone.append(p)
        except OSError:  # already removed by another cleaner, or not ours to remove
            pass
    return gone


# mallopt(3) parameters (malloc.h) and the values set: the largest mmap threshold glibc accepts on 64-bit
# (HEAP_MAX_SIZE / 2 = 32 MiB), no trimming below 2 GiB of free top-of-heap, and 64 MiB of padding per heap growth.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {"mmap_threshold": 32 << 20, "trim_threshold": (1 << 31) - 1, "top_pad": 64 << 20}

_done: bool | None = None


def tune_cpu_allocator(enable: bool | None = None) -> bool:
    """Make glibc malloc keep and reuse freed large buffers (module docstring). Idempotent.

    ``enable`` None reads ``MMXATTN_TUNE_MALLOC`` (default on). Returns True when the settings are in effect.
    """
    global _done
    if enable is None:
        enable = os.environ.get("MMXATTN_TUNE_MALLOC", "1").strip().lower() not in ("0", "false", "no", "off")
    if not enable:
        return bool(_done)
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (
        mallopt(_M_MMAP_THRESHOLD, MALLOC_SETTINGS["mmap_threshold"]) == 1
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_SETTINGS["trim_threshold"]) == 1
        and mallopt(_M_TOP_PAD, MALLOC_SETTINGS["top_pad"]) == 1
    )
    _done = ok
    return ok
