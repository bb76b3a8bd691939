"""What a trained shapes model knows at each image place, and where its words look: a diagnostic for grounding.

Two measurements on the shapes test split, for a checkpoint (Lightning ``.ckpt`` or exported directory):

1. **Linear probes** of the image tokens the decoder reads. For every object of the images with 1-2 objects, the
   token of each chosen encoder stage whose cell holds the object's box centre (and, as a control, the mean of all
   tokens) is a feature vector; a multinomial logistic regression (standardised features, L2, L-BFGS) trained on 70%
   of the objects predicts the object's shape, colour and size on the other 30%. High accuracy at the object's
   cell means the information is there, at that place, for the decoder's cross-attention to find.
2. **Word grounding by word kind**: greedy captions of the images (``mmxattn.viz.caption_attention``, what the
   notebook shows), and for every colour / shape word that names an object of the image, whether its heatmap's
   peak lies inside a box of such an object (the notebook test's rule; words that name nothing are skipped).

    .venv/bin/python benchmarks/grounding_probe.py --ckpt tests/fixtures/tiny_shapes [--images 1500] [--json out]

A shape word can only be grounded if the tokens at the object say which shape it is: probe accuracy near chance
(1/6 for shapes) at the object's cell means the decoder has nothing there to look at.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

import mmxattn
from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.data.shapes_render import COLOURS, SHAPE_PLURALS, SHAPES, objects_named
from mmxattn.metrics import grounding_hits_any
from mmxattn.viz import caption_attention

LABELS = ("shape", "colour", "size")  # the columns of a shapes sample's "labels"


def probe_accuracy(feats: torch.Tensor, y: torch.Tensor, train_frac: float = 0.7, l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression of ``y`` (N,) on ``feats`` (N, D)."""
    n_train = int(train_frac * len(y))
    if n_train < 2 or n_train >= len(y):
        raise ValueError(f"need more samples to probe: {len(y)}")
    x = feats.double()
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(k, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == y[n_train:]).double().mean())


def _cell(cx: float, cy: float, grid: tuple[int, int], size: tuple[int, int]) -> int:
    (h, w), (H, W) = grid, size
    return min(int(cy * h / H), h - 1) * w + min(int(cx * w / W), w - 1)


@torch.no_grad()
def probe(model: Any, ds: Any, batch: int = 50) -> dict[str, Any]:
    feats: dict[str, list[torch.Tensor]] = {}
    labels: list[list[int]] = []
    for i in range(0, len(ds), batch):
        items = [ds[j] for j in range(i, min(i + batch, len(ds)))]
        images = torch.cat([model.preprocess(Image.fromarray(s["image"])) for s in items])
        tokens = model.encode_image_tokens(images)  # (B, L, D)
        H, W = images.shape[-2:]
        grids = [model.visual.grid_sizes(H, W)[s] for s in model.stages]
        for s, tok in zip(items, tokens):
            if len(s["labels"]) > 2:  # with more objects a cell may hold parts of several
                continue
            parts = tok.split([h * w for h, w in grids])
            for (x0, y0, x1, y1), lab in zip(s["boxes"], s["labels"]):
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                for stage, part, grid in zip(model.stages, parts, grids):
                    feats.setdefault(f"stage {stage} token at the object", []).append(part[_cell(cx, cy, grid, (H, W))])
                feats.setdefault("mean of all tokens", []).append(tok.mean(0))
                labels.append([int(v) for v in lab[: len(LABELS)]])
    y = torch.tensor(labels)
    out: dict[str, Any] = {"objects": len(y)}
    for j, name in enumerate(LABELS):
        majority = Counter(y[:, j].tolist()).most_common(1)[0][1] / len(y)
        out[name] = {"chance": round(majority, 3)}
        for where, f in feats.items():
            out[name][where] = round(probe_accuracy(torch.stack(f), y[:, j]), 3)
    return out


def word_kind(word: str) -> str | None:
    if word in COLOURS:
        return "colour"
    if word in SHAPES or word in SHAPE_PLURALS:
        return "shape"
    return None


