"""Training losses, outside the model: contrastive (symmetric InfoNCE, gathered across ranks), caption, ITM.

Distributed contrastive loss, and why it needs no extra scaling
-------------------------------------------------------------
Let N be the global batch (all ranks), W the world size and L the loss of ONE process on the concatenated batch:
``L = (sum_i CE_i2t(i) + sum_j CE_t2i(j)) / (2N)``. With ``local_loss=True`` rank r keeps its own rows against all
gathered columns (labels offset by the rows of the ranks before it, as open_clip does) and returns
``L_r = (sum over its rows of both CEs) / (2 N / W)``, so ``mean_r L_r = L``. The embeddings are gathered WITH
gradients; the backward of the all-gather sums, on rank r, the gradients of every rank's loss w.r.t. rank r's rows:
``grad_r = d(sum_r' L_r')/dx_r = W * dL/dx_r``. DDP then averages parameter gradients over ranks, which divides by
W again: the averaged parameter gradient is exactly dL/dtheta, the single-process one. (Parameters used only
locally, like ``logit_scale``, get ``dL_r/ds`` on each rank and average to ``dL/ds`` as well.) ``local_loss=False``
computes the full (N, N) logits on every rank, returns L itself on every rank, and satisfies the same identity.
Dividing by ``N / W`` rather than the local row count keeps this exact when ranks hold different batch sizes.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .runtime import host_reads_unavailable


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(n: int, device: torch.device, world: int) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _pad_rows(x: Tensor, n: int) -> Tensor:
    return x if x.shape[0] == n else torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])


def _all_gather_rows(x: Tensor, sizes: list[int], with_grad: bool) -> Tensor:
    """Concatenate every rank's ``x`` (rows may differ in number: padded for the collective, then cut)."""
    padded = _pad_rows(x, max(sizes))
    if with_grad:
        # Autograd-aware gather: its backward sums each rank's gradient for our rows (reduce-scatter).
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():  # deprecated in favour of a private API in recent torch; still correct
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _check_not_empty(n_images: int, n_texts: int) -> None:
    # every rank sees the same global sizes, so under torch.distributed all raise together (no rank hangs)
    if n_images == 0 or n_texts == 0:
        raise ValueError(
            f"ContrastiveLoss: an empty batch ({n_images} images, {n_texts} texts over all ranks): the loss of no "
            "pairs is undefined (NaN); skip the step instead"
        )


def _check_embeds(image_embeds: Tensor, text_embeds: Tensor) -> None:
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must both be (B, E) with the same shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )


def _check_pos_ids(pos_ids: Tensor | None, batch: int) -> None:
    if pos_ids is None:
        return
    if not isinstance(pos_ids, Tensor) or pos_ids.shape != (batch,) or pos_ids.is_floating_point():
        got = f"{pos_ids.dtype} {tuple(pos_ids.shape)}" if isinstance(pos_ids, Tensor) else type(pos_ids).__name__
        raise ValueError(f"pos_ids must be an integer tensor of shape ({batch},), got {got}")


