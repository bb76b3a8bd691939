"""Atomic checkpoint writes: a save interrupted at any point (SIGKILL, full disk, power) leaves the previous
checkpoint intact, because the new one is written to a temporary file in the same folder, flushed to disk, and
only then renamed over the old name (``os.replace`` is atomic on POSIX and Windows)."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..runtime import remove_orphaned_files

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a save killed mid-write (SIGKILL) leaves its temporary file: delete those of dead writers
    remove_orphaned_files(path.parent, f".{glob.escape(path.name)}.pid*.tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; a checkpoint gets a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing atomically and loading with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        from ..checkpoint import CheckpointError

        p = Path(path)
        try:
            if p.is_file() and p.stat().st_size == 0:
                raise ValueError("an empty file")
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # the weights-only unpickler raises many kinds on damaged or foreign files
            others = sorted(q.name for q in p.parent.glob("*.ckpt") if q != p) if p.parent.is_dir() else []
            raise CheckpointError(
                f"cannot resume from {p}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                + (f"; other checkpoints there: {others[:5]} (pass one with --ckpt_path)" if others else "")
            ) from e
