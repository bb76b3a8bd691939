"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
the contrastive loss of a whole batch, with the activation memory of one chunk of it.

The training module (``MMXAttnModule(grad_cache_chunk_size=C)``) runs a batch of B images in three passes:

1. every chunk of C images (with their captions) through the two towers without a graph: the batch's image and
   text embeddings, each chunk drawing from a random stream of its own;
2. the contrastive loss of the whole batch on those embeddings (leaf tensors), and its gradient with respect to
   every embedding and to the temperature;
3. every chunk again, with a graph and its stream from the start (the same drop-path masks), backward of the
   chunk's other losses plus ``<embedding, cached gradient>``: by the chain rule, the sum over the chunks is the
   whole-batch contrastive gradient, and only one chunk's activations are alive at a time.

This module holds the pieces that do not need the Lightning module: splitting a batch, the chunks' random streams,
the BatchNorm statistics the graph-free pass must not update.
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
    if tii is not None and (tii.shape != (ids.shape[0],) or tii.is_floating_point()):
        raise ValueError(
            f"text_image_index must be an integer tensor of shape ({ids.shape[0]},) (one image index per token row), "
            f"got {tii.dtype} {tuple(tii.shape)}"
        )
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
    if tii is not None and sum(c.rows.numel() for c in chunks) != ids.shape[0]:  # a caption of no image
        raise ValueError(f"text_image_index values must index the {n} images")
    return chunks


def label_count(ids: Tensor, pad_id: int) -> int:
    """How many caption labels of ``ids`` (B, T) the caption loss averages over (``ids[:, 1:]`` not pad nor -100)."""
    labels = ids[:, 1:]
    return int(((labels != pad_id) & (labels != -100)).sum())


class ChunkStreams:
    """One random stream per chunk, so that a chunk's graph pass draws the same dropout / drop-path masks as its
    graph-free pass, and its later draws (the decoder's dropout, the ITM term's hard negatives, the word loss's
    sampling) come from its own stream, not from numbers another chunk's masks use.

    Seeds are drawn from the global CPU generator (so a seeded run stays reproducible and a resumed one replays);
    :meth:`enter` seeds the CPU generator and, on a CUDA device, that device's generator; :meth:`leave` puts both
    back to where they were after the seeds were drawn."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.device = device
        self.seeds = torch.randint(0, 2**62, (n,)).tolist()
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def enter(self, n: int) -> None:
        torch.default_generator.manual_seed(self.seeds[n])
        if self.cuda is not None:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(self.seeds[n])

    def leave(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def batchnorm_buffers(module: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, copy) of every buffer of the BatchNorm layers in ``module`` (running statistics, batch count)."""
    return [
        (b, b.detach().clone())
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for b in m.buffers()
    ]