def _positive_targets(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Soft targets (R, C): uniform over the columns sharing the row's id."""
    pos = (row_ids[:, None] == col_ids[None, :]).float()  # (R, C)
    return pos / pos.sum(dim=1, keepdim=True)


def text_pos_ids(texts: Sequence[str]) -> Tensor:
    """Positive-group ids from caption strings (equal strings -> equal ids), stable across processes (unlike
    ``hash``, which is salted per process), so they stay meaningful when gathered across ranks."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for t in texts],
        dtype=torch.long,
    )


def positive_mask(text_image_index: Tensor, n_images: int, pos_ids: Tensor | None = None) -> Tensor:
    """(n_images, T) bool: text t is a positive of image i when i is its image, or (with ``pos_ids`` (T,)) when
    its id equals the id of one of image i's texts (the same caption string on another image fits it too)."""
    owner = text_image_index[None, :] == torch.arange(n_images, device=text_image_index.device)[:, None]  # (N, T)
    if pos_ids is None:
        return owner
    _, group = torch.unique(pos_ids, return_inverse=True)  # (T,) dense group of every text
    has = torch.zeros(n_images, int(group.max()) + 1, dtype=torch.bool, device=owner.device)
    has[text_image_index, group] = True  # (N, G): image i owns a text of group g
    return has[:, group]


def _check_text_image_index(text_image_index: Tensor, n_images: int, n_texts: int) -> None:
    t = text_image_index
    if not isinstance(t, Tensor) or t.shape != (n_texts,) or t.is_floating_point():
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"text_image_index must be an integer tensor of shape ({n_texts},), got {got}")
    if n_texts and (int(t.min()) < 0 or int(t.max()) >= n_images):
        lo, hi = int(t.min()), int(t.max())
        raise ValueError(f"text_image_index must index the {n_images} images, got values in [{lo}, {hi}]")
    if n_images and int(torch.bincount(t.long(), minlength=n_images).min()) == 0:
        raise ValueError("text_image_index: every image needs at least one text (its image->text target is empty)")


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy.

    ``logit_scale`` multiplies the cosine logits and is used as given (the model exponentiates and clamps it;
    CLIP clamps at 100). ``pos_ids`` (B,) marks positives: samples with equal ids are positives of each other (the
    same caption string, captions of one image) and the targets become uniform over them; ids must be global
    (e.g. dataset image indices or ``text_pos_ids``), since they are compared across ranks. None = the diagonal.

    Several texts per image: pass ``text_embeds`` (T, E) with ``text_image_index`` (T,), the image row of every
    text (each image needs at least one). Image i's positives are its own texts and, with ``pos_ids`` (T,), every
    text whose id equals one of its texts' ids; image->text cross-entropy is averaged over the B images,
    text->image over the T texts, and the loss is their mean (with one text per image, the plain loss).

    Under torch.distributed (``gather=True`` and world size > 1) the embeddings and ``pos_ids`` of all ranks are
    gathered, embeddings with gradients; see the module docstring for the exact gradient identity with DDP.
    ``local_loss=True`` (default) builds (B_local, N) logits per rank instead of (N, N): same gradients, less memory;
    its returned value is the rank's share, whose mean over ranks is the global loss (log with ``sync_dist``).
    """

    def __init__(self, gather: bool = True, local_loss: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.local_loss = local_loss

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        *,
        pos_ids: Tensor | None = None,
        text_image_index: Tensor | None = None,
    ) -> Tensor:
        if text_image_index is not None:
            return self._many_texts(image_embeds, text_embeds, logit_scale, pos_ids, text_image_index)
        _check_embeds(image_embeds, text_embeds)
        b = image_embeds.shape[0]
        _check_pos_ids(pos_ids, b)
        if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        if isinstance(logit_scale, Tensor):
            logit_scale = logit_scale.reshape(())

        rank, world = _world() if self.gather else (0, 1)
        if world > 1:
            sizes = _gather_sizes(b, image_embeds.device, world)
            both = _all_gather_rows(torch.cat([image_embeds, text_embeds], dim=1), sizes, with_grad=True)  # (N, 2E)
            all_img, all_txt = both.chunk(2, dim=1)  # (N, E) each
            all_pos = None if pos_ids is None else _all_gather_rows(pos_ids, sizes, with_grad=False)  # (N,)
            n = sum(sizes)
            offset = sum(sizes[:rank])
        else:
            all_img, all_txt, all_pos, n, offset = image_embeds, text_embeds, pos_ids, b, 0
        _check_not_empty(n, n)

        if world > 1 and self.local_loss:
            rows_img, rows_txt = image_embeds, text_embeds  # (b, E): our rows against all N columns
            rows = torch.arange(offset, offset + b, device=image_embeds.device)
            denom = n / world  # mean over ranks of the returned values = the global loss
        else:
            rows_img, rows_txt = all_img, all_txt  # (N, E)
            rows = torch.arange(n, device=image_embeds.device)
            denom = n
        logits_i2t = logit_scale * rows_img @ all_txt.T  # (R, N)
        logits_t2i = logit_scale * rows_txt @ all_img.T  # (R, N)
        target = rows if all_pos is None else _positive_targets(all_pos[rows], all_pos)  # (R,) or (R, N)
        total = F.cross_entropy(logits_i2t, target, reduction="sum") + F.cross_entropy(
            logits_t2i, target, reduction="sum"
        )
        return total / (2 * denom)

    def _many_texts(
        self, image_embeds: Tensor, text_embeds: Tensor, logit_scale, pos_ids: Tensor | None, text_image_index: Tensor
    ) -> Tensor:
        if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
            raise ValueError(
                "image_embeds (B, E) and text_embeds (T, E) must share E, got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        b, t = image_embeds.shape[0], text_embeds.shape[0]
        _check_text_image_index(text_image_index, b, t)
        _check_pos_ids(pos_ids, t)
        if isinstance(logit_scale, Tensor):
            if logit_scale.numel() != 1:
                raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
            logit_scale = logit_scale.reshape(())
        rank, world = _world() if self.gather else (0, 1)
        if world > 1:
            sizes_i = _gather_sizes(b, image_embeds.device, world)
            sizes_t = _gather_sizes(t, image_embeds.device, world)
            off_i, off_t = sum(sizes_i[:rank]), sum(sizes_t[:rank])
            all_img = _all_gather_rows(image_embeds, sizes_i, with_grad=True)  # (N_i, E)
            all_txt = _all_gather_rows(text_embeds, sizes_t, with_grad=True)  # (N_t, E)
            owner = _all_gather_rows(text_image_index.long() + off_i, sizes_t, with_grad=False)  # global image rows
            all_pos = None if pos_ids is None else _all_gather_rows(pos_ids, sizes_t, with_grad=False)
            n_i, n_t = sum(sizes_i), sum(sizes_t)
        else:
            all_img, all_txt, owner, all_pos, n_i, n_t = (
                image_embeds,
                text_embeds,
                text_image_index.long(),
                pos_ids,
                b,
                t,
            )
            off_i = off_t = 0
        _check_not_empty(n_i, n_t)
        pos = positive_mask(owner, n_i, all_pos).float()  # (N_i, N_t)
        if world > 1 and self.local_loss:
            img_rows, txt_rows = image_embeds, text_embeds
            rows_i = slice(off_i, off_i + b)
            rows_t = slice(off_t, off_t + t)
            den_i, den_t = n_i / world, n_t / world
        else:
            img_rows, txt_rows, rows_i, rows_t, den_i, den_t = all_img, all_txt, slice(None), slice(None), n_i, n_t
        logits_i2t = logit_scale * img_rows @ all_txt.T  # (R_i, N_t)
        logits_t2i = logit_scale * txt_rows @ all_img.T  # (R_t, N_i)
        tgt_i2t = pos[rows_i]
        tgt_t2i = pos.T[rows_t]
        i2t = F.cross_entropy(logits_i2t, tgt_i2t / tgt_i2t.sum(1, keepdim=True), reduction="sum")
        t2i = F.cross_entropy(logits_t2i, tgt_t2i / tgt_t2i.sum(1, keepdim=True), reduction="sum")
        return (i2t / den_i + t2i / den_t) / 2


class CaptionLoss(nn.Module):
    """Token cross-entropy of caption logits, pad positions ignored, mean over non-pad tokens.

    Inputs are already aligned: the model reads ``ids[:, :-1]`` and predicts ``labels = ids[:, 1:]``. A batch with
    no non-pad label returns 0 (with a gradient path) instead of NaN.

    Ignored labels: ``pad_id`` and also ``-100`` (:data:`IGNORE_INDEX`, the ignore convention of PyTorch's
    ``cross_entropy`` and Hugging Face), so labels prepared either way work. ``pad_id`` must be an id of the
    vocabulary (``0 <= pad_id < V``, V = ``logits.shape[-1]``); every other label must lie in ``[0, V)``, else a
    ``ValueError`` names it (one host read per call, skipped under torch.compile and CUDA graph capture, and with
    ``check_labels=False``, as the training module builds it: the model's forward has checked the ids the labels
    are cut from, and a second host sync per step would stall a GPU).
    """

    IGNORE_INDEX = -100

    def __init__(self, pad_id: int, label_smoothing: float = 0.0, check_labels: bool = True) -> None:
        super().__init__()
        if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral):
            raise TypeError(f"pad_id must be an int (the vocabulary's pad token id), got {type(pad_id).__name__}")
        if pad_id < 0:
            raise ValueError(
                f"pad_id must be >= 0 (a token id of the vocabulary; -100 labels are ignored anyway), got {pad_id}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.pad_id = int(pad_id)
        self.label_smoothing = label_smoothing
        self.check_labels = bool(check_labels)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
            raise ValueError(
                f"logits must be (B, T, V) and labels (B, T) with the same B, T; got logits {tuple(logits.shape)} "
                f"and labels {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
        V = logits.shape[-1]
        if self.pad_id >= V:
            raise ValueError(
                f"pad_id={self.pad_id} is outside the vocabulary of the logits [0, {V}): no label would be ignored"
            )
        ignored = (labels == self.pad_id) | (labels == self.IGNORE_INDEX)  # (B, T)
        if self.check_labels and labels.numel() and not host_reads_unavailable(labels):
            # one fused read: min and max of the labels that count (an id out of range is a device assert on CUDA)
            lo, hi = torch.stack(torch.aminmax(labels.masked_fill(ignored, self.pad_id))).tolist()
            if lo < 0 or hi >= V:
                bad = labels[~ignored & ((labels < 0) | (labels >= V))]
                raise ValueError(
                    f"labels must be token ids in [0, {V}) or ignored (pad_id={self.pad_id} or "
                    f"{self.IGNORE_INDEX}); got {int(bad[0])} ({bad.numel()} label(s) out of range, min {lo}, max {hi})"
                )
        total = F.cross_entropy(
            logits.flatten(0, 1),  # (B*T, V)
            labels.masked_fill(ignored, self.IGNORE_INDEX).flatten(),  # (B*T,)
            ignore_index=self.IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        count = (~ignored).sum().clamp_min(1)  # no host sync
        return total / count


class AttentionEntropyLoss(nn.Module):
    """Sharp AND image-dependent attention: the mean entropy of each query's attention minus ``diversity`` times
    the entropy of the batch's average attention (an estimate of minus the mutual information between the place
    looked at and the query, image included, for ``diversity=1``).

    Each map ``(B, nh, Lq, S)`` (post-softmax weights, e.g. recorded by
    ``capture_attention(model, "decoder.blocks.*.cross_attn", keep_grad=True)``) is averaged over heads first, so the
    penalty is on the map a reader of the model sees (and :mod:`mmxattn.metrics`' grounding scores). Entropies are
    divided by ``log S`` (1 = uniform over the keys, 0 = one key). Per map: ``H_q`` = the mean entropy of the queries
    that ``query_mask`` (B, Lq) keeps, ``H_m`` = the entropy of their average distribution; the loss is the mean over
    maps of ``H_q - diversity * H_m``, in ``[-diversity, 1]``.

    Motivation (a hypothesis the measurements below did not bear out on the shapes data): a caption decoder
    reading CAT tokens can predict a word from the image's average (every token of a
    cross-patch-attention encoder carries some of the whole image) instead of from the object the word is about;
    its cross-attention for such words is then nearly flat and says nothing about where the word is. Penalising
    ``H_q`` alone makes the attention sharp but lets it collapse onto one fixed token that the encoder turns into a
    store of the whole image (measured: every word of every image peaked on the same cell; the "artifact tokens" of
    Darcet et al. 2024, "Vision Transformers Need Registers"). Rewarding ``H_m`` forbids that: places looked at must
    vary with the image, as objects do. The pair is the information-maximisation objective of clustering (Ji et al.
    2019, IIC) and the diversity term of wav2vec 2.0's codebook (Baevski et al. 2020), applied to attention.

    Measured (eighth session, ``tests/fixtures/make_tiny_checkpoint.py --attn-entropy W``, 3000 steps of
    ``mmx_tiny``; without the term: i2t R@1 0.19, CIDEr 0.96, grounding accuracy 0.43): ``diversity=0``, W 0.3 / 1.0:
    0.04 / 0.04, 0.51 / 0.45, 0.02 / 0.20, every word peaking on one fixed cell; ``diversity=1``, W 0.3 / 1.0: 0.17 /
    0.05, 0.73 / 0.45, 0.28 / 0.20. It does not help on the shapes data, where the shape words' failure is upstream:
    a linear probe finds no shape information in the tokens at the objects (``benchmarks/grounding_probe.py``), so
    there is nothing there to look at. It is off by default (``MMXAttnModule(attn_entropy_weight=0)``) and kept as
    a tested tool for data where the information is in place but the attention is diffuse.
    """

    def __init__(self, diversity: float = 1.0) -> None:
        super().__init__()
        if diversity < 0:
            raise ValueError(f"diversity must be >= 0, got {diversity}")
        self.diversity = diversity

    def forward(self, maps: Sequence[Tensor], query_mask: Tensor | None = None) -> Tensor:
        if not maps:
            raise ValueError("AttentionEntropyLoss: no attention maps (was the model run inside capture_attention?)")
        total = None
        for w in maps:
            if w.dim() != 4:
                raise ValueError(f"attention maps must be (B, heads, queries, keys), got {tuple(w.shape)}")
            S = w.shape[-1]
            if S < 2:
                raise ValueError(f"attention over {S} key has no entropy to penalise")
            p = w.float().mean(1)  # (B, Lq, S)
            if query_mask is not None:
                if query_mask.shape != p.shape[:2]:
                    raise ValueError(f"query_mask must be {tuple(p.shape[:2])}, got {tuple(query_mask.shape)}")
                m = query_mask.to(p.dtype)[..., None]  # (B, Lq, 1)
            else:
                m = torch.ones_like(p[..., :1])
            n = m.sum().clamp_min(1)
            h_q = -(p * p.clamp_min(1e-12).log()).sum(-1, keepdim=True)  # (B, Lq, 1)
            term = (h_q * m).sum() / n
            if self.diversity:
                avg = (p * m).sum((0, 1)) / n  # (S,)
                term = term + self.diversity * (avg * avg.clamp_min(1e-12).log()).sum()
            term = term / math.log(S)
            total = term if total is None else total + term
        return total / len(maps)


class ITMLoss(nn.Module):
    """Image-text matching: 2-way cross-entropy on logits (N, 2); labels (N,) are 1 for a matching pair, else 0."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"ITM logits must be (N, 2) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        return F.cross_entropy(logits, labels.long())


