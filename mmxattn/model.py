"""MMXAttn: a CAT image encoder whose stage tokens are read by text-query cross-attention.

One model, two tasks (CoCa's recipe, Yu et al. 2022, with the decoder reading image *positions*):

* retrieval: ``encode_image`` (1-query attentional pooler over the image tokens) and ``encode_text`` (CLS of a
  causal text encoder), cosine similarity; optionally re-ranked by the decoder (:meth:`MMXAttn.retrieve`);
* captioning: a multimodal decoder (causal self-attention -> cross-attention over every image token -> MLP) on top
  of the text encoder's token states; :meth:`generate` decodes with a KV cache.

The model knows nothing of Lightning; losses live in :mod:`mmxattn.losses`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MMXAttnConfig
from .runtime import host_reads_unavailable, user_stacklevel
from .text.towers import AttentionalPooler, DecodingCache, ImageTokenProjector, MultimodalDecoder, TextEncoder
from .vision.windows import InferenceLinear, use_inference_linears

__all__ = ["MMXAttn", "MMXAttnOutput", "RetrievalResult", "RERANK_METHODS"]

# Decoder re-ranking scores: the matching head, the caption's per-token log-likelihood, or (for captions ranked
# for an image) its pointwise mutual information with the image, log p(c | I) - log p(c).
RERANK_METHODS = ("itm", "lm", "pmi")


@dataclass
class MMXAttnOutput:
    image_embeds: Tensor  # (B, E), L2-normalised
    text_embeds: Tensor  # (B, E), L2-normalised; (R, E) with several captions per image (text_image_index)
    logits: Tensor  # (B or R, T-1, V): position t predicts token t+1
    logit_scale: Tensor  # scalar, exp(learned) clamped to max_logit_scale
    image_tokens: Tensor | None = None  # (B, L, D), for the ITM head and re-ranking
    text_states: Tensor | None = None  # (B or R, T, W), text encoder token states
    decoder_states: Tensor | None = None  # (B or R, T, W), decoder output over the whole caption (ITM reads it)
    # (B, L', D'), what the word head reads (MMXAttn.encode_word_tokens); None without a word head
    word_tokens: Tensor | None = None
    # (B, L, V), detached: the word head's probability of every word at every image token (the tokens the decoder
    # reads; a word_head_stage's maps are pooled onto them), when word_context computed them; else None
    # (MMXAttn.word_probs_per_image_token computes them)
    word_probs: Tensor | None = None


@dataclass
class RetrievalResult:
    """Top-k rankings. ``i2t_indices[i]`` are text indices for image i, best first, with their ``i2t_scores``;
    ``t2i_*`` likewise image indices for text j. Both directions by default; the fields of a direction that
    ``MMXAttn.retrieve(direction=...)`` was not asked for are None."""

    i2t_indices: Tensor | None  # (N_img, k)
    i2t_scores: Tensor | None
    t2i_indices: Tensor | None  # (N_txt, k)
    t2i_scores: Tensor | None


# Float pixels beyond +-this are taken for un-normalised ones (0..255 values): normalised pixels of any usual
# mean/std (ImageNet's, CLIP's, 0.5/0.5) lie within about [-3, 3].
MAX_NORMALISED_PIXEL = 20.0

# What MMXAttn.retrieve ranks: texts for every image and images for every text, or one of the two.
RETRIEVE_DIRECTIONS = ("both", "i2t", "t2i")


def _one_image(x: Any) -> bool:
    """Whether ``x`` is one image (or a batched tensor) rather than a collection of them: lists, tuples and other
    iterables (a generator over a folder's files) are collections; arrays, tensors, paths, bytes and PIL images,
    which may be iterable too, are not."""
    import numpy as np
    from PIL import Image

    if isinstance(x, (Tensor, str, bytes, os.PathLike, np.ndarray, Image.Image, dict)):
        return True
    return not isinstance(x, Iterable)


def _gallery_parts(images: Any, batch_size: int) -> Iterator[tuple[Any, int]]:
    """``images`` (anything :meth:`MMXAttn.preprocess` takes) cut into ``(part, first)`` of ``batch_size`` images
    each (the last may hold fewer), in order, with ``first`` the place in ``images`` of ``part[0]`` (what errors
    name). A (B, 3, H, W) tensor, alone or as an item of a list, is sliced where it straddles two parts. An
    iterable other than a list (a generator) is read as the parts are asked for."""
    if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] > 0:
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size], start
        return
    if _one_image(images) or (isinstance(images, (list, tuple)) and not images):
        yield images, 0  # one image, or what preprocess names as an error (an empty list, an empty batch)
        return
    part: list[Any] = []
    first = have = 0  # part[0] is images[first]; part holds `have` images
    seen = False
    for i, item in enumerate(images):
        seen = True
        n = item.shape[0] if isinstance(item, Tensor) and item.dim() == 4 else 1
        start = 0
        while True:
            if not part:
                first = i
            take = min(n - start, batch_size - have)
            part.append(item if take == n else item[start : start + take])
            have, start = have + take, start + take
            if have == batch_size:
                yield part, first
                part, have = [], 0
            if start >= n:
                break
    if part:
        yield part, first
    elif not seen:
        yield [], 0  # an empty iterable: preprocess names it


class _RunningTopK:
    """Each query's top ``n`` gallery items, best first, over score blocks that arrive one batch of gallery items
    at a time: ``values`` and gallery ``indices`` (Q, <= n), as one ``topk`` over the whole (Q, N) score matrix
    gives them while holding (Q, n) and a slice of queries' (q, n + b) at a time. Exactly equal scores keep gallery order (the lower index first)
    however the blocks fall (a duplicate image's score can still differ by a rounding step between batch sizes, as
    the matrix product that makes it rounds by shape); NaN ranks first, as in ``topk``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.values: Tensor | None = None  # (Q, <= n)
        self.indices: Tensor | None = None  # (Q, <= n)

    def add(self, first: int, scores: Tensor) -> None:
        """Gallery items ``first, first + 1, ...``: their scores (b, Q) against every query."""
        b = scores.shape[0]
        # Queries a slice at a time, so that the copies below stay ~1M entries each. Ties: a stable sort (topk
        # keeps no order among equal values) of the kept entries (lower indices, ties already in order) followed
        # by the block's, so equal scores stay in gallery order. Once n are kept, only block entries above a
        # query's n-th best can enter (an equal one would rank after it): each slice sorts its kept entries with
        # the block's best m in gallery order, m the most any of its queries has above its n-th best (most blocks
        # of a large gallery have few), instead of all b.
        rows = max(1, _MERGE_ENTRIES // (self.n + b))
        full = self.values is not None and self.values.shape[1] == self.n
        values, indices = [], []
        for r in range(0, scores.shape[1], rows):
            v = scores[:, r : r + rows].T  # (q, b)
            if full:
                kept_v, kept_i = self.values[r : r + rows], self.indices[r : r + rows]
                nth = kept_v[:, -1:]
                enter = (v > nth) | (v.isnan() & ~nth.isnan())  # NaN ranks first, as in topk
                m = int(enter.sum(1).max())
                if m == 0:
                    values.append(kept_v)
                    indices.append(kept_i)
                    continue
                places = v.topk(m, dim=1).indices.sort(dim=1).values  # every entering entry, in gallery order
                v = torch.cat([kept_v, v.gather(1, places)], 1)
                i = torch.cat([kept_i, places + first], 1)
            else:
                i = torch.arange(first, first + b, device=scores.device).expand_as(v)
                if self.values is not None:
                    v, i = torch.cat([self.values[r : r + rows], v], 1), torch.cat([self.indices[r : r + rows], i], 1)
            v, where = v.sort(dim=1, descending=True, stable=True)
            values.append(v[:, : self.n].clone())  # not a view: the slice's whole sorted copy would stay
            indices.append(i.gather(1, where[:, : self.n]))
        self.values, self.indices = torch.cat(values), torch.cat(indices)


# Entries (queries x (n + b)) that _RunningTopK sorts at once.
_MERGE_ENTRIES = 1 << 20


class _CandidateTokens:
    """The image tokens of those gallery images that may still be among some text's top ``m`` by the scores seen
    so far, kept while the gallery streams past one batch at a time: re-ranking images for texts reads no others.
    An image is dropped once each text has ``m`` images scoring above it; ties and NaN (which ``topk`` ranks
    first) are kept, so every image of the final top ``m`` (``self.top``, each text's running top ``m``) is here
    (at most ``m`` per text, plus ties, plus one batch, are held at any time)."""

    def __init__(self, m: int) -> None:
        self.top = _RunningTopK(m)
        self.index: Tensor | None = None  # (n,) gallery index of each kept image
        self.scores: Tensor | None = None  # (n, N_txt)
        self.tokens: Tensor | None = None  # (n, L, D)

    def add(self, first: int, scores: Tensor, tokens: Tensor) -> None:
        """Gallery images ``first, first + 1, ...``: their scores (b, N_txt) against every text, tokens (b, L, D)."""
        index = torch.arange(first, first + scores.shape[0], device=scores.device)
        self.top.add(first, scores)
        best = self.top.values  # (N_txt, <= m): each text's best scores so far
        if self.index is not None:
            index, scores = torch.cat([self.index, index]), torch.cat([self.scores, scores])
            tokens = torch.cat([self.tokens, tokens])
        if best.shape[1] == self.top.n:  # each text's m-th best so far: no image below it can enter its top m
            keep = ((scores >= best[:, -1]) | scores.isnan()).any(1)
            index, scores, tokens = index[keep], scores[keep], tokens[keep]
        self.index, self.scores, self.tokens = index, scores, tokens

    def rows(self, n_images: int) -> Tensor:
        """(n_images,) the row of ``self.tokens`` of every gallery image, -1 where its tokens were dropped."""
        rows = torch.full((n_images,), -1, dtype=torch.long, device=self.index.device)
        rows[self.index] = torch.arange(self.index.shape[0], device=self.index.device)
        return rows


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (dropout and drop-path off) inside the block, the caller's mode restored afterwards,
    also after an error: inference called in the middle of training (callbacks) or on a model left in train mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _in_eval_mode(method: Callable) -> Callable:
    """An inference method run under :func:`eval_mode` (a model left in train mode still gives its scores)."""

    @functools.wraps(method)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with eval_mode(self):
            return method(self, *args, **kwargs)

    return wrapper


def _check_array(a: Any, i: int) -> Any:
    """A numpy image checked before the transform: not empty, and floats finite and within [0, 1] (a float array
    of 0..255 values would otherwise be read as mostly-white pixels, without a word)."""
    if a.size == 0:
        raise ValueError(f"images[{i}]: an empty array {a.shape}")
    if a.dtype.kind == "f":
        lo, hi = float(a.min()), float(a.max())  # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"images[{i}]: a float array with NaN or infinite values")
        if lo < -0.01 or hi > 1.01:
            hint = " (0..255 values: give them as uint8, a.astype(np.uint8))" if hi > 1.01 and lo >= 0 else ""
            raise ValueError(
                f"images[{i}]: float arrays are pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}"
            )
    return a


def _warn_unknown_words(tokenizer: Any, texts: list[str]) -> None:
    """One warning naming (up to 5 of) the words of ``texts`` that ``tokenizer`` reads as ``<unk>`` and how many
    texts have them: an unknown word matches nothing, and a text scored without it says so nowhere else. Only
    tokenizers with an ``<unk>`` token (the word-level one) have unknown words."""
    from .text.tokenizer import unknown_words

    per_text = unknown_words(tokenizer, texts)
    n = sum(1 for u in per_text if u)
    if not n:
        return
    words = list(dict.fromkeys(w for u in per_text for w in u))  # distinct, in order of appearance
    more = f" and {len(words) - 5} more" if len(words) > 5 else ""
    warnings.warn(
        f"texts: {n} of {len(texts)} text(s) have words the tokenizer does not know, e.g. "
        f"{', '.join(map(repr, words[:5]))}{more}: they read as <unk>, so they match nothing",
        stacklevel=user_stacklevel(),
    )


def _composited(a: Any, i: int) -> Any:
    """A numpy image (H, W, C) whose last channel is alpha (C 4, or 2 for grey + alpha) composited on white, as
    PIL images with alpha are: uint8 arrays through the same PIL conversion (a PIL image comes back), floats in
    [0, 1] by the same formula (a float array comes back); other arrays unchanged."""
    import numpy as np

    if a.ndim != 3 or a.shape[2] not in (2, 4) or not (a.dtype == np.uint8 or a.dtype.kind == "f"):
        return a
    if a.dtype == np.uint8:
        from PIL import Image

        from .data.robust import to_rgb

        return to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGBA" if a.shape[2] == 4 else "LA"))
    f = a.astype(np.float32)
    alpha = f[..., -1:]
    if np.isnan(alpha).any() or alpha.min() < 0 or alpha.max() > 1:
        raise ValueError(f"images[{i}]: the alpha channel of a float array must lie in [0, 1]")
    out = f[..., :-1] * alpha + (1.0 - alpha)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def build_vision_encoder(cfg: MMXAttnConfig) -> nn.Module:
    if cfg.vision_backend == "cat":
        from .vision.cat import CATEncoder

        enc = CATEncoder(cfg.vision)
        if cfg.vision_pretrained:
            # not strict: a file may cover part of the encoder (e.g. official weights under a conv stem); but a file
            # that fits nothing is an error, and what did not load is said
            res = enc.load_pretrained(cfg.vision_pretrained, strict=False)
            own = [k for k in enc.state_dict() if not k.endswith("relative_position_index")]
            missing = [k for k in res.missing_keys if not k.endswith("relative_position_index")]
            if len(missing) == len(own):
                raise ValueError(
                    f"vision_pretrained {cfg.vision_pretrained!r}: none of its keys fit the CAT encoder (file keys e.g. "
                    f"{list(res.unexpected_keys)[:3]}, expected e.g. {own[:3]}); rename them first (CATEncoder."
                    "load_pretrained(..., key_map=...) or a converted file)"
                )
            if missing or res.unexpected_keys:
                warnings.warn(
                    f"vision_pretrained {cfg.vision_pretrained!r}: {len(own) - len(missing)} of the encoder's "
                    f"{len(own)} tensors loaded; {len(missing)} keep their initialisation (e.g. {missing[:3]}), "
                    f"{len(res.unexpected_keys)} file keys unused (e.g. {list(res.unexpected_keys)[:3]})",
                    stacklevel=2,
                )
        return enc
    from .vision.adapters import build_adapter  # timm / open_clip towers behind the same interface

    return build_adapter(cfg.vision_backend, cfg.vision, pretrained=cfg.vision_pretrained)


class MMXAttn(nn.Module):
    def __init__(self, cfg: MMXAttnConfig, tokenizer: Any = None) -> None:
        super().__init__()
        if tokenizer is not None and tokenizer.vocab_size != cfg.text.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tokenizer.vocab_size} != config text.vocab_size {cfg.text.vocab_size}"
            )
        self.cfg = cfg
        t = cfg.text
        self.visual = build_vision_encoder(cfg)
        n_stages = len(self.visual.stage_dims)
        self.stages = tuple(s % n_stages for s in cfg.image_stages)
        self.image_proj = ImageTokenProjector([self.visual.stage_dims[s] for s in self.stages], t.width)
        # The encoder's final LayerNorm (trained with the last stage in pretrained CAT/timm weights) is applied
        # to the last stage's tokens when that stage is read. Encoder parts that no chosen stage reaches are
        # frozen, so distributed training never waits for gradients that cannot come.
        self._final_norm = n_stages - 1 in self.stages and isinstance(getattr(self.visual, "norm", None), nn.Module)
        unused = [getattr(self.visual, "head", None)]
        if not self._final_norm:
            unused.append(getattr(self.visual, "norm", None))
        layers = getattr(self.visual, "layers", None)
        if layers is not None and len(layers) == n_stages:
            unused += list(layers)[max(self.stages) + 1 :]
            if cfg.vision_backend == "cat":  # CAT merges patches at a stage's END (timm's ConvNeXt at its start)
                # the last read stage's patch merging feeds only the stages after it
                unused.append(getattr(layers[max(self.stages)], "downsample", None))
        for m in unused:
            if isinstance(m, nn.Module):
                m.requires_grad_(False)
        self.pooler = AttentionalPooler(t.width, t.heads, cfg.embed_dim)
        self.text = TextEncoder(t, cfg.embed_dim)
        self.decoder = MultimodalDecoder(t, t.width)
        # nn.Linear with a packed oneDNN path for no-grad CPU calls (decoding reads the whole head every step)
        self.lm_head = InferenceLinear(t.width, t.vocab_size, bias=False)
        if t.tie_embeddings:
            self.lm_head.weight = self.text.token_embedding.weight
        self.itm_head = nn.Linear(t.width, 2) if cfg.itm_head else None
        # the word head reads the projected tokens (width W) or one read stage's own tokens (word_head_stage)
        self._word_stage = None
        if cfg.word_head_stage is not None:
            self._word_stage = cfg.word_head_stage % n_stages
            if self._word_stage > max(self.stages):
                raise ValueError(
                    f"word_head_stage {cfg.word_head_stage} must be an encoder stage no deeper than the deepest of "
                    f"image_stages {cfg.image_stages} (the encoder stops there)"
                )
        word_in = t.width if self._word_stage is None else self.visual.stage_dims[self._word_stage]
        self.word_head = nn.Linear(word_in, t.vocab_size) if cfg.word_head else None
        # what the word head sees, added to every image token (MMXAttnConfig.word_context); zero-initialised
        self.word_context = nn.Linear(t.vocab_size, t.width, bias=False) if cfg.word_context else None
        # one-element parameters are stored with shape (1,), not as 0-d tensors: FSDP refuses 0-d parameters.
        # State dicts that hold them 0-d (written before this change, or open_clip-style) still load.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self._register_load_state_dict_pre_hook(_accept_0d_for_one_element_params, with_module=True)
        self._init_weights()
        # the text side's layers: a packed oneDNN path for no-grad CPU calls (decoding, evaluation); training and
        # other devices run nn.Linear
        for part in (self.pooler, self.text, self.decoder):
            use_inference_linears(part)
        # Attached for inference (set by mmxattn.load or the data module); not part of the state dict.
        self.tokenizer = tokenizer
        self.transform = None
        # How retrieve() re-ranks by default: the score the training run evaluated with ("lm" when its matching
        # head was not trained); set by mmxattn.load and by the Lightning module. None: "itm" if there is a head.
        self.rerank_with_default: str | None = None
        self.itm_trained: bool | None = None  # False: the ITM head's weights are its initialisation (itm_weight 0)

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("visual"):
                continue  # the encoder initialises itself (official CAT init)
            if isinstance(m, nn.Linear) and m is not self.lm_head:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.word_head is not None:
            # start every word rare (probability 0.05 at every token), as detection heads do (Lin et al. 2017):
            # the first steps then learn which words are there, not to silence the many that are not
            nn.init.constant_(self.word_head.bias, math.log(0.05 / 0.95))
        if self.word_context is not None:
            nn.init.zeros_(self.word_context.weight)  # a no-op until the decoder and pooler learn to read it

    # ------------------------------------------------------------------ inputs
    def _check_images(
        self, images: Tensor, check_finite: bool | None = None, name: str = "images", first: int = 0
    ) -> Tensor:
        """A float batch (B, 3, H, W) (or (3, H, W)) checked and cast to the encoder's dtype; anything else goes
        through :meth:`preprocess`. ``check_finite``: NaN or infinite pixels are an error, and so are values beyond
        +-``MAX_NORMALISED_PIXEL`` (un-normalised 0..255 pixels): one fused min/max reduction and a host sync,
        skipped while compiling or capturing a CUDA graph. None (the default): checked unless this is a training
        pass (training mode with gradients on), whose non-finite losses the training loop catches and skips.
        Errors call the batch ``name``, its first image number ``first``."""
        if not isinstance(images, Tensor):
            return self.preprocess(images)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) float tensors, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            hint = (
                "model.preprocess(images) resizes and normalises uint8 pixel tensors"
                if images.dtype == torch.uint8
                else "give float tensors normalised as model.transform does, or PIL images / arrays / paths"
            )
            raise ValueError(f"images must be normalised float tensors, got dtype {images.dtype}; {hint}")
        if images.shape[0] == 0:
            raise ValueError(f"images: an empty batch {tuple(images.shape)}; give at least one image")
        if check_finite is None:
            check_finite = not (self.training and torch.is_grad_enabled())
        if check_finite and images.numel() and not host_reads_unavailable(images):
            # one fused reduction and one host read: NaN propagates into both ends, an infinity reaches one
            lo, hi = torch.stack(torch.aminmax(images)).tolist()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                why = "; every score and caption of theirs would be meaningless (a NaN image ranks first in retrieval)"
                self._pixel_error(~torch.isfinite(images), name, first, "NaN or infinite pixel values", why)
            if lo < -MAX_NORMALISED_PIXEL or hi > MAX_NORMALISED_PIXEL:
                why = (
                    " look like un-normalised 0..255 pixels (normalised ones lie within about [-3, 3]): give uint8 "
                    "pixel tensors through model.preprocess (PIL images, arrays and paths go through it too), or "
                    "normalise float pixels in [0, 1] as model.transform does"
                )
                mask = images.abs() > MAX_NORMALISED_PIXEL
                self._pixel_error(mask, name, first, f"pixel values from {lo:.4g} to {hi:.4g}", why)
        dtype = self._image_dtype()
        return images if images.dtype == dtype else images.to(dtype)  # e.g. fp32 pixels into a bf16 model

    @staticmethod
    def _pixel_error(bad_pixels: Tensor, name: str, first: int, what: str, why: str) -> None:
        """Raise the ValueError "{name}: {what} in images 3, 4{why}" naming the images of the batch ``name``
        (numbered from ``first``) that hold a ``bad_pixels`` (a (B, 3, H, W) bool mask)."""
        bad = [first + b for b in bad_pixels.flatten(1).any(1).nonzero().flatten().tolist()]
        which = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        of_it = "" if name == "images" else " of it"
        raise ValueError(f"{name}: {what} in image{'s' if len(bad) > 1 else ''} {which}{of_it}{why}")

    def _image_dtype(self) -> torch.dtype:
        """The dtype the image encoder's weights hold (what ``images`` are cast to)."""
        for p in self.visual.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def _check_ids(self, ids: Tensor | str | Sequence[str]) -> Tensor:
        if not isinstance(ids, (Tensor, str, bytes, list, tuple, dict)) and isinstance(ids, Iterable):
            ids = list(ids)  # a generator of texts
        if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
            if self.tokenizer is None:
                raise ValueError("texts given as strings but the model has no tokenizer; pass token ids")
            texts = list(ids) if not isinstance(ids, str) else [ids]
            for i, t in enumerate(texts):
                if isinstance(t, str) and not t.strip():
                    raise ValueError(
                        f"texts[{i}]: an empty text {t!r}; give words to score (training takes no empty captions, "
                        "so the model has no meaningful score for one)"
                    )
            ids = self.tokenizer(texts, context_length=self.cfg.text.context_length)  # the model's, whatever the
            # tokenizer's own default
            _warn_unknown_words(self.tokenizer, texts)
        if isinstance(ids, (list, tuple)) and not ids:
            raise ValueError("texts: an empty list; give at least one text")
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            got = f"shape {tuple(ids.shape)}, dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"token ids must be an int64 or int32 tensor (B, T), got {got}")
        if ids.shape[0] == 0:
            raise ValueError(f"texts: an empty batch of token ids {tuple(ids.shape)}; give at least one text")
        V = self.cfg.text.vocab_size
        # value checks read the tensor (a graph break under torch.compile, where they are skipped: an id out of
        # range then fails in the embedding lookup instead)
        if ids.numel() and not torch.compiler.is_compiling() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}); got min {int(ids.min())}, max {int(ids.max())}")
        return ids.to(self.logit_scale.device).long()

    def preprocess(self, images: Any, *, index_offset: int = 0) -> Tensor:
        """Images -> a normalised float batch (B, 3, H, W) on the model's device, in its dtype.

        Float tensors (B, 3, H, W) or (3, H, W) are taken as already normalised and pass through (inside a list, a
        (B, 3, H, W) tensor gives all B images). uint8 tensors (torchvision's raw pixels, (3, H, W) or (B, 3, H, W)),
        PIL images (any mode: alpha composited on white, 16-bit and float rescaled, as files are), file paths,
        encoded bytes and numpy arrays (H, W[, C]; uint8 or float in [0, 1]; a 4th (or with one colour channel,
        2nd) channel is alpha and is composited on white, as for PIL images), alone or in a list, go through
        ``self.transform`` (the eval transform, built from the config and the encoder's normalisation when none is
        attached). Unreadable files raise ``BadImageError`` naming the file; other bad items are named by their place
        in the list (``images[i]``), counted from ``index_offset`` (where ``images`` is one batch of a larger list)."""
        if isinstance(images, Tensor) and images.dtype != torch.uint8:
            # a CPU batch for a CUDA model moves
            return self._check_images(images, first=index_offset).to(self.logit_scale.device)
        import numpy as np
        from PIL import Image

        from .data.robust import load_image, to_rgb

        if self.transform is None:
            from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

            # the encoder's own normalisation where it states one (timm / open_clip backbones), as exports record
            mean, std = getattr(self.visual, "mean", IMAGENET_MEAN), getattr(self.visual, "std", IMAGENET_STD)
            self.transform = build_transforms(self.cfg.vision.img_size, train=False, mean=mean, std=std)
        items = [images] if _one_image(images) else images if isinstance(images, (list, tuple)) else list(images)
        if not items:
            raise ValueError("images: an empty list; give at least one image")
        out = []
        for i, item in enumerate(items, index_offset):
            if isinstance(item, Tensor) and item.dtype == torch.uint8:  # raw pixels: resized and normalised
                if item.dim() not in (3, 4) or item.shape[-3] not in (1, 3, 4):
                    raise ValueError(
                        f"images[{i}]: uint8 pixel tensors must be (C, H, W) or (B, C, H, W) with C 1, 3 or 4, got "
                        f"{tuple(item.shape)}"
                    )
                if item.numel() == 0:
                    raise ValueError(f"images[{i}]: an empty uint8 pixel tensor {tuple(item.shape)}")
                for one in item if item.dim() == 4 else item[None]:
                    out.append(self.transform(_composited(one.permute(1, 2, 0).cpu().numpy(), i)))
                continue
            if isinstance(item, Tensor):
                if item.dim() not in (3, 4):
                    raise ValueError(f"images[{i}]: tensors must be (3, H, W) or (B, 3, H, W), got {tuple(item.shape)}")
                out.extend(self._check_images(item, name=f"images[{i}]").unbind(0))
                continue
            if isinstance(item, np.ndarray):
                out.append(self.transform(_composited(_check_array(item, i), i)))
                continue
            if not isinstance(item, Image.Image):
                if not isinstance(item, (str, os.PathLike, bytes)):
                    raise TypeError(
                        f"images[{i}]: expected a tensor, PIL image, numpy array, file path or bytes, "
                        f"got {type(item).__name__}"
                    )
                item = load_image(item, min_size=1)  # any readable image, as PIL images and arrays are taken
            if item.width < 1 or item.height < 1:
                raise ValueError(f"images[{i}]: an empty image ({item.width}x{item.height} pixels)")
            out.append(self.transform(to_rgb(item)))
        sizes = sorted({tuple(t.shape) for t in out})
        if len(sizes) > 1:
            raise ValueError(f"images: tensors of different sizes {sizes} cannot form one batch; resize them first")
        dtype = self._image_dtype()
        return torch.stack([t.to(out[0].device, dtype) for t in out]).to(self.logit_scale.device)

    # ------------------------------------------------------------------ encoders
    def _stage_features(self, images: Tensor, stages: tuple[int, ...]) -> list[Tensor]:
        """The encoder's tokens (B, L_s, C_s) of each of ``stages`` (the last stage's after the final norm)."""
        feats = self.visual.forward_features(images, stages=stages)
        last = len(self.visual.stage_dims) - 1
        if self._final_norm and last in stages:
            feats = [self.visual.norm(f) if s == last else f for s, f in zip(stages, feats)]
        return feats

    def _project(self, feats: list[Tensor], images: Tensor) -> Tensor:
        grids = self.visual.grid_sizes(images.shape[-2], images.shape[-1])
        return self.image_proj(feats, [grids[s] for s in self.stages])

    def _encode(self, images: Tensor, want_word: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(image tokens (B, L, D), word tokens or None, word probabilities or None): one encoder pass for all.
        The word tokens (what the word head reads) and the head's probabilities at every image token come back
        when ``want_word`` and the model has a word head; with ``word_context`` the image tokens carry those
        probabilities."""
        ws = self._word_stage
        want_word = self.word_head is not None and (want_word or self.word_context is not None)
        extra = (ws,) if want_word and ws is not None and ws not in self.stages else ()  # read by the word head only
        feats = self._stage_features(images, self.stages + extra)
        image_tokens = self._project(feats[: len(self.stages)], images)  # (B, L, D)
        word_tokens = probs = None
        if want_word:
            word_tokens = image_tokens if ws is None else feats[(self.stages + extra).index(ws)]
        if self.word_context is not None:
            probs = self.word_probs_per_image_token(word_tokens, images)
            image_tokens = image_tokens + self.word_context(self._context_input(probs))
        return image_tokens, word_tokens, probs

    _LOG_FLOOR = 8.0  # word_context_input "logprob": log-probabilities below -8 read as 0

    def _context_input(self, probs: Tensor) -> Tensor:
        """What ``word_context`` reads of the word head's probabilities (``MMXAttnConfig.word_context_input``)."""
        if self.cfg.word_context_input == "logprob":
            return probs.clamp_min(1e-30).log().clamp_min(-self._LOG_FLOOR) / self._LOG_FLOOR + 1.0
        return probs

    def word_probs_per_image_token(self, word_tokens: Tensor, images: Tensor) -> Tensor:
        """The word head's probabilities (B, L, V) at every image token the decoder reads, detached, from the word
        tokens (:meth:`encode_word_tokens`) of ``images`` (only their size is read). With ``word_head_stage`` the
        stage's maps are max-pooled (or, onto a finer grid, repeated) onto each read stage's token grid."""
        probs = self.word_head(word_tokens).detach().sigmoid()  # (B, L_w, V)
        if self._word_stage is None:
            return probs
        grids = self.visual.grid_sizes(images.shape[-2], images.shape[-1])
        gh, gw = grids[self._word_stage]
        maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], gh, gw)  # (B, V, gh, gw)
        parts = []
        for s in self.stages:
            h, w = grids[s]
            if (h, w) == (gh, gw):
                part = maps
            elif h <= gh and w <= gw:
                part = F.adaptive_max_pool2d(maps, (h, w))
            else:
                part = F.interpolate(maps, size=(h, w), mode="nearest")
            parts.append(part.flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)

    def encode_image_tokens(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> image tokens (B, L, D) from the chosen encoder stages (with
        ``MMXAttnConfig.word_context``, carrying the word head's probabilities)."""
        return self._encode(self._check_images(images), want_word=False)[0]

    def encode_word_tokens(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> the tokens the word head reads: the image tokens (B, L, D), or with
        ``MMXAttnConfig.word_head_stage`` that stage's own tokens (B, h*w, C_stage), before the projection (only
        the encoder up to that stage runs)."""
        images = self._check_images(images)
        if self._word_stage is None:
            return self._encode(images, want_word=True)[1]
        return self._stage_features(images, (self._word_stage,))[0]

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, E), L2-normalised unless ``normalize=False``."""
        x = self.pooler(self.encode_image_tokens(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, token_ids: Tensor | Sequence[str], normalize: bool = True) -> Tensor:
        """(B, T) ids (or strings, with a tokenizer attached) -> (B, E), L2-normalised unless told otherwise. Strings
        (here and in similarity, retrieve, forward): an empty one is an error; words a word-level vocabulary does
        not know (read as ``<unk>``, which matches nothing) draw one warning naming them."""
        x, _ = self.text(self._check_ids(token_ids))
        return F.normalize(x, dim=-1) if normalize else x

    def get_logit_scale(self) -> Tensor:
        """The contrastive temperature multiplier, a 0-d tensor, never above ``max_logit_scale`` (100, CLIP's bound:
        Radford et al. 2021). Above the bound the value is the bound but the gradient still reaches the parameter
        (a plain ``clamp`` would zero it there, and a temperature Adam pushed past the bound would stick at 100);
        training also clamps the parameter itself after every step (:meth:`clamp_logit_scale_`), as CLIP does."""
        s = self.logit_scale.exp().reshape(())
        return torch.where(s > self.cfg.max_logit_scale, s - s.detach() + self.cfg.max_logit_scale, s)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the learned log-temperature to ``log(max_logit_scale)`` in place (after an optimizer step)."""
        self.logit_scale.clamp_(max=math.log(self.cfg.max_logit_scale))

    def decode(self, image_tokens: Tensor, text_states: Tensor, image_index: Tensor | None = None) -> Tensor:
        """Teacher-forced decoder: text states (B, T, W), image tokens (B, L, D) -> vocabulary logits (B, T, V).
        With ``image_index`` (B,), ``image_tokens`` (N, L, D) holds each image once and row ``i`` reads image
        ``image_index[i]`` (its cross-attention keys/values are projected once, not once per caption)."""
        return self.lm_head(self.decoder(text_states, image_tokens, image_index=image_index))

    def forward(self, images: Tensor, token_ids: Tensor, text_image_index: Tensor | None = None) -> MMXAttnOutput:
        """Training forward. One caption per image (``token_ids`` (B, T)), or several: ``token_ids`` (R, T) with
        ``text_image_index`` (R,), the image of every caption; the image is encoded once and its tokens feed the
        decoder for each of its captions. ``image_embeds`` is (B, E), ``text_embeds``/``logits`` have R rows."""
        images = self._check_images(images, check_finite=False)  # training: a NaN loss is caught and skipped
        ids = self._check_ids(token_ids)
        if text_image_index is None:
            if images.shape[0] != ids.shape[0]:
                raise ValueError(f"batch sizes differ: {images.shape[0]} images, {ids.shape[0]} token rows")
        else:
            tii = text_image_index
            if tii.shape != (ids.shape[0],) or tii.is_floating_point():
                raise ValueError(
                    f"text_image_index must be an integer tensor of shape ({ids.shape[0]},) (one image index per "
                    f"token row), got {tii.dtype} {tuple(tii.shape)}"
                )
            if (
                ids.shape[0]
                and not torch.compiler.is_compiling()  # as in _check_ids
                and (int(tii.min()) < 0 or int(tii.max()) >= images.shape[0])
            ):
                raise ValueError(f"text_image_index values must index the {images.shape[0]} images")
        (image_tokens, word_tokens, word_probs), image_embeds, (text_x, states) = self._towers(images, ids)
        # The decoder runs over the whole caption once: positions :-1 predict ids[:, 1:] (causal, so the last
        # position changes none of them) and the last real position feeds the matching head.
        # with several captions per image, each image's cross-attention keys/values are projected once
        h = self.decoder(states, image_tokens, image_index=text_image_index)  # (R, T, W)
        logits = self.lm_head(h[:, :-1])  # (B, T-1, V)
        return MMXAttnOutput(
            image_embeds=image_embeds,
            text_embeds=F.normalize(text_x, dim=-1),
            logits=logits,
            logit_scale=self.get_logit_scale(),
            image_tokens=image_tokens,
            text_states=states,
            decoder_states=h,
            word_tokens=word_tokens,
            word_probs=word_probs,
        )

    def training_embeddings(self, images: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(image_embeds (B, E), text_embeds (R, E)) as :meth:`forward` computes them, without the decoder: the same
        modules called in the same order, so that under the same random-number state (dropout, drop-path) they are
        forward's own (the first pass of grad caching, :mod:`mmxattn.lit.gradcache`)."""
        images = self._check_images(images, check_finite=False)
        _, image_embeds, (text_x, _) = self._towers(images, self._check_ids(token_ids))
        return image_embeds, F.normalize(text_x, dim=-1)

    def _towers(self, images: Tensor, ids: Tensor) -> tuple[tuple[Tensor, Any, Any], Tensor, tuple[Tensor, Tensor]]:
        """The training forward's encoders, in one order for :meth:`forward` and :meth:`training_embeddings`:
        (:meth:`_encode`'s image tokens, word tokens, word probabilities), the normalised pooled image embedding
        (B, E), the text tower's (pooled (R, E), token states (R, T, W))."""
        encoded = self._encode(images, want_word=True)
        return encoded, F.normalize(self.pooler(encoded[0]), dim=-1), self.text(ids)

    def word_logits(self, image_tokens: Tensor) -> Tensor:
        """Word tokens (B, L, D) (:meth:`encode_word_tokens`: the image tokens, or the ``word_head_stage``'s own
        tokens) -> every token's logit for every vocabulary word (B, L, V), from the word head
        (``MMXAttnConfig.word_head``). An image's score for a word is its best token's (the maximum over L)."""
        if self.word_head is None:
            raise RuntimeError("this model was built with word_head=False (MMXAttnConfig.word_head)")
        return self.word_head(image_tokens)

    def word_maps(self, images: Tensor, words: Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
        """Where each word is seen: ``(maps, present)`` with ``maps`` (B, K, h, w) the sigmoid of every image
        token's logit for each of the K words on the last read stage's token grid (tokens of the other read
        stages are max-pooled onto it), or on the ``word_head_stage``'s own grid, and ``present`` (B, K) the image's probability of the word (its best
        token's). ``words`` are single-token words (strings need the attached tokenizer) or token ids (K,)."""
        if isinstance(words, Tensor):
            ids = words.long().flatten()
        else:
            if self.tokenizer is None:
                raise ValueError("word_maps needs token ids or an attached tokenizer for strings")
            tk, ids_list = self.tokenizer, []
            specials = {tk.pad_id, tk.bos_id, tk.eos_id}
            unk = getattr(tk, "unk_id", None)
            for w in [words] if isinstance(words, str) else words:
                tok = [t for t in tk([w])[0].tolist() if t not in specials]
                if len(tok) != 1 or tok[0] == unk:
                    raise ValueError(f"word_maps: {w!r} is not one token of the vocabulary (token ids {tok})")
                ids_list.append(tok[0])
            ids = torch.tensor(ids_list, dtype=torch.long)
        if not ids.numel():
            raise ValueError("word_maps: no words given; give at least one word")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.text.vocab_size):
            raise ValueError(f"word_maps: token ids must be in [0, {self.cfg.text.vocab_size})")
        images = self._check_images(images)
        tokens = self.encode_word_tokens(images)
        logits = self.word_logits(tokens)[..., ids.to(tokens.device)]  # (B, L, K)
        grids = self.visual.grid_sizes(images.shape[-2], images.shape[-1])
        stages = self.stages if self._word_stage is None else (self._word_stage,)
        h, w = grids[stages[-1]]
        maps, start = None, 0
        for s in stages:
            gh, gw = grids[s]
            part = logits[:, start : start + gh * gw].transpose(1, 2).reshape(-1, ids.numel(), gh, gw)
            start += gh * gw
            part = F.adaptive_max_pool2d(part, (h, w)) if (gh, gw) != (h, w) else part
            maps = part if maps is None else torch.maximum(maps, part)
        probs = maps.sigmoid()
        return probs, probs.flatten(2).amax(-1)

    # ------------------------------------------------------------------ matching / re-ranking
    def _eos_index(self, ids: Tensor) -> Tensor:
        # last real (non-pad) position of every row: the EOS, or the last token of a truncated row
        real = (ids != self.cfg.text.pad_id).long()
        return (real.cumsum(1) * real).argmax(1)

    def itm_logits(
        self,
        image_tokens: Tensor,
        token_ids: Tensor,
        text_states: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Image-text matching logits (B, 2) [no-match, match] from the decoder state at each row's last token,
        which (causally) has read the whole caption while cross-attending to the image (``image_index``: as in
        :meth:`decode`)."""
        if self.itm_head is None:
            raise RuntimeError("this model was built with itm_head=False")
        if text_states is None:
            _, text_states = self.text(token_ids)
        return self.itm_from_decoder(self.decoder(text_states, image_tokens, image_index=image_index), token_ids)

    def itm_from_decoder(self, decoder_states: Tensor, token_ids: Tensor) -> Tensor:
        """ITM logits (B, 2) from decoder states (B, T, W) already computed for these ids."""
        if self.itm_head is None:
            raise RuntimeError("this model was built with itm_head=False")
        last = self._eos_index(token_ids)
        return self.itm_head(decoder_states[torch.arange(decoder_states.shape[0], device=last.device), last])

    def caption_logprob(
        self,
        image_tokens: Tensor,
        token_ids: Tensor,
        text_states: Tensor | None = None,
        normalize: bool = True,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Log-likelihood (B,) of each caption given its image under the decoder: per token (length-normalised)
        by default, summed over the caption with ``normalize=False`` (``image_index``: as in :meth:`decode`)."""
        if text_states is None:
            _, text_states = self.text(token_ids)
        logp = self.decode(image_tokens, text_states[:, :-1], image_index).log_softmax(-1)  # (B, T-1, V)
        target = token_ids[:, 1:]
        tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        mask = (target != self.cfg.text.pad_id).float()
        total = (tok * mask).sum(1)
        return total / mask.sum(1).clamp_min(1) if normalize else total

    @torch.no_grad()
    def caption_log_prior(
        self, ref_image_tokens: Tensor, token_ids: Tensor, text_states: Tensor | None = None, batch_size: int = 512
    ) -> Tensor:
        """log p(caption) (B,), estimated as the mean over ``ref_image_tokens`` (M, L, D), a sample of images,
        of p(caption | image): the marginal that turns caption likelihood into pointwise mutual information
        log p(c | I) - log p(c) for ranking captions for an image ("pmi" re-ranking)."""
        if text_states is None:
            _, text_states = self.text(token_ids)
        M, C = ref_image_tokens.shape[0], token_ids.shape[0]
        img = torch.arange(M, device=token_ids.device).repeat_interleave(C)
        cap = torch.arange(C, device=token_ids.device).repeat(M)
        out = [
            self.pair_scores(ref_image_tokens, a, token_ids[b], text_states[b], "pmi")
            for a, b in zip(img.split(batch_size), cap.split(batch_size))
        ]
        return torch.cat(out).view(M, C).logsumexp(0) - math.log(M)

    # ------------------------------------------------------------------ generation
    def new_cache(self, static: bool = False, device: torch.device | str | None = None) -> DecodingCache:
        """An empty decoding cache: growing (default) or static (fixed buffers of ``context_length`` positions on
        ``device``, what CUDA-graph decoding needs)."""
        t = self.cfg.text
        if static:
            return DecodingCache.static(t.layers, t.decoder_layers, t.context_length, device)
        return DecodingCache.empty(t.layers, t.decoder_layers)

    def decode_step(self, ids: Tensor, image_tokens: Tensor | None, cache: DecodingCache | None) -> Tensor:
        """Logits (B, t, V) for new ids (B, t). With a cache, ``ids`` continue the cached prefix; without one,
        ``ids`` is the whole prefix and everything is recomputed. With a static cache the step has no host-side
        value in it (the caller books the positions with ``cache.reserve``), so it can be captured in a CUDA graph."""
        if cache is None:
            _, states = self.text(ids)
            return self.decode(image_tokens, states)
        states = self.text.step(ids, cache.text)
        logits = self.lm_head(self.decoder(states, image_tokens, cache.dec_self, cache.dec_cross))
        if cache.is_static:
            cache.pos.add_(ids.shape[1])
        return logits

    @torch.no_grad()
    def generate(
        self, images: Any = None, max_new_tokens: int | None = None, strategy: str = "greedy", **kwargs: Any
    ) -> Tensor:
        """Token ids (B, T') starting with BOS; see :func:`mmxattn.generation.generate` for the options
        (``num_beams``, ``length_penalty``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``min_new_tokens``, ``use_cache``, ``static_cache``, ``cuda_graph`` (on CUDA by default: captured graphs of the
        encoder call and the decoding step are replayed), ``generator``, ``image_tokens`` to reuse an encoder pass)."""
        from .generation import generate

        return generate(self, images, max_new_tokens=max_new_tokens, strategy=strategy, **kwargs)

    @torch.no_grad()
    def caption(self, images: Any, batch_size: int | None = None, **gen_kwargs: Any) -> list[str]:
        """Captions for tensors, PIL images or image paths (one string per image; anything :meth:`preprocess`
        takes). ``batch_size``: images read, preprocessed and captioned that many at a time (a folder of photos
        never sits in memory at once); None captions them all in one batch. Greedy and beam captions do not depend
        on it; sampled ones do (the random draws follow the batch layout)."""
        if self.tokenizer is None:
            raise RuntimeError(
                "model.caption needs model.tokenizer, and this model has none (built without one, or loaded from an "
                "export folder without tokenizer.json): attach one (model.tokenizer = ...) or call model.generate, "
                "which returns token ids"
            )
        if batch_size is None:
            return self.tokenizer.batch_decode(self.generate(images, **gen_kwargs))
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"caption: batch_size must be an int >= 1 (or None: one batch), got {batch_size!r}")
        out: list[str] = []
        for part, first in _gallery_parts(images, int(batch_size)):
            pixels = self.preprocess(part, index_offset=first)
            out += self.tokenizer.batch_decode(self.generate(pixels, **gen_kwargs))
        return out

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    @_in_eval_mode
    def similarity(self, images: Any, texts: Tensor | Sequence[str], batch_size: int | None = None) -> Tensor:
        """Cosine similarity (N_img, N_txt) of the retrieval embeddings (in eval mode; the model's mode is kept).
        ``batch_size``: images read, preprocessed and encoded that many at a time (None: all in one batch)."""
        txt = self.encode_text(texts)
        if batch_size is None:
            return self.encode_image(self.preprocess(images)) @ txt.T
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"similarity: batch_size must be an int >= 1 (or None: one batch), got {batch_size!r}")
        parts = _gallery_parts(images, int(batch_size))
        return torch.cat([self.encode_image(self.preprocess(p, index_offset=i)) @ txt.T for p, i in parts])

    @torch.no_grad()
    @_in_eval_mode
    def retrieve(
        self,
        images: Any,
        texts: Tensor | Sequence[str],
        k: int = 5,
        rerank: int = 0,
        rerank_with: str | None = None,
        batch_size: int = 256,
        prior_images: int = 8,
        gallery_norm: bool = False,
        direction: str = "both",
    ) -> RetrievalResult:
        """Rank texts for every image and images for every text.

        First by embedding cosine, or with ``gallery_norm=True`` by the gallery-normalised scores of
        :func:`mmxattn.metrics.gallery_normalized_scores` (texts for an image by log p(image | text), a softmax over
        the given images at the model's learned temperature, so a caption that fits this image and few others beats
        a generic one; images for a text by log p(text | image)); the scores returned are then those log-probabilities.
        With ``rerank=N`` the top max(N, k) candidates of each query are re-scored by the
        multimodal decoder (the text's queries cross-attending to the image): ``rerank_with="itm"`` uses the
        image-text matching head (BLIP's re-ranking), ``"lm"`` the caption's length-normalised log-likelihood,
        ``"pmi"`` the caption's log-likelihood minus its log prior (estimated over ``prior_images`` of the
        images, evenly spaced) when captions are ranked for an image, so that a specific caption that fits the
        image beats a generic one that fits every image; images ranked for a caption use the log-likelihood (the
        prior is the same for all of them). Re-ranked candidates keep their order above the un-re-ranked rest.
        ``rerank_with=None`` (the default) takes ``model.rerank_with_default``: what the training run evaluated
        with, as ``mmxattn.load`` reads it from the checkpoint ("lm" when the matching head was not trained), else
        ``"itm"`` (``"lm"`` without a head). The model runs in eval mode (its own mode is restored).

        ``direction="i2t"`` ranks (and re-ranks) only texts for images, ``"t2i"`` only images for texts; the other
        direction's fields of the result are None, and those asked for equal what ``"both"`` gives.

        The images (anything :meth:`preprocess` takes) are preprocessed and encoded ``batch_size`` at a time, so a
        large gallery of files holds one batch of pixels at a time; image token sequences are kept only for
        re-ranking: every image's where images are queries (``"both"``, ``"i2t"``), with ``"t2i"`` only those that
        can still be among some text's candidates. No (images x texts) score matrix is held: each image's candidates
        are ranked from its batch's block of scores (batch_size x texts), each text's candidates kept as a running
        top max(k, rerank) while the gallery streams past, so besides the text side and the re-ranking tokens the
        memory grows as the pooled embeddings (images x embed dim) plus (images + texts) x max(k, rerank) scores.
        Pooled embeddings are computed per batch, so scores may differ in the last bits between batch sizes (the
        rankings do not, short of near-ties).
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"retrieve: k must be an int >= 1, got {k!r}")
        if isinstance(rerank, bool) or not isinstance(rerank, numbers.Integral) or rerank < 0:
            raise ValueError(f"retrieve: rerank must be an int >= 0 (0 = off), got {rerank!r}")
        for name, value in (("batch_size", batch_size), ("prior_images", prior_images)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"retrieve: {name} must be an int >= 1, got {value!r}")
        if direction not in RETRIEVE_DIRECTIONS:
            raise ValueError(f"retrieve: direction must be one of {RETRIEVE_DIRECTIONS}, got {direction!r}")
        k, rerank = int(k), int(rerank)
        if rerank_with is None:  # getattr: a model pickled before these attributes existed
            default = getattr(self, "rerank_with_default", None)
            rerank_with = default or ("itm" if self.itm_head is not None else "lm")
        if rerank_with not in RERANK_METHODS:  # also with rerank=0: a typo is not silently dropped
            raise ValueError(f"rerank_with must be one of {RERANK_METHODS}, got {rerank_with!r}")
        if rerank > 0 and rerank_with == "itm" and getattr(self, "itm_trained", None) is False:
            warnings.warn(
                "retrieve: re-ranking with the ITM head, which this model's training never trained (itm_weight 0): "
                "its scores are noise; use rerank_with='lm' or 'pmi'",
                stacklevel=4,  # the caller of torch.no_grad -> _in_eval_mode -> retrieve
            )
        want_i2t, want_t2i = direction != "t2i", direction != "i2t"
        ids = self._check_ids(texts)
        txt_emb, states = [], []
        for b in ids.split(batch_size):
            e, s = self.text(b)
            txt_emb.append(F.normalize(e, dim=-1))
            if rerank > 0:  # the decoder reads the token states when re-ranking, and only then
                states.append(s)
        txt_emb = torch.cat(txt_emb)  # (N_txt, E)
        scale = float(self.get_logit_scale()) if gallery_norm else 0.0
        n_txt = txt_emb.shape[0]

        # The gallery streams past one batch at a time and no (N_img, N_txt) score matrix is ever held: each image's
        # candidate texts are its block row's top n (with gallery_norm those need every image's score first, so
        # they are ranked in a second pass over the kept pooled embeddings), each text's candidate images a running
        # top n merged block by block. Kept: pooled embeddings (N_img, E), the candidates, and image tokens only
        # for re-ranking, all of them where every image is a query, else (t2i) those still among some text's top
        # n, since the candidates are known only once the whole gallery is scored.
        n_cand = max(rerank, k)  # candidates per query: re-ranked, or the top k themselves
        img_emb, i2t_top, tokens = [], [], []
        lse = torch.full((n_txt,), float("-inf"), device=txt_emb.device) if gallery_norm and want_i2t else None
        track = _CandidateTokens(n_cand) if rerank > 0 and not want_i2t else None
        t2i_top = track.top if track is not None else _RunningTopK(n_cand) if want_t2i else None
        n_img = 0
        for x in self._gallery_batches(images, batch_size):
            tok = self.encode_image_tokens(x)  # (b, L, D)
            emb = F.normalize(self.pooler(tok), dim=-1)  # (b, E)
            img_emb.append(emb)
            block = emb @ txt_emb.T  # (b, N_txt) cosine
            if gallery_norm:
                block = scale * block
                if lse is not None:  # log of the sum over images of exp(score), for log p(image | text)
                    lse = torch.logaddexp(lse, block.logsumexp(0))
            elif want_i2t:
                i2t_top.append(block.topk(min(n_cand, n_txt), dim=1))
            t2i_block = None  # (b, N_txt): how the texts score these images, where images are ranked for texts
            if want_t2i:  # with gallery_norm log p(text | image), a softmax over the texts of each image's row
                t2i_block = block.log_softmax(1) if gallery_norm else block
            if track is not None:  # adds the block to t2i_top too
                track.add(n_img, t2i_block, tok)
            else:
                if want_t2i:
                    t2i_top.add(n_img, t2i_block)
                if rerank > 0:
                    tokens.append(tok)
            n_img += tok.shape[0]
            del block, t2i_block
        img_emb = torch.cat(img_emb)  # (N_img, E)
        if lse is not None:  # i2t by log p(image | text), a softmax over the whole gallery: the second pass
            i2t_top = [
                (scale * (e @ txt_emb.T) - lse).topk(min(n_cand, n_txt), dim=1) for e in img_emb.split(batch_size)
            ]
        if rerank > 0 and rerank_with == "pmi" and n_img < 2:
            warnings.warn(
                "retrieve: rerank_with='pmi' estimates each caption's prior over the given images, and one image is "
                "its own prior (every score would be 0); re-ranking with 'lm' instead",
                stacklevel=4,  # the caller of torch.no_grad -> _in_eval_mode -> retrieve
            )
            rerank_with = "lm"
        if gallery_norm and want_i2t and n_img < 2:
            warnings.warn(
                "retrieve: gallery_norm=True normalises each text's scores over the given images, and over one image "
                "every score is 0 (log 1); give several images, or gallery_norm=False for cosine scores",
                stacklevel=4,  # the caller of torch.no_grad -> _in_eval_mode -> retrieve
            )
        if gallery_norm and want_t2i and n_txt < 2:
            # images for a text are ranked by log p(text | image), a softmax over the given TEXTS: with one text
            # every image scores 0 and the ranking is arbitrary
            warnings.warn(
                "retrieve: gallery_norm=True ranks images for a text by log p(text | image), normalised over the "
                "given texts, and with one text every image scores 0 (log 1), so their order is arbitrary; give "
                "several texts, or gallery_norm=False for cosine scores",
                stacklevel=4,  # the caller of torch.no_grad -> _in_eval_mode -> retrieve
            )
        states_all = torch.cat(states) if rerank > 0 else None
        img_tokens = track.tokens if track is not None else torch.cat(tokens) if rerank > 0 else None
        token_rows = track.rows(n_img) if track is not None else None  # gallery index -> row of img_tokens
        prior = None
        if rerank > 0 and rerank_with == "pmi" and want_i2t:  # the prior is subtracted for image queries only
            ref = torch.linspace(0, n_img - 1, min(prior_images, n_img)).round().long()
            prior = self.caption_log_prior(img_tokens[ref], ids, states_all, batch_size)
        i2t = t2i = None  # (scores, indices) of each query's candidates, best first: (Q, min(n_cand, gallery))
        if want_i2t:
            i2t = torch.cat([v for v, _ in i2t_top]), torch.cat([i for _, i in i2t_top])
        if want_t2i:
            t2i = t2i_top.values, t2i_top.indices
        out: list[Tensor | None] = []
        for top, query_is_image, n_other in ((i2t, True, n_txt), (t2i, False, n_img)):
            if top is None:
                out += [None, None]
                continue
            top_s, top_i = top
            kk = min(k, n_other)
            if rerank > 0:
                q = torch.arange(top_s.shape[0], device=top_s.device)[:, None].expand_as(top_i).reshape(-1)
                c = top_i.reshape(-1)
                im, tx = (q, c) if query_is_image else (c, q)
                if token_rows is not None:
                    im = token_rows[im]
                    if bool((im < 0).any()):  # _CandidateTokens keeps every possible candidate; never expected
                        raise RuntimeError("retrieve: a candidate image's tokens were not kept (a bug; please report)")
                new = torch.cat(
                    [
                        self.pair_scores(img_tokens, a, ids[b], states_all[b], rerank_with)
                        for a, b in zip(im.split(batch_size), tx.split(batch_size))
                    ]
                ).view_as(top_s)
                if prior is not None and query_is_image:
                    new = new - prior[top_i]
                order = new.argsort(dim=1, descending=True)[:, :kk]
                out += [top_i.gather(1, order), new.gather(1, order)]
            else:  # n_cand is k: the candidates are the answer
                out += [top_i[:, :kk], top_s[:, :kk]]
        return RetrievalResult(i2t_indices=out[0], i2t_scores=out[1], t2i_indices=out[2], t2i_scores=out[3])

    def _gallery_batches(self, images: Any, batch_size: int) -> Iterator[Tensor]:
        """``images`` (anything :meth:`preprocess` takes) as preprocessed batches (b, 3, H, W) of ``batch_size``
        images (the last may hold fewer), each preprocessed only when asked for: a gallery of files is held one
        batch of pixels at a time. Errors name an item by its place in ``images``, as ``preprocess(images)`` does."""
        size = None
        for part, first in _gallery_parts(images, batch_size):
            x = self.preprocess(part, index_offset=first)
            if size is not None and x.shape[1:] != size:  # as preprocess refuses within one batch
                sizes = sorted({tuple(size), tuple(x.shape[1:])})
                raise ValueError(f"images: tensors of different sizes {sizes} cannot form one batch; resize them first")
            size = x.shape[1:]
            yield x

    def pair_scores(self, image_tokens: Tensor, image_rows: Tensor, ids: Tensor, states: Tensor, how: str) -> Tensor:
        """Decoder score (P,) of P (image, caption) pairs: image ``image_tokens[image_rows[p]]`` with caption
        ``ids[p]`` (text states ``states[p]``), by ``how`` (see :data:`RERANK_METHODS`). Each distinct image's
        cross-attention keys/values are projected once for all its pairs."""
        if how not in RERANK_METHODS:
            raise ValueError(f"rerank_with must be one of {RERANK_METHODS}, got {how!r}")
        uniq, inv = image_rows.unique(return_inverse=True)
        tokens = image_tokens[uniq.to(image_tokens.device)].to(ids.device)  # the gallery may be held on the CPU
        inv = inv.to(ids.device)
        if how == "itm":
            return self.itm_logits(tokens, ids, states, image_index=inv).log_softmax(-1)[:, 1]
        # "pmi": the caller subtracts the caption's log prior where the candidates are captions
        return self.caption_logprob(tokens, ids, states, normalize=how == "lm", image_index=inv)

    def _apply(self, fn: Callable, recurse: bool = True) -> MMXAttn:
        """``.to()``, ``.half()``, ``.float()``, ``.cuda()`` ...: the no-grad weight caches are dropped afterwards, so
        that the copies of the weights as they were (and the storage each entry holds) are freed at once rather
        than at the next call (they would not be used either way: the keys see the new storage)."""
        from .vision.windows import clear_weight_caches

        out = super()._apply(fn, recurse)
        clear_weight_caches(self)
        return out

    # ------------------------------------------------------------------ training helpers
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.visual, "set_grad_checkpointing"):
            self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D params (norms, biases)."""
        names = {"logit_scale", "text.positional_embedding", "text.cls_token", "pooler.query", "image_proj.stage_embed"}
        if hasattr(self.visual, "no_weight_decay"):
            names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return names

    @property
    def num_image_tokens(self) -> int:
        s = self.cfg.vision.img_size
        grids = self.visual.grid_sizes(s, s)
        return sum(grids[i][0] * grids[i][1] for i in self.stages)


def one_element_params_as_stored(module: nn.Module, state: dict[str, Tensor], prefix: str = "") -> None:
    """Reshape, in place, 0-d values in ``state`` whose parameter in ``module`` has shape (1,) (checkpoints that
    stored one-element parameters as 0-d tensors)."""
    for name, p in module.named_parameters(prefix=prefix.rstrip("."), recurse=True):
        v = state.get(name)
        if isinstance(v, Tensor) and v.ndim == 0 and p.shape == (1,):
            state[name] = v.reshape(1)


def _accept_0d_for_one_element_params(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # signature of nn.Module's load_state_dict pre-hook with the module (local_metadata, strict, missing, ...)
    one_element_params_as_stored(module, state_dict, prefix)
