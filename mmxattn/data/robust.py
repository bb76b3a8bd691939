"""Robust image decoding and skip accounting for image-caption data sets.

A long training run must not die on one broken file, and must not silently lose a large share of its data either.
The mechanism, which works with DataLoader worker processes (where per-worker counters would be invisible):

1. Data sets never raise on a broken sample: they return a picklable ``BrokenSample(source, reason)`` marker.
2. ``collate_skipping`` (in the worker) drops the markers and attaches ``batch["skipped"] = [(source, reason), ...]``,
   so the skip record travels to the main process inside the batch itself.
3. ``SkipTracker`` (main process; the LightningModule or a callback owns it) sums ``update(n_ok, skipped)`` per batch
   and raises ``BadDataError`` with examples once the broken share exceeds ``max_fraction``.

``load_image`` is the one decoding helper: it returns an RGB PIL image or raises ``BadImageError`` with a human reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "BadDataError",
    "BadImageError",
    "BrokenSample",
    "DataSetupError",
    "SkipTracker",
    "caption_problem",
    "collate_samples",
    "collate_skipping",
    "load_image",
]

# Leading bytes of the formats we expect in caption data sets: a file that starts like an image but fails to decode is
# "truncated/corrupt"; anything else is "not an image" (an HTML error page saved as .jpg, a text file, ...).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # premultiplied alpha -> the straight-alpha mode PIL converts from
_PIL_LIMIT_LOCK = threading.Lock()  # held while PIL's global pixel limit is raised for one decode


class BadImageError(Exception):
    """An image that cannot be used: ``path`` names the file (or sample), ``reason`` says why in words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) when pickled across worker processes
        return (type(self), (self.path, self.reason))


class BadDataError(RuntimeError):
    """Too large a share of the data set is broken to keep training on it."""


class DataSetupError(Exception):
    """Data that cannot be used as configured: a missing file, column or image root, an empty split or one whose
    every sample is unusable, a training split smaller than one batch. Raised at setup, before training (the
    concrete errors also derive from ValueError or FileNotFoundError); ``train.py`` prints it as one error line."""


@dataclass(frozen=True)
class BrokenSample:
    """Returned by a data set instead of a sample it could not produce; dropped and counted by ``collate_skipping``."""

    source: str  # file path, "shard.tar:key", or a shard name when a whole shard failed
    reason: str