class WordPresenceLoss(nn.Module):
    """Multiple-instance word detection on image tokens: every token scores every vocabulary word, an image's
    score for a word is its best token's (the maximum over tokens), and binary cross-entropy compares it with
    whether any of the image's captions holds the word. The image-level label says a word is somewhere; the
    maximum lets one token take it. This is the multiple-instance view of word detection of Fang et al. 2015
    ("From captions to visual concepts and back", noisy-OR over image regions), with a maximum for noisy-OR.

    Why a maximum: on the shapes data a transformer encoder read by averaging (mean pooling, attention pooling,
    the decoder's cross-attention early in training) did not learn object shape in hundreds to thousands of steps,
    while the same encoder read by a maximum over its tokens learnt it in about 200 (docs/benchmarks.md, "What the
    shapes models know"). Tokens are scored before they are pooled, so the loss needs the word head itself.

    Args:
        ignore_ids: token ids that are never targets (pad, bos, eos, unk).
        max_words: above this vocabulary size only ``max_words`` columns are scored per batch: every word present
            in the batch, then words drawn at random as negatives (a large vocabulary's (B, L, V) logits would
            not fit in memory). ``None``: always every column.
    """

    def __init__(self, ignore_ids: Sequence[int] = (), max_words: int | None = 4096) -> None:
        super().__init__()
        if max_words is not None and max_words < 1:
            raise ValueError(f"max_words must be >= 1 or None, got {max_words}")
        self.ignore_ids = tuple(int(i) for i in ignore_ids)
        self.max_words = max_words

    @staticmethod
    def present(ids: Tensor, n_images: int, vocab_size: int, text_image_index: Tensor | None = None) -> Tensor:
        """(n_images, vocab_size) bool: word v is in some caption of image i. ``ids`` (R, T) token rows and
        ``text_image_index`` (R,), the image of each row (None: row i is image i)."""
        rows = torch.arange(ids.shape[0], device=ids.device) if text_image_index is None else text_image_index
        out = torch.zeros(n_images, vocab_size, dtype=torch.bool, device=ids.device)
        out[rows[:, None].expand_as(ids), ids] = True
        return out

    def columns(self, present: Tensor) -> Tensor:
        """Vocabulary ids scored this batch: all but ``ignore_ids``; past ``max_words``, every id present in the
        batch and then random others up to ``max_words``."""
        v = present.shape[1]
        keep = torch.ones(v, dtype=torch.bool, device=present.device)
        keep[[i for i in self.ignore_ids if 0 <= i < v]] = False
        if self.max_words is None or int(keep.sum()) <= self.max_words:
            return keep.nonzero().flatten()
        seen = present.any(0) & keep
        rest = (keep & ~seen).nonzero().flatten()
        n_more = max(0, self.max_words - int(seen.sum()))
        more = rest[torch.randperm(rest.numel(), device=rest.device)[:n_more]]
        return torch.cat([seen.nonzero().flatten(), more]).sort().values

    def forward(
        self, image_tokens: Tensor, head: nn.Linear, ids: Tensor, text_image_index: Tensor | None = None
    ) -> Tensor:
        """``image_tokens`` (B, L, D), ``head`` the word head (D -> V), ``ids`` (R, T) caption token rows,
        ``text_image_index`` (R,) the image of each row (None: one row per image)."""
        if image_tokens.dim() != 3:
            raise ValueError(f"image_tokens must be (B, L, D), got {tuple(image_tokens.shape)}")
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"ids must be an integer (R, T) tensor, got {ids.dtype} {tuple(ids.shape)}")
        b = image_tokens.shape[0]
        if text_image_index is None and ids.shape[0] != b:
            raise ValueError(f"{ids.shape[0]} caption rows for {b} images and no text_image_index")
        present = self.present(ids, b, head.out_features, text_image_index)
        cols = self.columns(present)
        bias = None if head.bias is None else head.bias[cols]
        logits = F.linear(image_tokens, head.weight[cols], bias)  # (B, L, K)
        scores = logits.amax(1).float()  # (B, K): each word's best token
        return F.binary_cross_entropy_with_logits(scores, present[:, cols].float())


