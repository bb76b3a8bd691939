"""Whole-set evaluation of an MMXAttn model: retrieval (with and without decoder re-ranking), captioning and
grounding. Plain PyTorch (no Lightning): the LightningModule's validation/test and ``python -m mmxattn.evaluate``
share it.

Feed eval batches (one item per image with all its reference captions; see ``mmxattn.data.datamodule``) to
:meth:`EvalAccumulator.update`, then :meth:`EvalAccumulator.compute`. Under ``torch.distributed`` every rank's
results are gathered and de-duplicated by image id (a DistributedSampler repeats images to even out ranks), so
every rank returns the metrics of the whole set.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .capture import capture_attention
from .data.batching import ground_tokens
from .data.robust import BadDataError
from .data.shapes_captions import NUMBERS, CaptionCheck, check_caption
from .data.shapes_render import COLOURS, SHAPES, Scene
from .metrics import (
    caption_metrics,
    grounding_hits_any,
    grounding_misses,
    recall_from_candidates,
    retrieval_metrics,
    token_heatmap,
)
from .model import RERANK_METHODS
from .zeroshot import zero_shot_classifier

__all__ = [
    "EvalAccumulator",
    "METRIC_KEYS",
    "ZEROSHOT_TASKS",
    "caption_check_metrics",
    "grounding_layer_names",
    "zeroshot_labels",
]

# Keys `python -m mmxattn.evaluate` always prints (None where a metric does not apply).
METRIC_KEYS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "cider", "bleu4", "grounding_acc", "n_images")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


# Zero-shot classification of shapes images (mmxattn.zeroshot): per task, the class names and the prompt templates,
# in the data's own grammar (shapes_captions: "[there is | a picture of] a red object", "two shapes"). Colour and
# shape have one answer on single-object images only; the count of objects on every image.
ZEROSHOT_TASKS: dict[str, tuple[tuple[str, ...], tuple[Any, ...]]] = {
    "colour": (
        COLOURS,
        (lambda c: f"{_a(c)} shape", lambda c: f"{_a(c)} object", lambda c: f"there is {_a(c)} object"),
    ),
    "shape": (SHAPES, (_a, lambda c: f"there is {_a(c)}", lambda c: f"a picture of {_a(c)}")),
    "count": (tuple(f"{NUMBERS[n]} shape{'s' * (n > 1)}" for n in range(1, 5)), ("{}", "a picture of {}")),
}


def zeroshot_labels(scene: Scene) -> tuple[int, int, int]:
    """The classes of ``scene`` in :data:`ZEROSHOT_TASKS` order: (colour, shape, count), as indices into each
    task's class names; colour and shape are -1 (no single answer) unless the scene has exactly one object."""
    one = scene.n == 1
    return (scene.colour[0] if one else -1, scene.shape[0] if one else -1, scene.n - 1)


def grounding_layer_names(model: Any, layers: Sequence[int] | None = None) -> list[str]:
    """Names of the decoder cross-attention layers whose maps grounding averages: ``layers`` (negative counts from
    the end; each once, in order) or all of them."""
    n = len(model.decoder.blocks)
    chosen = range(n) if layers is None else sorted({i % n for i in layers})
    return [f"decoder.blocks.{i}.cross_attn" for i in chosen]


