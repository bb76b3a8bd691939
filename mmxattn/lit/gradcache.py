"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
the contrastive loss of a whole batch, with the activation memory of one chunk of it.

The training module (``MMXAttnModule(grad_cache_chunk_size=C)``) runs a batch of B images in three passes:

1. every chunk of C images (with their captions) through the two towers without a graph: the batch's image and
   text embeddings, each chunk's random-number state noted first;
2. the contrastive loss of the whole batch on those embeddings (leaf tensors), and its gradient with respect to
   every embedding and to the temperature;
3. every chunk again, with a graph and the same random numbers (drop-path masks), backward of the chunk's other
   losses plus ``<embedding, cached gradient>``: by the chain rule, the sum over the chunks is the whole-batch
   contrastive gradient, and only one chunk's activations are alive at a time.

This module holds the pieces that do not need the Lightning module: splitting a batch and the random-number state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Chunk:
    """Images ``start:stop`` of a batch with their captions: ``batch`` has the keys the losses read (captions'
    ``text_image_index`` re-based to the chunk's images), ``rows`` the captions' rows in the whole batch."""

    batch: dict[str, Any]
    rows: Tensor
    start: int
    stop: int


def split_batch(batch: dict[str, Any], chunk_size: int) -> list[Chunk]:
    """The chunks of at most ``chunk_size`` images (in order) of a training batch, each with its own captions: one
    per image, or with ``text_image_index`` (several captions per image) every caption of the chunk's images."""
    images, ids = batch["images"], batch["ids"]
    tii, pos_ids = batch.get("text_image_index"), batch.get("pos_ids")
    n = images.shape[0]
    if tii is None and ids.shape[0] != n:
        raise ValueError(f"batch sizes differ: {n} images, {ids.shape[0]} token rows")
    chunks = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if tii is None:
            rows = torch.arange(start, stop, device=ids.device)
        else:
            rows = ((tii >= start) & (tii < stop)).nonzero().flatten()
        part: dict[str, Any] = {"images": images[start:stop], "ids": ids[rows]}
        if tii is not None:
            part["text_image_index"] = tii[rows] - start
        if pos_ids is not None:
            part["pos_ids"] = pos_ids[rows]
        chunks.append(Chunk(part, rows, start, stop))
    return chunks


def label_count(ids: Tensor, pad_id: int) -> int:
    """How many caption labels of ``ids`` (B, T) the caption loss averages over (``ids[:, 1:]`` not pad nor -100)."""
    labels = ids[:, 1:]
    return int(((labels != pad_id) & (labels != -100)).sum())


class RNGState:
    """The CPU generator's state and, on a CUDA device, that device's: what dropout and drop-path masks draw from."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