class WordAttentionLoss(nn.Module):
    """The decoder's cross-attention distilled from the word head's maps: the query that predicts word ``w``
    should look where the word head sees ``w`` (no boxes; the word head learns its maps from which words an
    image's captions say, :class:`WordPresenceLoss`).

    For query ``t`` of caption row ``r`` (which predicts ``targets[r, t]``) let ``p`` (L,) be the word head's map of
    that word over the image tokens the decoder reads and ``a`` the query's attention (mean over heads and the given
    layers: the map :mod:`mmxattn.metrics`' grounding scores). ``objective="map"``: the KL divergence from the
    target ``p`` less its mean, clipped at 0 (where the word is more likely than on average) and normalised, to
    ``a``. ``objective="evidence"``: ``-log sum_i a_i p_i``, minus the log of the word's probability where the query
    looks; its gradient moves ``a`` towards ``a * p`` renormalised, so the query keeps what its context chose
    and sharpens it onto where the word is. Each query is weighted by ``max p - mean p``: near 0 for words the head
    sees everywhere ("a", "the") or nowhere, near 1 for a word it finds at one place; the loss is the weighted mean
    over every query of the batch.

    It is the distillation of a captioner's word-to-region attention from a weakly supervised word-region model
    of Zhou et al. 2020 ("More Grounded Image Captioning by Distilling Image-Text Matching Model"), with the
    word head's multiple-instance maps as the teacher. Why here: on the shapes data the word head's own maps peak
    on the named object more often than the decoder's attention does. Measured in the main job (docs/benchmarks.md,
    "What the shapes models know"): with ``objective="map"`` at weight 1 every retrieval metric and CIDEr rose on three
    seeds (means: i2t R@1 0.37 -> 0.41, CIDEr 1.76 -> 1.89) while grounding hardly moved (0.50 -> 0.52): the
    query that predicts a phrase's first word cannot know which object the reference names.

    ``phrase_ids``: the ids of the words that make up object phrases (e.g. sizes, colours, shape names). A run of
    consecutive such targets is one phrase, and each of its queries is taught the PRODUCT of the maps of all the
    phrase's words ("red" x "circle": the red circle, where "circle" alone lights up every circle); its weight
    stays its own word's. On the main job's model the product peaks on the named object for 0.77 of the object
    words, the single word's map for 0.63 (docs/benchmarks.md, "What the shapes models know").

    Args:
        ignore_ids: target ids that never count (pad, bos, eos).
        objective: "map" or "evidence" (above).
        phrase_ids: words whose runs are phrases taught their product map (empty: every word its own map).
    """

    def __init__(self, ignore_ids: Sequence[int] = (), objective: str = "map", phrase_ids: Sequence[int] = ()) -> None:
        super().__init__()
        if objective not in ("map", "evidence"):
            raise ValueError(f"objective must be 'map' or 'evidence', got {objective!r}")
        self.ignore_ids = tuple(int(i) for i in ignore_ids)
        self.objective = objective
        self.phrase_ids = tuple(int(i) for i in phrase_ids)

    def forward(
        self,
        maps: Sequence[Tensor],
        word_probs: Tensor,
        targets: Tensor,
        text_image_index: Tensor | None = None,
    ) -> Tensor:
        """``maps``: post-softmax cross-attention weights ``(R, nh, Tq, L)`` with their graph (e.g. recorded by
        ``capture_attention(model, "decoder.blocks.*.cross_attn", keep_grad=True)``), ``Tq >= T``; ``word_probs``
        (B, L, V) the word head's probabilities at the same image tokens (``MMXAttnOutput.word_probs``);
        ``targets`` (R, T) the token each query predicts; ``text_image_index`` (R,) the image of each row (None:
        row i is image i)."""
        if not maps:
            raise ValueError("WordAttentionLoss: no attention maps (was the model run inside capture_attention?)")
        if word_probs.dim() != 3:
            raise ValueError(f"word_probs must be (B, L, V), got {tuple(word_probs.shape)}")
        if targets.dim() != 2 or targets.is_floating_point():
            raise ValueError(f"targets must be an integer (R, T) tensor, got {targets.dtype} {tuple(targets.shape)}")
        R, T = targets.shape
        B, L, V = word_probs.shape
        for w in maps:
            if w.dim() != 4 or w.shape[0] != R or w.shape[2] < T or w.shape[3] != L:
                raise ValueError(
                    f"attention maps must be ({R}, heads, >= {T}, {L}) (rows, heads, queries, image tokens), got "
                    f"{tuple(w.shape)}"
                )
        if text_image_index is None:
            if R != B:
                raise ValueError(f"{R} caption rows for {B} images and no text_image_index")
            text_image_index = torch.arange(R, device=targets.device)
        att = torch.stack([w[:, :, :T].float().mean(1) for w in maps]).mean(0)  # (R, T, L)
        # (R, T, L): the map of the word each query predicts (no (R, L, V) copy for a large vocabulary)
        p = word_probs.detach().float()[text_image_index[:, None].expand(R, T), :, targets.clamp(0, V - 1)]
        excess = (p - p.mean(-1, keepdim=True)).clamp_min(0)
        weight = excess.amax(-1)  # (R, T): max p - mean p
        for i in self.ignore_ids:
            weight = weight.masked_fill(targets == i, 0.0)
        if self.phrase_ids:
            p = phrase_maps(p, targets, self.phrase_ids)
            excess = (p - p.mean(-1, keepdim=True)).clamp_min(0)
        if self.objective == "evidence":
            # -log of the word's expected probability where the query looks: d/dz_i = a_i - a_i p_i / sum(a p)
            term = -(att * p).sum(-1).clamp_min(1e-12).log()  # (R, T)
        else:
            q = excess / excess.sum(-1, keepdim=True).clamp_min(1e-12)
            term = (q * (q.clamp_min(1e-12).log() - att.clamp_min(1e-12).log())).sum(-1)  # (R, T)
        return (weight * term).sum() / weight.sum().clamp_min(1e-12)