def _gather_lists(items: list[Any]) -> list[Any]:
    """``items`` of every rank, rank by rank (``items`` itself without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return items


class EvalAccumulator:
    """Collects what the metrics need, batch by batch, and computes them on the whole set.

    Args:
        model: an :class:`~mmxattn.model.MMXAttn` with ``model.tokenizer`` attached (to decode captions).
        rerank: re-score the top ``rerank`` candidates of every query with the decoder (0 = off).
        rerank_with: "itm" (matching head), "lm" (caption likelihood) or "pmi" (caption likelihood over its prior
            for captions ranked for an image; see :meth:`mmxattn.model.MMXAttn.retrieve`).
        prior_images: images (evenly spaced over the set) that estimate the caption prior for "pmi".
        captions: generate captions and score them (off: no caption metrics).
        gen_kwargs: passed to ``model.generate`` (greedy by default).
        meteor: include METEOR (starts a Java process; slow to start, so off for frequent validation).
        grounding: score grounding on batches that carry ``boxes``/``groundings``.
        grounding_layers: decoder layers whose cross-attention is averaged (default: all).

    Batches that carry ``scenes`` (shapes data) also score the GENERATED captions: ``caption_fit`` (share of images
    whose caption parses and is true of the image), ``caption_parsed``, ``caption_unnamed`` (share of the captions'
    object phrases that name no object in the image) and ``grounding_acc_gen``: grounding as ``grounding_acc``, on
    the words of the model's own captions (each phrase's objects from
    :func:`mmxattn.data.shapes_captions.check_caption`). ``grounding_acc`` teacher-forces the references, so the
    query that predicts a phrase's first word cannot know which of the image's objects the reference will name;
    in its own caption the model chose the object.

    Batches with ``scenes`` also score zero-shot classification (``zeroshot=True``; :mod:`mmxattn.zeroshot`, the
    retrieval embeddings only, at the cost of one text-encoder pass over the class prompts):
    ``zeroshot_colour_acc`` and ``zeroshot_shape_acc`` over the ``zeroshot_n_single`` single-object images (the only
    ones with one colour and one shape), ``zeroshot_count_acc`` (how many objects: one to four) over all of them,
    each with ``zeroshot_<task>_majority``, the accuracy of always the most frequent class over the same images;
    prompts in :data:`ZEROSHOT_TASKS`.
    """

    def __init__(
        self,
        model: Any,
        *,
        rerank: int = 10,
        rerank_with: str = "itm",
        captions: bool = True,
        gen_kwargs: Mapping[str, Any] | None = None,
        meteor: bool = False,
        grounding: bool = True,
        grounding_layers: Sequence[int] | None = None,
        prior_images: int = 8,
        zeroshot: bool = True,
    ) -> None:
        if rerank_with not in RERANK_METHODS:
            raise ValueError(f"rerank_with must be one of {RERANK_METHODS}, got {rerank_with!r}")
        self.model = model
        self.rerank = rerank if model.itm_head is not None or rerank_with != "itm" else 0
        self.prior_images = prior_images
        self.rerank_with = rerank_with
        self.captions = captions
        self.gen_kwargs = dict(gen_kwargs or {"strategy": "greedy"})
        self.meteor = meteor
        self.grounding = grounding
        self.grounding_names = grounding_layer_names(model, grounding_layers)
        self.zeroshot = zeroshot
        self.reset()

    def reset(self) -> None:
        self.records: list[dict[str, Any]] = []  # one per image, on the CPU
        self.skipped: list[tuple[str, str]] = []  # (source, reason) of the broken samples the loader dropped

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one evaluation batch (an ``EvalCollate`` batch; its broken samples are counted, and a batch of
        broken samples only, which has no ``images``, adds nothing else)."""
        self.skipped.extend((str(src), str(why)) for src, why in batch.get("skipped", ()))
        if "images" not in batch:
            return
        m = self.model
        images = batch["images"]
        ref_ids = batch["ref_ids"].to(images.device)
        ref_img = batch["ref_image_index"].to(images.device)
        tokens = m.encode_image_tokens(images)  # (B, L, D)
        img_emb = F.normalize(m.pooler(tokens), dim=-1)
        txt, states = m.text(ref_ids)
        txt_emb = F.normalize(txt, dim=-1)
        preds: list[str | None] = [None] * images.shape[0]
        if self.captions:
            preds = m.tokenizer.batch_decode(m.generate(image_tokens=tokens, **self.gen_kwargs))
        hits = gen = None
        if self.grounding and "groundings" in batch and "boxes" in batch:
            hits = self._hits(batch, tokens, states, ref_img, batch["groundings"])
        scenes = batch.get("scenes") if self.captions else None
        checks = None
        if scenes is not None:
            checks = [check_caption(p, sc if isinstance(sc, Scene) else Scene(*sc)) for p, sc in zip(preds, scenes)]
        if checks is not None and hits is not None and hasattr(m.tokenizer, "word_token_positions"):
            # the model's own captions, teacher-forced: the same attention as while it generated them
            gen_ids = m.tokenizer(preds).to(images.device)
            per_image = [[ground_tokens(m.tokenizer, p, c.groundings) if c else []] for p, c in zip(preds, checks)]
            gen = self._hits(
                batch, tokens, m.text(gen_ids)[1], torch.arange(len(preds), device=images.device), per_image
            )
        labels = None
        if self.zeroshot and batch.get("scenes") is not None:
            labels = [zeroshot_labels(sc if isinstance(sc, Scene) else Scene(*sc)) for sc in batch["scenes"]]
        for i, image_id in enumerate(batch["image_ids"]):
            sel = ref_img == i
            self.records.append(
                {
                    "image_id": image_id,
                    "image_embed": img_emb[i].float().cpu(),
                    "tokens": tokens[i].cpu() if self.rerank else None,
                    "text_embeds": txt_emb[sel].float().cpu(),
                    "ref_ids": ref_ids[sel].cpu(),
                    "references": list(batch["references"][i]),
                    "prediction": preds[i],
                    "grounding": hits[i] if hits is not None else None,
                    "checked": checks is not None,
                    "check": checks[i] if checks is not None else None,
                    "grounding_gen": gen[i] if gen is not None else None,
                    "zeroshot": labels[i] if labels is not None else None,
                }
            )

    def _hits(self, batch, tokens, states, image_index, groundings) -> list[tuple[int, ...]]:
        """Per image (hits, total, near misses, misses on another object, hits on a phrase's first word, first
        words) over every (word, object) pair with a box (see :func:`~mmxattn.metrics.grounding_misses`).
        ``states``: text states of caption rows ordered by image (``image_index``); ``groundings``: per image, per
        row, [(token positions, object)]."""
        m = self.model
        with capture_attention(m, which=self.grounding_names) as maps:
            m.decoder(states[:, :-1], tokens, image_index=image_index)  # teacher-forced over every row
        # (R, T-1, L): mean over heads and the chosen layers. Query t predicts token t+1, so a word at token
        # position p is looked for at query p-1: where the model looks when it says that word.
        att = torch.stack([maps[n].mean(1) for n in self.grounding_names]).mean(0)
        H, W = batch["images"].shape[-2:]
        grids = m.visual.grid_sizes(H, W)
        grids = [grids[s] for s in m.stages]
        out = []
        ref_base = 0
        for i, per_ref in enumerate(groundings):
            boxes_i = torch.as_tensor(batch["boxes"][i], dtype=torch.float32).reshape(-1, 4)
            rows, boxes, others, first = [], [], [], []
            for r, pairs in enumerate(per_ref):
                # a phrase lists one pair per object it may truthfully name: a hit on any of them counts
                phrase: dict[tuple[int, ...], list[int]] = {}
                for positions, obj in pairs:
                    phrase.setdefault(tuple(positions), []).append(int(obj))
                for positions, objs in phrase.items():
                    for j, p in enumerate(positions):
                        if 1 <= p <= att.shape[1]:
                            first.append(j == 0)
                            rows.append(att[ref_base + r, p - 1])
                            boxes.append(boxes_i[objs])
                            others.append(boxes_i[[k for k in range(len(boxes_i)) if k not in objs]])
            ref_base += len(per_ref)
            if rows:
                maps = token_heatmap(torch.stack(rows), grids)
                hit = grounding_hits_any(maps, boxes, (H, W))
                near, other = grounding_misses(maps, boxes, others, (H, W))
                is_first = torch.tensor(first, dtype=torch.bool)
                out.append(
                    (
                        int(hit.sum()),
                        len(rows),
                        int(near.sum()),
                        int(other.sum()),
                        int((hit & is_first).sum()),
                        int(is_first.sum()),
                    )
                )
            else:
                out.append((0, 0, 0, 0, 0, 0))
        return out

    # ------------------------------------------------------------------ whole set
    def skipped_samples(self) -> list[tuple[str, str]]:
        """The broken samples skipped so far, across ranks, each once (a padded sampler repeats some)."""
        return list(dict.fromkeys(_gather_lists(self.skipped)))

    def _gathered(self) -> list[dict[str, Any]]:
        records = _gather_lists(self.records)
        seen, unique = set(), []
        for r in records:  # DistributedSampler pads ranks with repeated images
            if r["image_id"] not in seen:
                seen.add(r["image_id"])
                unique.append(r)
        return unique

    @torch.no_grad()
    def compute(self) -> dict[str, float | int | None]:
        recs = self._gathered()
        skipped = self.skipped_samples()
        if not recs:
            if skipped:
                raise BadDataError(
                    f"evaluation: every one of the {len(skipped)} samples was broken and skipped, e.g. "
                    + "; ".join(f"{src}: {why}" for src, why in skipped[:5])
                )
            raise RuntimeError("EvalAccumulator.compute: no evaluation batches were seen")
        if skipped:
            warnings.warn(
                f"evaluation: {len(skipped)} broken sample(s) skipped (metrics are over the other {len(recs)} "
                f"images), e.g. " + "; ".join(f"{src}: {why}" for src, why in skipped[:3]),
                stacklevel=2,
            )
        img = torch.stack([r["image_embed"] for r in recs])
        txt = torch.cat([r["text_embeds"] for r in recs])
        t2i = torch.cat([torch.full((len(r["text_embeds"]),), i, dtype=torch.long) for i, r in enumerate(recs)])
        out: dict[str, float | int | None] = {
            "n_images": len(recs),
            "n_texts": int(txt.shape[0]),
            "n_skipped": len(skipped),
        }
        # plain cosine recall, and recall of the gallery-normalised scores (inverted softmax at the model's own
        # temperature: log p(image | text) ranks texts for an image; see metrics.gallery_normalized_scores)
        out.update(retrieval_metrics(img, txt, t2i, norm_scale=float(self.model.get_logit_scale())))
        if self.rerank:
            out.update({f"{k}_rerank": v for k, v in self._reranked(recs, img, txt, t2i).items()})
        for k in ("cider", "bleu4", "bleu1", "rouge_l", "meteor"):
            out[k] = None
        if self.captions:
            preds = {i: r["prediction"] for i, r in enumerate(recs)}
            refs = {i: r["references"] for i, r in enumerate(recs)}
            out.update(caption_metrics(preds, refs, meteor=self.meteor))
        for key, suffix in (("grounding", ""), ("grounding_gen", "_gen")):
            g = [r[key] for r in recs if r[key] is not None]
            total = sum(x[1] for x in g)
            out["grounding_acc" + suffix] = sum(x[0] for x in g) / total if total else None
            out["grounding_n" + suffix] = total
            # where the misses went, as shares of all words: the named object's box just missed by the peak's
            # centre (resolution), another object (binding), the rest on the background
            out["grounding_near" + suffix] = sum(x[2] for x in g) / total if total else None
            out["grounding_other" + suffix] = sum(x[3] for x in g) / total if total else None
            # by the word's place in its phrase: the query that predicts a phrase's first word has not yet read
            # which object the caption names (a reference's choice it cannot know); later words' queries have
            n_first = sum(x[5] for x in g)
            out["grounding_acc_first" + suffix] = sum(x[4] for x in g) / n_first if n_first else None
            n_later = total - n_first
            out["grounding_acc_later" + suffix] = sum(x[0] - x[4] for x in g) / n_later if n_later else None
        out.update(caption_check_metrics([r["check"] for r in recs if r["checked"]]))
        out.update(self._zero_shot(recs, img))
        return out

    def _zero_shot(self, recs: list[dict[str, Any]], img: Tensor) -> dict[str, float | int | None]:
        """Zero-shot accuracy of every task of :data:`ZEROSHOT_TASKS` (None where no image has its label)."""
        out: dict[str, float | int | None] = {f"zeroshot_{t}_acc": None for t in ZEROSHOT_TASKS}
        out |= {f"zeroshot_{t}_majority": None for t in ZEROSHOT_TASKS}
        rows = [i for i, r in enumerate(recs) if r.get("zeroshot") is not None]
        labels = torch.tensor([recs[i]["zeroshot"] for i in rows], dtype=torch.long).reshape(-1, len(ZEROSHOT_TASKS))
        out["zeroshot_n_single"] = int((labels[:, 0] >= 0).sum())
        if not rows or getattr(self.model, "tokenizer", None) is None:
            return out
        emb = img[rows]  # (n, E), CPU float32
        for j, (task, (names, templates)) in enumerate(ZEROSHOT_TASKS.items()):
            keep = labels[:, j] >= 0
            if keep.any():
                # the baseline over the same images: always the class most frequent among them
                out[f"zeroshot_{task}_majority"] = int(labels[keep, j].bincount().max()) / int(keep.sum())
                w = zero_shot_classifier(self.model, list(names), list(templates)).cpu()  # (E, C)
                pred = (emb[keep] @ w).argmax(1)  # the logit scale and the softmax change no argmax
                out[f"zeroshot_{task}_acc"] = int((pred == labels[keep, j]).sum()) / int(keep.sum())
        return out

    def _reranked(self, recs, img: Tensor, txt: Tensor, t2i: Tensor) -> dict[str, float]:
        m = self.model
        dev = m.logit_scale.device
        tokens = torch.stack([r["tokens"] for r in recs])  # (N_img, L, D)
        ids = torch.cat([r["ref_ids"] for r in recs])  # (N_txt, T)
        sim = img @ txt.T
        n = min(self.rerank, sim.shape[1], sim.shape[0])
        ranked = []
        for scores, query_is_image in ((sim, True), (sim.T, False)):
            top = scores.topk(min(self.rerank, scores.shape[1]), dim=1).indices  # (Q, n)
            q = torch.arange(scores.shape[0])[:, None].expand_as(top).reshape(-1)
            c = top.reshape(-1)
            im, tx = (q, c) if query_is_image else (c, q)
            # chunks of whole queries: an image query's candidates then read it as one block (no K/V gather), and a
            # text query's candidates share one text-encoder pass
            chunk = max(1, 512 // top.shape[1]) * top.shape[1]
            new = []
            for a, b in zip(im.split(chunk), tx.split(chunk)):
                uniq, inv = b.unique(return_inverse=True)
                states = m.text(ids[uniq].to(dev))[1][inv.to(dev)]
                new.append(m.pair_scores(tokens, a, ids[b].to(dev), states, self.rerank_with))
            new = torch.cat(new).cpu().view_as(top)
            if self.rerank_with == "pmi" and query_is_image:
                new = new - self._log_prior(tokens, ids, top)[top]
            ranked.append((top, new))
        # ties (identical captions score alike) count at chance, as in the plain recall
        (i2t_c, i2t_s), (t2i_c, t2i_s) = ranked
        return recall_from_candidates(i2t_c, i2t_s, t2i_c, t2i_s, t2i, ks=[k for k in (1, 5, 10) if k <= n])

    def _log_prior(self, tokens: Tensor, ids: Tensor, top: Tensor) -> Tensor:
        """(N_txt,) log prior of the captions among the candidates ``top`` (0 elsewhere: never read), estimated on
        ``prior_images`` images evenly spaced over the set."""
        m = self.model
        dev = m.logit_scale.device
        ref = torch.linspace(0, tokens.shape[0] - 1, min(self.prior_images, tokens.shape[0])).round().long()
        cand = top.unique()
        prior = torch.zeros(ids.shape[0])
        prior[cand] = torch.cat(
            [m.caption_log_prior(tokens[ref].to(dev), ids[b].to(dev)).cpu() for b in cand.split(512)]
        )
        return prior


def caption_check_metrics(checks: Sequence[CaptionCheck | None]) -> dict[str, float | None]:
    """Scores of generated captions checked against their images (:func:`~mmxattn.data.shapes_captions.check_caption`
    per caption; None = did not parse): ``caption_fit`` (share true of their image), ``caption_parsed`` and
    ``caption_unnamed`` (share of object phrases naming no object in the image). None without checks."""
    n = len(checks)
    phrases = sum(c.n_phrases for c in checks if c is not None)
    return {
        "caption_fit": sum(c is not None and c.fits for c in checks) / n if n else None,
        "caption_parsed": sum(c is not None for c in checks) / n if n else None,
        "caption_unnamed": sum(c.n_unnamed for c in checks if c is not None) / phrases if phrases else None,
    }