@torch.no_grad()
def grounding_by_kind(model: Any, ds: Any, n_images: int) -> dict[str, Any]:
    hits: Counter = Counter()
    seen: Counter = Counter()
    said: Counter = Counter()
    for i in range(min(n_images, len(ds))):
        s = ds[i]
        words, heat, _ = caption_attention(model, Image.fromarray(s["image"]))
        size = tuple(heat.shape[-2:])  # the heatmaps are at the image's pixels
        for j, word in enumerate(words):
            kind = word_kind(word)
            if kind is None:
                continue
            said[kind] += 1
            objs = objects_named(word, s["labels"])
            if not objs:  # a wrong word: it names nothing here
                continue
            hits[kind] += bool(grounding_hits_any(heat[j : j + 1], [s["boxes"][objs]], size)[0])
            seen[kind] += 1
    out: dict[str, Any] = {}
    for kind in ("colour", "shape"):
        out[kind] = {
            "said": said[kind],
            "correct": seen[kind],
            "peak_on_object": round(hits[kind] / seen[kind], 3) if seen[kind] else None,
        }
    total = sum(seen.values())
    out["all"] = round(sum(hits.values()) / total, 3) if total else None
    return out


@torch.no_grad()
def word_head_check(model: Any, ds: Any, n_images: int, batch: int = 50) -> dict[str, Any]:
    """For a model with a word head (trained with ``word_weight > 0``): does it tell which colours and shapes an
    image holds (probability > 0.5 of the word, a shape's singular or plural, against whether an object is so
    named), and does the word's map peak on such an object when there is one?"""
    # (kind, the word's forms): a shape's singular and plural are one word here
    groups = [("colour", (c,)) for c in COLOURS] + [("shape", forms) for forms in zip(SHAPES, SHAPE_PLURALS)]
    words = [w for _, forms in groups for w in forms]
    right: Counter = Counter()
    asked: Counter = Counter()
    pos: Counter = Counter()
    hits: Counter = Counter()
    for i in range(0, min(n_images, len(ds)), batch):
        items = [ds[j] for j in range(i, min(i + batch, n_images, len(ds)))]
        images = torch.cat([model.preprocess(Image.fromarray(s["image"])) for s in items])
        maps, present = model.word_maps(images, words)  # (B, K, h, w), (B, K): every word in one pass
        start = 0
        for kind, forms in groups:
            m = maps[:, start : start + len(forms)].amax(1)
            p = present[:, start : start + len(forms)].amax(1)
            start += len(forms)
            for s, heat, prob in zip(items, m, p):
                objs = objects_named(forms[0], s["labels"])
                asked[kind] += 1
                right[kind] += bool(prob > 0.5) == bool(objs)
                if objs:
                    pos[kind] += 1
                    hits[kind] += bool(grounding_hits_any(heat[None], [s["boxes"][objs]], images.shape[-2:])[0])
    return {
        kind: {
            "detection_acc": round(right[kind] / asked[kind], 3),
            "always_absent_acc": round(1 - pos[kind] / asked[kind], 3),
            "peak_on_object": round(hits[kind] / pos[kind], 3) if pos[kind] else None,
            "named_objects": pos[kind],
        }
        for kind in ("colour", "shape")
        if asked[kind]
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path, help="a Lightning checkpoint or an exported directory")
    p.add_argument("--images", type=int, default=1500, help="test images for the probes")
    p.add_argument("--caption-images", type=int, default=150, help="test images captioned for word grounding")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = mmxattn.load(a.ckpt)
    img_size = model.cfg.vision.img_size
    ds = ShapesDataModule(img_size=img_size, val_size=8, test_size=a.images, num_workers=0).dataset("test")
    out = {"ckpt": str(a.ckpt), "probe": probe(model, ds), "grounding": grounding_by_kind(model, ds, a.caption_images)}
    if getattr(model, "word_head", None) is not None:
        out["word_head"] = word_head_check(model, ds, a.caption_images)
    pr = out["probe"]
    print(f"linear probes on {pr['objects']} objects (held-out accuracy; chance = majority class):")
    for name in LABELS:
        row = ", ".join(f"{k}: {v}" for k, v in pr[name].items())
        print(f"  {name:7s} {row}")
    g = out["grounding"]
    print(f"word heatmap peaks on the named object ({a.caption_images} greedy captions):")
    for kind in ("colour", "shape"):
        print(f"  {kind:7s} {g[kind]['peak_on_object']} of {g[kind]['correct']} correct words ({g[kind]['said']} said)")
    print(f"  all     {g['all']}")
    if "word_head" in out:
        print(f"word head ({a.caption_images} images; a word is seen when its probability is > 0.5):")
        for kind, r in out["word_head"].items():
            print(
                f"  {kind:7s} present/absent right {r['detection_acc']} (always 'absent': {r['always_absent_acc']}); "
                f"map peak on a named object {r['peak_on_object']} of {r['named_objects']}"
            )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