def phrase_maps(maps: Tensor, targets: Tensor, phrase_ids: Sequence[int]) -> Tensor:
    """``maps`` (R, T, L) of the words ``targets`` (R, T), with every maximal run of consecutive targets in
    ``phrase_ids`` given the product of its words' maps (the same product at each of its positions); other
    positions keep their own map."""
    R, T, L = maps.shape
    inside = torch.isin(targets, torch.as_tensor(list(phrase_ids), device=targets.device, dtype=targets.dtype))
    start = inside & ~F.pad(inside[:, :-1], (1, 0), value=False)
    run = (start.long().cumsum(1) * inside)[..., None].expand(R, T, L)  # 1, 2, ... per run; 0 outside
    logs = maps.clamp_min(1e-12).log() * inside[..., None]
    sums = maps.new_zeros(R, T + 1, L).scatter_add_(1, run, logs)
    return torch.where(inside[..., None], sums.gather(1, run).exp(), maps)


@torch.no_grad()
def sample_hard_negatives(
    sim: Tensor,
    generator: torch.Generator | None = None,
    pos_ids: Tensor | None = None,
    pos_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """In-batch hard negatives for ITM (ALBEF/BLIP scheme): for each image a text drawn with probability
    softmax(sim[i]) over its non-positives, and for each text an image drawn from softmax(sim[:, j]).

    ``sim`` (B, B) holds image-text similarities, temperature included (e.g. the contrastive logits). Positives are
    the diagonal and, with ``pos_ids`` (B,), every pair with equal ids, and with ``pos_mask`` (B, B) bool, every
    pair (image row i, text column j) it marks; they are never drawn. A row with no negative at all (B == 1, or
    all ids equal) gets -1: callers drop those pairs rather than train on a false negative. Returns (negative text
    index per image (B,), negative image index per text (B,)).
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (B, B) similarity matrix, got shape {tuple(sim.shape)}")
    b = sim.shape[0]
    _check_pos_ids(pos_ids, b)
    pos = torch.eye(b, dtype=torch.bool, device=sim.device)  # (B, B)
    if pos_ids is not None:
        pos |= pos_ids[:, None] == pos_ids[None, :]
    if pos_mask is not None:
        if pos_mask.shape != (b, b) or pos_mask.dtype != torch.bool:
            raise ValueError(f"pos_mask must be a ({b}, {b}) bool tensor, got {pos_mask.dtype} {tuple(pos_mask.shape)}")
        pos |= pos_mask

    def draw(s: Tensor, p: Tensor) -> Tensor:
        valid = ~p.all(dim=1)  # rows with at least one negative
        w = s.float().masked_fill(p, float("-inf")).softmax(dim=1)  # (B, B); all-positive rows are NaN
        w = torch.where(valid[:, None], w, torch.ones_like(w))  # placeholder weights, result replaced below
        # a diverged forward (non-finite similarities): draw uniformly among the negatives instead of failing in
        # multinomial; the loss is non-finite anyway and the caller's non-finite policy acts on it (no host sync)
        w = torch.where(torch.isfinite(w).all(dim=1, keepdim=True), w, (~p).float() + (~valid[:, None]).float())
        idx = torch.multinomial(w, 1, generator=generator).squeeze(1)  # (B,)
        return idx.masked_fill(~valid, -1)

    return draw(sim, pos), draw(sim.T, pos.T)


class MMXAttnLoss(nn.Module):
    """Weighted sum of the contrastive, caption and (optional) ITM losses; returns a dict with the total under
    "loss" and each unweighted term under its name, ready for logging. Weights follow CoCa's open_clip recipe
    (contrastive 1, caption 2)."""

    def __init__(
        self,
        pad_id: int,
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        itm_weight: float = 1.0,
        label_smoothing: float = 0.0,
        gather: bool = True,
        local_loss: bool = True,
    ) -> None:
        super().__init__()
        self.contrastive = ContrastiveLoss(gather=gather, local_loss=local_loss)
        self.caption = CaptionLoss(pad_id, label_smoothing=label_smoothing)
        self.itm = ITMLoss()
        self.weights = {"contrastive_loss": contrastive_weight, "caption_loss": caption_weight, "itm_loss": itm_weight}

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        logits: Tensor,
        labels: Tensor,
        *,
        pos_ids: Tensor | None = None,
        itm_logits: Tensor | None = None,
        itm_labels: Tensor | None = None,
        text_image_index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        terms = {}
        if self.weights["contrastive_loss"]:
            terms["contrastive_loss"] = self.contrastive(
                image_embeds, text_embeds, logit_scale, pos_ids=pos_ids, text_image_index=text_image_index
            )
        if self.weights["caption_loss"]:
            terms["caption_loss"] = self.caption(logits, labels)
        if itm_logits is not None and self.weights["itm_loss"]:
            if itm_labels is None:
                raise ValueError("itm_labels must be given with itm_logits")
            terms["itm_loss"] = self.itm(itm_logits, itm_labels)
        if not terms:
            raise ValueError("every loss weight is zero (or ITM inputs are missing): nothing to optimise")
        terms["loss"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms
