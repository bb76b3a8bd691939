"""Batching for the LightningModule: tokenizing collate functions and a resumable, DDP-aware training sampler.

Batch contract (what ``mmxattn.lit`` consumes; every batch also carries ``skipped`` from ``collate_skipping``)::

    train: images (B, 3, H, W) float, ids (B, T) long, pos_ids (B,) long, image_ids list, captions list[str]
           (with train_captions_per_image K > 1: ids (R, T), pos_ids (R,), captions R strings, up to K per image,
           and text_image_index (R,) long, the image row of each caption)
    eval:  images (B, 3, H, W) float, image_ids list, references list[list[str]] (all captions of each image),
           ref_ids (R, T) long (references flattened, R = sum of their counts), ref_image_index (R,) long
           (+ shapes data: boxes list[(N_i, 4) float], groundings list[list[list[(token_positions, object)]]])

A batch whose samples were all broken is ``{"skipped": [...]}`` alone.

Exact resume. ``ResumableSampler`` yields *codes* ``epoch * len(dataset) + index`` whose order is a function of
(seed, epoch, rank, world size) only, and ``EpochIndexed`` decodes them in the worker: the epoch reaches the data
set through the index, so persistent workers (which hold a stale copy of the data set) still draw the caption and
the random augmentation of (seed, epoch, index). ``ResumableSampler.resume(epoch, samples_done)`` makes the next
pass start after the samples a checkpoint already trained on; the data module calls it from the trainer's
restored loop progress (``resume_position``), so a restarted run sees exactly the batches the uninterrupted run
would have seen, for any number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..losses import text_pos_ids
from .robust import BrokenSample, collate_skipping

__all__ = [
    "EpochIndexed",
    "EvalCollate",
    "ResumableLoader",
    "ResumableSampler",
    "TrainCollate",
    "ground_tokens",
    "sample_captions",
    "resume_position",
]


def _stack_images(samples: Sequence[dict[str, Any]]) -> torch.Tensor:
    images = [s["image"] for s in samples]
    if not all(isinstance(im, torch.Tensor) for im in images):
        kinds = sorted({type(im).__name__ for im in images})
        raise TypeError(f"collate: samples must hold transformed image tensors, got {kinds} (is a transform set?)")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"collate: image tensors differ in shape {sorted(shapes)}; the transform must fix the size")
    return torch.stack(images)  # (B, 3, H, W)


def sample_captions(sample: dict[str, Any], k: int) -> list[str]:
    """The sample's drawn ``caption`` followed by up to ``k - 1`` other captions of its image: those after it in
    ``sample["captions"]`` (cyclically), so the choice is a function of the sample (exact resume) and varies with
    the caption drawn each epoch. Fewer than ``k`` when the image has fewer captions."""
    first = sample["caption"]
    if k <= 1:
        return [first]
    caps = list(sample.get("captions") or [first])
    j = sample.get("caption_index")
    if not isinstance(j, int) or not 0 <= j < len(caps) or caps[j] != first:
        j = caps.index(first) if first in caps else None
    if j is None:  # the drawn caption is not in the list: put it first
        caps, j = [first, *caps], 0
    return [caps[(j + d) % len(caps)] for d in range(min(k, len(caps)))]


class TrainCollate:
    """One (image, caption) pair per sample -> the train batch. Runs in DataLoader workers (tokenisation included);
    picklable, as spawn-started workers need.

    ``captions_per_image`` > 1: each image brings up to that many of its captions (:func:`sample_captions`); the
    batch's ``ids``/``pos_ids``/``captions`` then have one row per caption and ``text_image_index`` (R,) gives the
    image row of each (the image is encoded once for all its captions)."""

    def __init__(self, tokenizer: Any, captions_per_image: int = 1) -> None:
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.tokenizer = tokenizer
        self.captions_per_image = int(captions_per_image)

    def __call__(self, samples: Sequence[dict[str, Any] | BrokenSample]) -> dict[str, Any]:
        return collate_skipping(samples, base_collate=self._collate)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        per_image = [sample_captions(s, self.captions_per_image) for s in samples]
        captions = [c for texts in per_image for c in texts]
        batch = {
            "images": _stack_images(samples),
            "ids": self.tokenizer(captions),  # (R, T); R = B with one caption per image
            "pos_ids": text_pos_ids(captions),  # (R,) equal strings -> equal ids, on every rank
            "image_ids": [s["image_id"] for s in samples],
            "captions": captions,
        }
        if self.captions_per_image > 1:
            counts = torch.tensor([len(t) for t in per_image], dtype=torch.long)
            batch["text_image_index"] = torch.repeat_interleave(torch.arange(len(per_image)), counts)  # (R,)
        return batch


def ground_tokens(tokenizer: Any, caption: str, grounding: Sequence[tuple[Sequence[int], int]]) -> list:
    """Word-position groundings of ``caption`` -> token positions in ``tokenizer(caption)[0]``:
    ``[(token_positions, object_index), ...]``. Words cut off by truncation are dropped, and so is a pair left
    with no word."""
    pos = tokenizer.word_token_positions(caption)
    out = []
    for words, obj in grounding:
        tokens = [pos[w] for w in words if 0 <= w < len(pos) and pos[w] >= 0]
        if tokens:
            out.append((tokens, int(obj)))
    return out


class EvalCollate:
    """One image with all its captions per sample -> the eval batch (retrieval needs every reference).
    ``grounding=True`` also collates ``boxes`` and token-level ``groundings`` (shapes data; needs a tokenizer with
    ``word_token_positions``, i.e. the word tokenizer), and ``scenes`` (each a Scene's fields as a tuple) when every
    sample carries its ``scene``."""

    def __init__(self, tokenizer: Any, grounding: bool = False) -> None:
        if grounding and not hasattr(tokenizer, "word_token_positions"):
            raise TypeError(f"EvalCollate(grounding=True) needs a word-level tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.grounding = grounding

    def __call__(self, samples: Sequence[dict[str, Any] | BrokenSample]) -> dict[str, Any]:
        return collate_skipping(samples, base_collate=self._collate)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        refs = [list(s["captions"]) for s in samples]
        flat = [c for r in refs for c in r]
        counts = torch.tensor([len(r) for r in refs], dtype=torch.long)
        batch = {
            "images": _stack_images(samples),
            "image_ids": [s["image_id"] for s in samples],
            "references": refs,
            "ref_ids": self.tokenizer(flat),  # (R, T)
            "ref_image_index": torch.repeat_interleave(torch.arange(len(refs)), counts),  # (R,)
        }
        if self.grounding:
            # (N_i, 4) xyxy in pixels of the transformed image
            batch["boxes"] = [torch.as_tensor(np.asarray(s["boxes"], np.float32)).reshape(-1, 4) for s in samples]
            batch["groundings"] = [
                [ground_tokens(self.tokenizer, c, g) for c, g in zip(s["captions"], s["groundings"])] for s in samples
            ]
            if all(s.get("scene") is not None for s in samples):
                # generated captions are checked against these. Fields as plain tuples (Scene(*t) rebuilds one):
                # Lightning's batch transfer rebuilds dataclasses field by field, which a frozen one refuses
                batch["scenes"] = [dataclasses.astuple(s["scene"]) for s in samples]
        return batch


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a generator seed must be < 2**63


class EpochIndexed(Dataset):
    """Wraps a map-style data set for ``ResumableSampler``: item ``epoch * len + i`` is ``dataset[i]`` drawn at
    ``epoch`` (``dataset.set_epoch(epoch)`` first, if it has one) with torch's RNG seeded from (seed, epoch, i), so
    random augmentations are a function of the sample too, not of the worker that happens to load it. The global
    RNG state is restored afterwards (matters with num_workers=0, where this runs in the training process)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: int) -> Any:
        epoch, i = divmod(int(code), len(self.dataset))
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)  # the worker's own copy: no effect on other workers or the main process
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also (re)seed every accelerator's generator, which
            # fork_rng(devices=[]) does not restore, and costs ~0.7 ms per call in lazy-init bookkeeping even on
            # a machine without one (2/3 of the shapes job's data time)
            torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, i))
            return self.dataset[i]


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices of this rank's share, a function of (seed, epoch, rank, world size) as in
    ``DistributedSampler`` (which this is, so Lightning keeps it under DDP instead of replacing it), yielded as
    ``EpochIndexed`` codes ``epoch * len(dataset) + index``. ``len`` is always the full per-rank epoch."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # a resume position belongs to the epoch it was set for
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        """Make the next pass the rest of ``epoch`` after its first ``samples_done`` indices (of this rank)."""
        if samples_done < 0:
            raise ValueError(f"samples_done must be >= 0, got {samples_done}")
        self.epoch = int(epoch)
        self._skip = int(samples_done)

    def __iter__(self):
        # runs at the first next(), i.e. when the DataLoader iterator starts: read epoch and skip once, then
        # forget the skip so the following passes are whole epochs
        epoch, skip, n = self.epoch, self._skip, len(self.dataset)
        self._skip = 0
        for i in islice(super().__iter__(), skip, None):
            yield epoch * n + i


def resume_position(trainer: Any) -> tuple[int, int] | None:
    """(epoch, batches of it already trained) when ``trainer`` is restoring a fit from a checkpoint, else None.

    Read from the fit loop's restored progress before it resets it (``train_dataloader`` runs first in
    ``FitLoop.run``). A checkpoint from ``on_train_epoch_end`` (epoch already counted as processed) or from the
    last batch of an epoch resumes at the start of the next epoch, as Lightning itself does.
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not getattr(loop, "restarting", False):
        return None
    try:
        ep = loop.epoch_progress.current
        bp = loop.epoch_loop.batch_progress
        if ep.processed >= ep.started:  # the last started epoch was finished
            return int(ep.processed), 0
        if bp.is_last_batch:
            return int(ep.processed) + 1, 0
        # batches whose training step ran: a checkpoint saved inside a step (an interrupt) has fetched that batch
        # ("ready") without training it, and Lightning runs it again
        return int(ep.processed), int(bp.current.processed)
    except AttributeError:  # a Lightning version with other loop internals: resume at the epoch start
        warnings.warn(
            "resume_position: unknown Lightning loop internals; resuming at the start of the epoch", stacklevel=2
        )
        return int(getattr(trainer, "current_epoch", 0)), 0


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning counts as resumable (it has ``state_dict``/``load_state_dict``, so no "not
    resumable" warning on a mid-epoch restart). The position itself comes from the trainer's restored progress
    (``resume_position``); what is saved here is what the order depends on, checked on load."""

    #: (epoch, batches of it already trained) this loader resumes at, set by the data module from the trainer's
    #: restored progress; the batch count is in batches of the saved run's size (see ``load_state_dict``)
    resume_at: tuple[int, int] | None = None
    #: the restoring trainer's fit loop (set with ``resume_at``): its batch counts are rescaled to a new batch size
    fit_loop: Any = None

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "seed": getattr(s, "seed", None),
            "num_replicas": getattr(s, "num_replicas", None),
            "batch_size": self.batch_size,
        }

    def _count_in_new_batches(self, samples_done: int) -> None:
        """Lightning ends the resumed epoch after ``len(self)`` batches counting those its restored progress says
        were trained, in batches of the saved size: rescale that count, so that the batches still to come (the
        samples after ``samples_done``, in batches of the new size) all run."""
        progress = getattr(getattr(self.fit_loop, "epoch_loop", None), "batch_progress", None)
        if progress is None:
            return
        per_rank = len(self.sampler) if hasattr(self.sampler, "__len__") else None
        if per_rank is None:
            return
        remaining = max(per_rank - samples_done, 0) // self.batch_size  # drop_last, as the loader batches them
        cur = progress.current
        ended_on_batch_end = cur.processed > cur.completed  # Lightning adds that batch to `completed` on restart
        completed = max(len(self) - remaining - int(ended_on_batch_end), 0)
        delta = completed - cur.completed
        for counter in (cur, progress.total):
            counter.completed += delta
            counter.processed = counter.started = counter.ready = counter.completed + int(ended_on_batch_end)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        saved_bs = state.get("batch_size")
        if saved_bs is not None and saved_bs != self.batch_size:
            epoch, done = self.resume_at or (None, 0)
            if done and hasattr(self.sampler, "resume"):
                # the position is `done` batches of the SAVED size: resume after those samples, not done x the new size
                self.sampler.resume(epoch, done * int(saved_bs))
                self._count_in_new_batches(done * int(saved_bs))
            warnings.warn(
                f"resuming with batch_size {self.batch_size} instead of the saved run's {saved_bs}: the rest of the "
                f"epoch starts after the {done * int(saved_bs)} samples already trained, in batches of the new size",
                UserWarning,
                stacklevel=2,
            )
        changed = {k: (v, now.get(k)) for k, v in state.items() if k != "batch_size" and now.get(k) != v}
        if changed:
            warnings.warn(
                f"resuming with a different data order setting {changed} (saved, now): the rest of the epoch will "
                "not be the batches the interrupted run would have seen",
                UserWarning,
                stacklevel=2,
            )
