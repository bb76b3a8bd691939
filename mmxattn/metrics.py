"""Evaluation metrics, computed on a whole evaluation set (never in-batch).

* retrieval recall@K both ways over the full gallery: a text query set holds every caption of every image, and an
  image counts as found for a text when it is that text's image (the COCO / Flickr protocol of Karpathy & Fei-Fei);
* captioning BLEU-1..4, CIDEr-D, ROUGE-L and METEOR through pycocoevalcap (the COCO caption evaluation code),
  with its Java PTB tokenizer; without Java a plain tokenizer is used, METEOR is reported as ``None`` and a
  warning (once per process) says so;
* grounding accuracy: the peak of a word's cross-attention heatmap falls inside the box of the object it names.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "caption_metrics",
    "gallery_normalized_scores",
    "grounding_hits",
    "grounding_hits_any",
    "grounding_misses",
    "java_available",
    "recall_from_candidates",
    "recall_from_rankings",
    "retrieval_metrics",
    "token_heatmap",
]


# ---------------------------------------------------------------------------------------------- retrieval
def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    norm_scale: float | None = None,
) -> dict[str, float]:
    """Recall@K of cosine retrieval over the full gallery.

    Args:
        image_embeds: (N_img, E) L2-normalised.
        text_embeds: (N_txt, E) L2-normalised.
        text_to_image: (N_txt,) index of each text's image.
        norm_scale: also report gallery-normalised recall (``i2t_r{k}_norm``, ``t2i_r{k}_norm``) with this logit
            scale (pass the model's learned one); see :func:`gallery_normalized_scores`.
    Returns:
        ``i2t_r{k}``, ``t2i_r{k}`` for every k, and ``rsum`` (their sum, the usual model-selection number).

    Ties are broken at random in expectation: a query whose own item ties with ``t`` others behind ``b`` better ones
    counts ``clamp((k - b) / (t + 1), 0, 1)`` towards recall@k (with several own texts at that score, the chance
    that one of them is drawn into the top k), so a collapsed model (every score equal) scores chance, not 1. Images without a text are distractors for t2i and left out of i2t. Non-finite embeddings give
    NaN for every metric (with a warning; a checkpoint monitor then never prefers the run).
    """
    text_to_image = text_to_image.to(image_embeds.device).long()
    n_img, n_txt = image_embeds.shape[0], text_embeds.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval_metrics needs at least one image and one text, got {n_img} and {n_txt}")
    if text_to_image.shape != (n_txt,) or int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img:
        raise ValueError(f"text_to_image must be ({n_txt},) indices into {n_img} images")
    if not (torch.isfinite(image_embeds).all() and torch.isfinite(text_embeds).all()):
        warnings.warn("retrieval_metrics: non-finite embeddings; every recall is NaN", stacklevel=2)
        keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
        keys += [f"{key}_norm" for key in keys] if norm_scale is not None else []
        return {**dict.fromkeys(keys, float("nan")), "rsum": float("nan")}
    out = _recall(lambda a, b: image_embeds[a:b] @ text_embeds.T, n_img, n_txt, text_to_image, ks, chunk)
    out["rsum"] = sum(v for key, v in out.items() if key.startswith(("i2t", "t2i")))
    if norm_scale is not None:
        lse_i2t, lse_t2i = _gallery_lse(image_embeds, text_embeds, float(norm_scale), chunk)

        def normed(a: int, b: int) -> Tensor:  # image rows a:b against every text; see gallery_normalized_scores
            return float(norm_scale) * (image_embeds[a:b] @ text_embeds.T) - lse_i2t[None, :]

        def normed_t2i(a: int, b: int) -> Tensor:
            return float(norm_scale) * (image_embeds[a:b] @ text_embeds.T) - lse_t2i[a:b, None]

        i2t = _recall(normed, n_img, n_txt, text_to_image, ks, chunk, which="i2t")
        t2i = _recall(normed_t2i, n_img, n_txt, text_to_image, ks, chunk, which="t2i")
        out.update({f"{k}_norm": v for k, v in {**i2t, **t2i}.items()})
    return out


def _recall(scores, n_img: int, n_txt: int, text_to_image: Tensor, ks, chunk: int, which: str = "both"):
    """Recall@K from ``scores(a, b)`` -> (b - a, N_txt), the scores of image rows a:b against every text (higher
    is better): i2t counts the rank of an image's best own text, t2i the rank of a text's image."""
    device = text_to_image.device
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=device)
    i2t_ties = torch.empty(n_img, dtype=torch.long, device=device)
    i2t_level_own = torch.empty(n_img, dtype=torch.long, device=device)
    t2i_rank = torch.zeros(n_txt, dtype=torch.long, device=device)
    t2i_ties = torch.full((n_txt,), -1, dtype=torch.long, device=device)  # the own image ties with itself
    own_score: Tensor | None = None  # score of every text's own image, for t2i ranks accumulated over image chunks
    for s in range(0, n_img, chunk):
        sim = scores(s, min(s + chunk, n_img))  # (c, N_txt)
        if own_score is None:
            own_score = sim.new_empty(n_txt)  # the scores' dtype: a rounded copy could rank a text's image below itself
        rows = torch.arange(s, s + sim.shape[0], device=device)
        own = text_to_image[None, :] == rows[:, None]
        best_own = sim.masked_fill(~own, float("-inf")).max(1, keepdim=True).values  # (c, 1)
        i2t_rank[s : s + sim.shape[0]] = (sim > best_own).sum(1)  # texts strictly better than its best own text
        level = sim == best_own
        i2t_ties[s : s + sim.shape[0]] = (level & ~own).sum(1)  # other images' texts level with it
        i2t_level_own[s : s + sim.shape[0]] = (level & own).sum(1)  # own texts at that score (one at least)
        mine = (text_to_image >= s) & (text_to_image < s + sim.shape[0])
        own_score[mine] = sim[text_to_image[mine] - s, mine.nonzero().squeeze(1)]
    for s in range(0, n_img, chunk):  # t2i: images strictly better than the text's own image
        sim = scores(s, min(s + chunk, n_img))
        t2i_rank += (sim > own_score[None, :]).sum(0)
        t2i_ties += (sim == own_score[None, :]).sum(0)
    captioned = torch.zeros(n_img, dtype=torch.bool, device=device)
    captioned[text_to_image] = True
    out = {}
    for k in ks:
        if which in ("both", "i2t"):
            c = captioned
            out[f"i2t_r{k}"] = _expected_hits(i2t_rank[c], i2t_ties[c], k, i2t_level_own[c])
        if which in ("both", "t2i"):
            out[f"t2i_r{k}"] = _expected_hits(t2i_rank, t2i_ties, k, torch.ones_like(t2i_ties))
    return out


def _expected_hits(better: Tensor, ties: Tensor, k: int, own: Tensor) -> float:
    """Mean of :func:`_expected_hit_rates`."""
    return _expected_hit_rates(better, ties, k, own).mean().item()


def _expected_hit_rates(better: Tensor, ties: Tensor, k: int, own: Tensor) -> Tensor:
    """Per query, the chance that an own item lands in the top k when ties are broken at random: ``own`` own items
    and ``ties`` others share one score behind ``better`` items, so ``j = k - better`` of the tied places are in the
    top k, and the chance that they are all taken by others is C(ties, j) / C(ties + own, j)."""
    t, m = ties.double(), own.double()
    j = (k - better).double().clamp(min=0)
    j = torch.minimum(j, t + m)
    lg = torch.lgamma
    all_others = torch.exp(lg(t + 1) - lg((t - j).clamp(min=0) + 1) - lg(t + m + 1) + lg(t + m - j + 1))
    all_others = torch.where(j > t, torch.zeros_like(all_others), all_others)  # fewer others than places
    return 1 - all_others


def _gallery_lse(image_embeds: Tensor, text_embeds: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    """(N_txt,) logsumexp over images of each text's scaled scores, (N_img,) logsumexp over texts of each image's."""
    kw = dict(device=image_embeds.device, dtype=torch.promote_types(image_embeds.dtype, text_embeds.dtype))
    lse_t = torch.empty(text_embeds.shape[0], **kw)
    lse_i = torch.full((image_embeds.shape[0],), float("-inf"), **kw)
    for s in range(0, text_embeds.shape[0], chunk):
        sim = scale * (image_embeds @ text_embeds[s : s + chunk].T)  # (N_img, c)
        lse_t[s : s + sim.shape[1]] = sim.logsumexp(0)
        lse_i = torch.logaddexp(lse_i, sim.logsumexp(1))
    return lse_t, lse_i


def gallery_normalized_scores(image_embeds: Tensor, text_embeds: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Scores (N_img, N_txt) for ranking texts for an image and images for a text, each normalised over the
    gallery of the other side ("inverted softmax", Smith et al. 2017; CAMoE's dual softmax at inference):

    * i2t: ``log softmax`` over IMAGES of every text's scaled cosine, i.e. the contrastive model's estimate of
      log p(image | text). Ranking a query image's texts by it prefers a text that fits this image and few others
      over a generic text that fits every image, which plain cosine cannot tell apart; it is the Bayes rule the
      shapes data's ``i2t_r1`` ceiling assumes (pick the fitting caption that fits the fewest gallery images).
    * t2i: ``log softmax`` over TEXTS of every image's scaled cosine (log p(text | image)), which discounts "hub"
      images that are close to every text.

    ``scale`` is the model's learned logit scale (the temperature its InfoNCE calibrated). Needs the whole gallery.
    """
    sim = scale * (image_embeds @ text_embeds.T)
    return sim.log_softmax(0), sim.log_softmax(1)


def recall_from_candidates(
    i2t_candidates: Tensor,
    i2t_scores: Tensor,
    t2i_candidates: Tensor,
    t2i_scores: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K over scored candidate lists (e.g. re-ranked top-N lists): ``i2t_candidates`` (N_img, n) text
    indices with their ``i2t_scores`` (N_img, n), ``t2i_candidates`` (N_txt, n) image indices with ``t2i_scores``.
    Equal scores are ties broken at random in expectation, as in :func:`retrieval_metrics` (identical captions of
    several images score alike: which one a sort puts first is not the model's choice). A query whose own item is
    not among its candidates misses. K larger than the lists' width is not reported."""
    text_to_image = text_to_image.to(i2t_candidates.device).long()
    n_img = i2t_candidates.shape[0]
    own_i = text_to_image[i2t_candidates] == torch.arange(n_img, device=i2t_candidates.device)[:, None]
    own_t = t2i_candidates == text_to_image[:, None]
    out = {}
    for which, own, scores in (("i2t", own_i, i2t_scores), ("t2i", own_t, t2i_scores)):
        scores = scores.to(own.device).double()
        best = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values  # (Q, 1)
        found = own.any(1)
        better = ((scores > best) & ~own).sum(1)
        level = scores == best
        ties, level_own = (level & ~own).sum(1), (level & own).sum(1).clamp(min=1)
        for k in ks:
            if k > i2t_candidates.shape[1] or k > t2i_candidates.shape[1]:
                continue
            hits = torch.zeros(own.shape[0], dtype=torch.double, device=own.device)
            if found.any():
                hits[found] = _expected_hit_rates(better[found], ties[found], k, level_own[found])
            out[f"{which}_r{k}"] = hits.mean().item()
    return out


def recall_from_rankings(
    i2t_ranked: Tensor, t2i_ranked: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K from explicit top-k lists (e.g. after re-ranking): ``i2t_ranked`` (N_img, k) text indices,
    ``t2i_ranked`` (N_txt, k) image indices, best first. K larger than the lists' width is not reported."""
    text_to_image = text_to_image.to(i2t_ranked.device).long()
    n_img = i2t_ranked.shape[0]
    out = {}
    for k in ks:
        if k > i2t_ranked.shape[1] or k > t2i_ranked.shape[1]:
            continue
        hit_i = (text_to_image[i2t_ranked[:, :k]] == torch.arange(n_img, device=i2t_ranked.device)[:, None]).any(1)
        hit_t = (t2i_ranked[:, :k] == text_to_image[:, None]).any(1)
        out[f"i2t_r{k}"] = hit_i.float().mean().item()
        out[f"t2i_r{k}"] = hit_t.float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------- captions
_NO_JAVA_WARNED = False  # caption_metrics warns about a missing java once per process


def java_available() -> bool:
    return shutil.which("java") is not None


def _plain_tokenize(refs: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    # What the PTB tokenizer does to ordinary captions, closely enough to score without Java: lowercase,
    # punctuation removed, whitespace normalised.
    strip = re.compile(r"[^\w\s']")
    return {k: [" ".join(strip.sub(" ", c.lower()).split()) for c in v] for k, v in refs.items()}


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    meteor: bool = True,
) -> dict[str, float | None]:
    """BLEU-1..4, CIDEr-D, ROUGE-L and METEOR of ``predictions`` (one caption per key) against ``references``
    (all reference captions per key), with pycocoevalcap. Keys must match exactly."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(f"caption_metrics: keys differ (missing predictions: {len(missing)}, extra: {len(extra)})")
    if not predictions:
        raise ValueError("caption_metrics: no predictions")
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise ValueError(f"caption_metrics: {len(empty)} images have no reference caption, e.g. {empty[:3]}")
    keys = list(references)
    # one line per caption: pycocoevalcap hands the PTB tokenizer the captions joined by newlines, and Java also
    # breaks lines at \r, \f and U+2028, which would shift every later caption onto another image's key
    res_raw = {k: [" ".join(predictions[k].split())] for k in keys}
    gts_raw = {k: [" ".join(c.split()) for c in references[k]] for k in keys}
    have_java = java_available()
    if have_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts_raw.items()})
        res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res_raw.items()})
    else:
        global _NO_JAVA_WARNED
        if not _NO_JAVA_WARNED:  # once per process: an evaluation calls this for every split and reference score
            _NO_JAVA_WARNED = True
            warnings.warn(
                "java not found: captions tokenized without the PTB tokenizer (a close stand-in) and METEOR skipped "
                "(reported as None) in this process; install Java for the reference scores",
                stacklevel=2,
            )
        gts, res = _plain_tokenize(gts_raw), _plain_tokenize(res_raw)
    # pycocoevalcap's BLEU asserts a non-empty hypothesis; an empty generated caption scores as a lone token
    res = {k: [v[0] if v and v[0].strip() else "<empty>"] for k, v in res.items()}
    out: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for i, b in enumerate(bleu, 1):
        out[f"bleu{i}"] = float(b)
    out["cider"] = float(Cider().compute_score(gts, res)[0])  # pycocoevalcap's Cider is CIDEr-D
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["meteor"] = None
    if meteor and have_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java process; its __del__ ends it, so drop our reference once done
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    return out


# ---------------------------------------------------------------------------------------------- grounding
def token_heatmap(weights: Tensor, grids: Sequence[tuple[int, int]]) -> Tensor:
    """Spread attention weights over image tokens back onto the image plane.

    ``weights`` (..., L) over the concatenated tokens of several stages with token grids ``grids`` (row-major
    tokens, stages in order); every stage's map is upsampled (nearest) to the finest grid and the stages summed,
    so the result (..., H_f, W_f) keeps the total weight of every place whatever stage carried it.
    """
    sizes = [h * w for h, w in grids]
    if weights.shape[-1] != sum(sizes):
        raise ValueError(f"weights have {weights.shape[-1]} tokens; the grids {list(grids)} hold {sum(sizes)}")
    Hf = max(h for h, _ in grids)
    Wf = max(w for _, w in grids)
    lead = weights.shape[:-1]
    flat = weights.reshape(-1, weights.shape[-1]).float()
    out = flat.new_zeros(flat.shape[0], Hf, Wf)
    for part, (h, w) in zip(flat.split(sizes, dim=-1), grids):
        m = part.view(-1, 1, h, w)
        # nearest upsampling, normalised by the area a coarse cell covers so each stage keeps its total mass
        up = F.interpolate(m, size=(Hf, Wf), mode="nearest")[:, 0] * (h * w) / (Hf * Wf)
        out += up
    return out.view(*lead, Hf, Wf)


def grounding_hits(heatmaps: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Whether the peak of each heatmap lies inside its box.

    Args:
        heatmaps: (N, h, w) maps over the image.
        boxes: (N, 4) ``x0, y0, x1, y1`` in pixels of an image of ``image_size`` = (H, W).
    Returns:
        bool (N,): the centre of the peak cell is inside the box (edges included).
    """
    N, h, w = heatmaps.shape
    H, W = image_size
    idx = heatmaps.reshape(N, -1).argmax(1)
    cy = ((idx // w).float() + 0.5) * H / h
    cx = ((idx % w).float() + 0.5) * W / w
    b = boxes.to(heatmaps.device).float()
    return (cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])


def grounding_hits_any(heatmaps: Tensor, boxes: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
    """Like :func:`grounding_hits`, but heatmap ``i`` scores a hit when its peak lies in ANY of ``boxes[i]``
    ((k_i, 4) each): a phrase such as "a blue cross" may truthfully refer to several objects."""
    N, h, w = heatmaps.shape
    H, W = image_size
    idx = heatmaps.reshape(N, -1).argmax(1)
    cy = ((idx // w).float() + 0.5) * H / h
    cx = ((idx % w).float() + 0.5) * W / w
    hits = []
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32, device=heatmaps.device).reshape(-1, 4)
        inside = (cx[i] >= b[:, 0]) & (cx[i] <= b[:, 2]) & (cy[i] >= b[:, 1]) & (cy[i] <= b[:, 3])
        hits.append(bool(inside.any()))
    return torch.tensor(hits, dtype=torch.bool)


def grounding_misses(
    heatmaps: Tensor, boxes: Sequence[Tensor], others: Sequence[Tensor], image_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Where a miss of :func:`grounding_hits_any` went. A peak CELL (not just its centre) overlapping one of
    ``boxes[i]`` is ``near`` (the right object, the centre just outside its box: a matter of the map's
    resolution); otherwise one overlapping ``others[i]`` ((m_i, 4): the image's other objects) is on the ``other``
    object (the wrong object); the rest fall on the background. Returns bool (N,) ``near`` and ``other``, both
    False where the peak's centre is inside a box of ``boxes[i]`` (a hit)."""
    N, h, w = heatmaps.shape
    H, W = image_size
    idx = heatmaps.reshape(N, -1).argmax(1)
    row, col = (idx // w).float(), (idx % w).float()
    cell = torch.stack([col * W / w, row * H / h, (col + 1) * W / w, (row + 1) * H / h], 1)  # (N, 4) xyxy
    hit = grounding_hits_any(heatmaps, boxes, image_size)

    def overlaps(c: Tensor, b: Tensor) -> bool:
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
        return bool(((b[:, 0] < c[2]) & (b[:, 2] > c[0]) & (b[:, 1] < c[3]) & (b[:, 3] > c[1])).any())

    c = cell.cpu()
    near = [not hit[i] and overlaps(c[i], boxes[i]) for i in range(N)]
    other = [not hit[i] and not near[i] and overlaps(c[i], others[i]) for i in range(N)]
    return torch.tensor(near, dtype=torch.bool), torch.tensor(other, dtype=torch.bool)