def _flatten_alpha(img: Image.Image) -> Image.Image:
    # Composite on white rather than dropping alpha: transparent pixels often hold arbitrary (frequently black) RGB,
    # and white is how a transparent logo or icon looks on the page it was captioned from.
    # premultiplied modes first: PIL has no "La" -> "RGBA" conversion (it raises), only "La" -> "LA"
    if img.mode in _PREMULTIPLIED:
        img = img.convert(_PREMULTIPLIED[img.mode])
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    # PIL's own I;16 -> RGB conversion clips at 255 (a 16-bit image turns almost white), so rescale here.
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.uint32) >> 8
    elif img.mode == "I":  # 32-bit int: commonly 16-bit content (older Pillow opened 16-bit PNGs as "I")
        hi = int(arr.max()) if arr.size else 0
        if hi <= 255:
            out = np.clip(arr, 0, 255)
        elif hi <= 65535:
            out = np.clip(arr, 0, 65535) >> 8
        else:
            lo = int(arr.min())
            out = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
    else:  # "F": floats in [0, 1] are scaled, anything else is read as 0..255
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        out = np.clip(np.nan_to_num(arr) * (255.0 if hi <= 1.0 else 1.0), 0, 255)
    return Image.fromarray(np.asarray(out, dtype=np.uint8), mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit/float rescaled to 8 bit, palette resolved."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # a palette with a transparent index must go through RGBA, or the transparent colour shows as itself
        return _flatten_alpha(img) if "transparency" in img.info else img.convert("RGB")
    if img.mode in _ALPHA_MODES:
        return _flatten_alpha(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _to_8bit(img)
    return img.convert("RGB")  # L, 1, CMYK (naive, no ICC), YCbCr, LAB, HSV, RGBX


def load_image(
    src: str | os.PathLike | bytes,
    min_size: int = 8,
    max_pixels: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode ``src`` (a path or the encoded bytes) into an RGB PIL image, or raise ``BadImageError``.

    ``min_size``: smaller side in pixels below which the image is rejected ("too small (WxH)").
    ``max_pixels``: width*height above which the image is rejected before any pixel is decoded; defaults to PIL's
    ``Image.MAX_IMAGE_PIXELS`` (PIL itself only warns between 1x and 2x that limit; we skip in both cases). A
    ``max_pixels`` above PIL's limit is honoured: PIL's limit is raised to it for this decode.
    ``name``: how to name the image in errors when ``src`` is bytes (e.g. "shard-000.tar:000123").
    EXIF orientation is applied, so the pixels match what a viewer (and the caption writer) saw.
    """
    label = name if name is not None else (f"<{len(src)} bytes>" if isinstance(src, bytes) else str(src))
    if isinstance(src, bytes):
        data = src
    else:
        try:
            with open(src, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BadImageError(label, "file not found") from None
        except IsADirectoryError:
            raise BadImageError(label, "is a directory, not an image file") from None
        except OSError as e:
            raise BadImageError(label, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise BadImageError(label, "empty file")
    looks_like_image = data.startswith(_IMAGE_MAGIC)
    with _PIL_LIMIT_LOCK:  # not while another call has PIL's limit raised (it would read the raised value)
        pil_limit = Image.MAX_IMAGE_PIXELS
    limit = max_pixels if max_pixels is not None else pil_limit
    raise_pil_limit = limit is not None and pil_limit is not None and limit > pil_limit
    try:
        with _pil_limit_raised_to(limit) if raise_pil_limit else contextlib.nullcontext():
            return _decode(data, label, limit, min_size)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:  # over 2x PIL's limit: raised by Image.open before we see the size
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImageError(label, f"decompression bomb ({m.group(1) if m else '?'} pixels)") from None
    except UnidentifiedImageError:
        raise BadImageError(label, "truncated/corrupt image" if looks_like_image else "not an image") from None
    except Exception as e:  # OSError, ValueError, struct.error... and whatever else PIL raises on hostile bytes
        reason = "truncated/corrupt image" if looks_like_image else "not an image"
        raise BadImageError(label, f"{reason} ({type(e).__name__}: {e})") from None


def _decode(data: bytes, label: str, limit: int | None, min_size: int) -> Image.Image:
    with warnings.catch_warnings():
        # we enforce the pixel limit ourselves below (skip instead of a warning that a long run would ignore)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if limit is not None and w * h > limit:
        raise BadImageError(label, f"decompression bomb ({w} x {h})")
    if min(w, h) < min_size:
        raise BadImageError(label, f"too small ({w}x{h})")
    img.load()  # decode now, inside the caller's try: a truncated JPEG only fails here
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


@contextlib.contextmanager
def _pil_limit_raised_to(limit: int) -> Iterator[None]:
    """PIL's global ``Image.MAX_IMAGE_PIXELS`` set to ``limit`` for one decode: PIL checks it in ``Image.open`` (and
    while loading some formats) before our own check could honour a ``max_pixels`` above it. The lock is held for
    the decode: concurrent raises cannot restore each other's value, and other threads' ``load_image`` calls wait
    before reading PIL's limit (DataLoader workers are processes, each with its own)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def caption_problem(caption: Any) -> str | None:
    """Why ``caption`` cannot be trained on, or None if it is fine. Strings read with errors="surrogateescape" carry
    undecodable bytes as lone surrogates, which is how non-UTF-8 captions are detected here."""
    if caption is None:
        return "missing caption"
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return "caption not valid UTF-8"
    if not isinstance(caption, str):
        return f"caption is {type(caption).__name__}, not text"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return "caption not valid UTF-8"
    if not caption.strip():
        return "empty caption"
    return None


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Default base collate for sample dicts: tensors with equal shapes are stacked, everything else (PIL images,
    strings, the ragged ``captions`` lists, mixed int/str ids) is kept as a list in batch order."""
    batch: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[k] = torch.stack(values)
        else:
            batch[k] = values
    return batch


def collate_skipping(
    samples: Sequence[dict[str, Any] | BrokenSample],
    base_collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_samples,
) -> dict[str, Any]:
    """Drop ``BrokenSample`` markers, collate the rest with ``base_collate``, and attach the markers as
    ``batch["skipped"] = [(source, reason), ...]``. A batch with no usable sample is ``{"skipped": [...]}`` alone:
    the training step should report it to the tracker and return None (Lightning then skips the step).
    Use ``functools.partial(collate_skipping, base_collate=...)`` to plug in a tokenizing collate."""
    good = [s for s in samples if not isinstance(s, BrokenSample)]
    skipped = [(s.source, s.reason) for s in samples if isinstance(s, BrokenSample)]
    batch = dict(base_collate(good)) if good else {}
    batch["skipped"] = skipped
    return batch


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of usable samples in a ``collate_skipping`` batch (0 for an all-broken batch)."""
    for k, v in batch.items():
        if k != "skipped" and isinstance(v, (list, tuple, torch.Tensor)):
            return len(v)
    return 0


class SkipTracker:
    """Counts skipped samples per epoch in the main process and stops a run whose data is mostly broken.

    ``update`` raises ``BadDataError`` as soon as the epoch's broken share exceeds ``max_fraction`` once at least
    ``min_samples`` samples were seen (so one early bad file does not stop a run); ``end_epoch`` checks the share over
    a whole epoch regardless of ``min_samples`` (the full epoch is the real share; an epoch cut short by
    ``max_steps`` or resumed mid-way is held to ``min_samples`` as during it), then returns a summary dict for
    logging and resets the epoch counters. A whole-shard failure counts as one skipped entry.
    """

    def __init__(
        self, max_fraction: float = 0.05, min_samples: int = 1000, max_examples: int = 10, source: str | None = None
    ) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"SkipTracker: max_fraction must be in [0, 1], got {max_fraction}")
        if min_samples < 0 or max_examples < 0:
            raise ValueError(
                f"SkipTracker: min_samples and max_examples must be >= 0, got {min_samples}, {max_examples}"
            )
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.max_examples = max_examples
        self.source = source  # what the samples come from (e.g. "train_path data/train.csv"), named in the error
        self.total_seen = 0
        self.total_skipped = 0
        self._reset()

    def _reset(self) -> None:
        self.n_ok = 0
        self.n_skipped = 0
        self.n_batches = 0  # update() calls this epoch
        self.reasons: Counter[str] = Counter()
        # distinct sources, each with its first reason (an image named by 10 CSV rows is one example, counted 10x)
        self.examples: list[tuple[str, str]] = []
        self.example_counts: Counter[str] = Counter()

    @property
    def n_seen(self) -> int:
        return self.n_ok + self.n_skipped

    def update(self, n_ok: int, skipped: Sequence[tuple[str, str]] = ()) -> None:
        """Record one batch: ``n_ok`` usable samples and the ``batch["skipped"]`` list."""
        self.n_ok += int(n_ok)
        self.n_batches += 1
        self.total_seen += int(n_ok) + len(skipped)
        for source, reason in skipped:
            self.n_skipped += 1
            self.total_skipped += 1
            self.reasons[_reason_kind(reason)] += 1
            source = str(source)
            if source in self.example_counts:
                self.example_counts[source] += 1
            elif len(self.examples) < self.max_examples:
                self.examples.append((source, str(reason)))
                self.example_counts[source] = 1
        if self.n_seen >= self.min_samples:
            self._check()

    def update_from_batch(self, batch: dict[str, Any]) -> None:
        """``update`` from a ``collate_skipping`` batch."""
        self.update(batch_size_of(batch), batch.get("skipped", ()))

    def summary(self) -> dict[str, Any]:
        frac = self.n_skipped / self.n_seen if self.n_seen else 0.0
        return {
            "n_seen": self.n_seen,
            "n_skipped": self.n_skipped,
            "skipped_fraction": frac,
            "reasons": dict(self.reasons),
            "examples": list(self.examples),  # distinct sources
            "example_counts": dict(self.example_counts),  # samples of each example source
        }

    def end_epoch(self, complete: bool = True) -> dict[str, Any]:
        """Summary of the epoch (n_seen, n_skipped, skipped_fraction, reasons, examples); resets the epoch counts.
        ``complete=False`` (the epoch was cut short or resumed mid-way): its share is checked only over at least
        ``min_samples`` samples, as during the epoch."""
        if complete or self.n_seen >= self.min_samples:
            self._check()
        out = self.summary()
        self._reset()
        return out

    def _check(self) -> None:
        if self.n_seen and self.n_skipped / self.n_seen > self.max_fraction:
            raise BadDataError(self.message())

    def message(self) -> str:
        """One line: how many samples of the epoch so far were broken, why, and the distinct example sources (each
        with its number of samples when it is more than one)."""
        frac = self.n_skipped / self.n_seen if self.n_seen else 0.0
        shown = []
        for src, why in self.examples:
            k = self.example_counts.get(src, 1)
            shown.append(f"{src}: {why}" + (f" ({k} samples)" if k > 1 else ""))
        more = self.n_skipped - sum(self.example_counts.values())
        if more > 0:
            shown.append(f"... and {more} more sample(s) from other sources")
        head = {0: "", 1: "Example: "}.get(len(self.examples), f"Examples ({len(self.examples)} distinct sources): ")
        return (
            (f"{self.source}: " if self.source else "")
            + f"{self.n_skipped} of {self.n_seen} samples ({frac:.1%}) are broken, more than "
            f"max_fraction={self.max_fraction:.1%}. Reasons: {dict(self.reasons)}."
            + (f" {head}" + "; ".join(shown) if shown else "")
        )


def _reason_kind(reason: str) -> str:
    # "too small (1x1)" and "too small (3x5)" are one kind; keep the text before any parenthesised detail
    return reason.split(" (", 1)[0].split(":", 1)[0].strip()


def check_image_root(paths: Sequence[str | Path], root: Path | None, source: str, n_check: int = 32) -> None:
    """Fail fast on a wrong image root: if none of the first ``n_check`` paths exists, raise naming the root and one
    expected path (a few missing files are a data problem handled by skipping; all missing is a setup problem)."""
    sample = list(paths[:n_check]) if n_check > 0 else []
    if not sample or any(os.path.exists(p) for p in sample):
        return
    raise FileNotFoundError(
        f"{source}: none of the first {len(sample)} image paths exist under image_root={str(root)!r} "
        f"(expected e.g. {str(sample[0])!r}). Is image_root right?"
    )
