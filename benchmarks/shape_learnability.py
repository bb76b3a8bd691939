"""How fast can an image encoder learn the shapes of the embedded data set? A side-by-side, same data, same steps.

Each model classifies the shape (6 classes) of single-object shapes images, 64 px, batch 32, AdamW, for
``--steps`` steps on fresh images (no image twice), then is scored on 300 held-out single-object images. Models:

* ``cat_shapes`` / ``cat_pico``: the CAT encoders of ``mmx_shapes`` / ``mmx_tiny``, final stage mean-pooled, a
  linear head;
* ``cat_shapes+convstem``: the same with its 4x4 patchify stem replaced by a small convolutional stem (two 3x3
  conv + ReLU + 2x2 max-pool blocks and two 3x3 convs: stride 4, receptive field 18 px; Xiao et al. 2021, "Early
  convolutions help transformers see better");
* ``cat_shapes+maxpool``: max- instead of mean-pooling the final tokens (as the CNN control does);
* ``vit``: timm's ViT (patch 4, width 64, depth 3, 2 heads, class token), the plain-transformer control;
* ``cnn``: four 3x3 conv + ReLU blocks with max-pooling and a global max-pool, the convolutional control.

``--targets`` picks what is taught (``--max-objects`` above 1 puts 1-N objects in each image):

* ``shape`` (default): the one object's shape, 6-way cross-entropy (needs ``--max-objects 1``);
* ``shape-words``: multi-label, which of the 6 shape names (singular or plural) the image's 5 captions say, binary
  cross-entropy per word: a caption-supervised task with only the shape words;
* ``caption-words``: multi-label over EVERY word of the data set's vocabulary the captions say (colours, sizes,
  counts, places, function words), as the captioner's word head (``mmxattn.losses.WordPresenceLoss``) is taught.

The multi-label tasks are scored by each shape word's ROC AUC against the images' true shapes (mean over the 6
words; 0.5 = blind) and by present/absent accuracy at probability 0.5 against the "always absent" rate. Readout
``--pool mil`` scores every token and takes each word's best (the word head's readout), where ``max`` pools first.

Why: the captioners trained on the shapes data say the right colours and sizes but guess shapes (a linear probe of
their image tokens finds no shape information; ``benchmarks/grounding_probe.py``). This asks whether the encoder
can learn shape at all at this budget when told the answer directly.

    .venv/bin/python benchmarks/shape_learnability.py [--models cnn,cat_shapes,vit] [--steps 300] [--lr 1e-3]
        [--seed 0] [--warmup 100]                        # linear warmup then cosine (default: constant lr)
        [--stage 1 --pool max --skip-cpsa 1 --stem conv]  # CAT models: stage read out, pooling, CPSA skipped, stem
        [--targets caption-words --max-objects 4]          # multi-label: words of the captions, 1-4 objects
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.data.shapes_render import SHAPE_PLURALS, SHAPES
from mmxattn.data.transforms import build_transforms
from mmxattn.lit.optim import warmup_cosine
from mmxattn.presets import create_encoder
from mmxattn.text.towers import ImageTokenProjector

MODELS = ("cnn", "cat_shapes", "cat_shapes+convstem", "cat_shapes+maxpool", "cat_pico", "vit")


class _PooledEncoder(nn.Module):
    """A CAT encoder's tokens of one stage (default the last), mean- or max-pooled, then a linear classifier."""

    def __init__(self, name: str, n_classes: int, pool: str = "mean", stage: int = -1, **overrides: Any) -> None:
        super().__init__()
        self.encoder = create_encoder(name, **overrides)
        self.stage = stage % len(self.encoder.stage_dims)
        self.head = nn.Linear(self.encoder.stage_dims[self.stage], n_classes)
        self.pool = pool
        self.proj: ImageTokenProjector | None = None

    def project(self, width: int) -> None:
        """Read the tokens as the captioner does: through an ``ImageTokenProjector`` (LayerNorm, Linear to
        ``width``, position code, LayerNorm), then the head."""
        self.proj = ImageTokenProjector([self.encoder.stage_dims[self.stage]], width)
        self.head = nn.Linear(width, self.head.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x, stages=[self.stage])[0]  # (B, L, C)
        if self.proj is not None:
            grid = self.encoder.grid_sizes(x.shape[-2], x.shape[-1])[self.stage]
            tokens = self.proj([tokens], [grid])
        if self.pool == "mil":  # every token scores every class, each class takes its best token
            return self.head(tokens).amax(1)
        return self.head(tokens.amax(1) if self.pool == "max" else tokens.mean(1))


def _conv_block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])


class _Skip(nn.Module):
    """Stands in for a CAT block: passes the stream through unchanged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def build(
    name: str,
    n_classes: int = len(SHAPES),
    stage: int = -1,
    skip_cpsa: tuple[int, ...] = (),
    pool: str | None = None,
    stem: str | None = None,
    project: int = 0,
) -> nn.Module:
    """A model of :data:`MODELS`; for the CAT ones, ``stage`` is the stage read out, ``skip_cpsa`` the stages whose
    cross-patch (CPSA) blocks are replaced by the identity, ``pool`` ("mean"/"max"/"mil") overrides the name's pooling,
    ``stem`` overrides the preset's ``CATConfig.stem`` ("patch" / "conv"), ``project`` > 0 reads the tokens
    through the captioner's projection to that width (:meth:`_PooledEncoder.project`)."""
    if name == "cnn":
        return nn.Sequential(
            *_conv_block(3, 32, True), *_conv_block(32, 64, True), *_conv_block(64, 128, True),
            *_conv_block(128, 128, False), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, n_classes),
        )  # fmt: skip
    if name == "vit":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=4, embed_dim=64, depth=3, num_heads=2,
            num_classes=n_classes,
        )  # fmt: skip
    model = _build_cat(name, n_classes, stage, pool, **({"stem": stem} if stem else {}))
    if project:
        model.project(project)
    for k in skip_cpsa:
        blocks = model.encoder.layers[k].cpsa_blocks
        for i in range(len(blocks)):
            blocks[i] = _Skip()
    return model


def _build_cat(name: str, n_classes: int, stage: int, pool_override: str | None, **overrides: Any) -> nn.Module:
    pool = "mean"
    if name.endswith("+maxpool"):
        name, pool = name.removesuffix("+maxpool"), "max"
    pool = pool_override or pool
    if name.endswith("+convstem"):
        model = _PooledEncoder(name.removesuffix("+convstem"), n_classes, pool, stage, **overrides)
        c = model.encoder.stage_dims[0]
        # replaces the patchify conv inside the stem; the stem's padding to a multiple of 4 and LayerNorm stay
        model.encoder.patch_embed.proj = nn.Sequential(
            *_conv_block(3, 32, True),
            *_conv_block(32, 64, True),
            *_conv_block(64, 64, False),
            nn.Conv2d(64, c, 3, 1, 1),
        )
        return model
    if name.startswith("cat_"):
        return _PooledEncoder(name, n_classes, pool, stage, **overrides)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _batch(ds: Any, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(start, start + n)]
    x = torch.stack([it["image"] for it in items])
    y = torch.tensor([int(it["labels"][0][0]) for it in items])
    return x, y


TARGETS = ("shape", "shape-words", "caption-words")
_SHAPE_OF_WORD = {w: k for names in (SHAPES, SHAPE_PLURALS) for k, w in enumerate(names)}


def _word_columns(targets: str, tokenizer: Any) -> tuple[list[str], list[int]]:
    """The multi-label task's column words and, per shape, its column (the singular name)."""
    if targets == "shape-words":
        return list(SHAPES), list(range(len(SHAPES)))
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id}
    words = [w for i, w in enumerate(tokenizer.vocab) if i not in specials]
    return words, [words.index(s) for s in SHAPES]


def _multilabel_batch(
    ds: Any, start: int, n: int, columns: list[str], shape_words_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, caption-word targets (n, len(columns)) and true shape presence (n, 6)."""
    items = [ds[i] for i in range(start, start + n)]
    x = torch.stack([it["image"] for it in items])
    col = {w: j for j, w in enumerate(columns)}
    said = torch.zeros(n, len(columns))
    truth = torch.zeros(n, len(SHAPES))
    for b, it in enumerate(items):
        truth[b, [int(r[0]) for r in it["labels"]]] = 1
        for caption in it["captions"]:
            for w in caption.split():
                if shape_words_only and w in _SHAPE_OF_WORD:
                    said[b, _SHAPE_OF_WORD[w]] = 1
                elif not shape_words_only and w in col:
                    said[b, col[w]] = 1
    return x, said, truth


def shape_auc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over shapes of the ROC AUC of ``scores`` (n, 6) against true presence ``truth`` (n, 6) (ties count
    half); shapes with no positive or no negative image are left out."""
    aucs = []
    for k in range(truth.shape[1]):
        pos, neg = scores[truth[:, k] > 0, k], scores[truth[:, k] == 0, k]
        if len(pos) and len(neg):
            d = pos[:, None] - neg[None, :]
            aucs.append(((d > 0).double().mean() + 0.5 * (d == 0).double().mean()).item())
    return sum(aucs) / len(aucs) if aucs else float("nan")


def _train(
    model: nn.Module, steps: int, lr: float, warmup: int, step_loss: Callable[[int], torch.Tensor]
) -> tuple[list[float], float]:
    """AdamW on ``step_loss(step)`` for ``steps`` steps; the captioner's schedule (linear warmup, then cosine to 0)
    when ``warmup`` > 0, else a constant lr. Returns the losses and the seconds taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = warmup_cosine(opt, warmup, steps) if warmup else None
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


def run(
    name: str,
    steps: int,
    lr: float,
    batch: int = 32,
    seed: int = 0,
    test_images: int = 300,
    warmup: int = 0,
    targets: str = "shape",
    max_objects: int = 1,
    **build_kw: Any,
) -> dict[str, Any]:
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if targets == "shape" and max_objects != 1:
        raise ValueError("targets='shape' classifies the one object of each image: use max_objects=1")
    torch.manual_seed(seed)
    dm = ShapesDataModule(
        img_size=64, train_size=steps * batch, val_size=8, test_size=test_images, num_workers=0, seed=seed,
        min_objects=1, max_objects=max_objects,
    )  # fmt: skip
    train = dm.dataset("train", build_transforms(64, False))
    test = dm.dataset("test", build_transforms(64, False))
    if targets != "shape":
        return _run_multilabel(name, steps, lr, batch, targets, dm, train, test, test_images, warmup, build_kw)
    model = build(name, **build_kw).train()

    def step_loss(step: int) -> torch.Tensor:
        x, y = _batch(train, step * batch, batch)
        return F.cross_entropy(model(x), y)

    losses, seconds = _train(model, steps, lr, warmup, step_loss)
    model.eval()
    with torch.no_grad():
        x, y = _batch(test, 0, test_images)
        acc = (model(x).argmax(1) == y).double().mean().item()
    tail = losses[-max(1, steps // 10) :]
    return {
        "model": name,
        "steps": steps,
        "test_accuracy": round(acc, 3),
        "final_loss": round(sum(tail) / len(tail), 3),
        "chance_loss": round(float(torch.tensor(len(SHAPES)).log()), 3),
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _run_multilabel(
    name: str, steps: int, lr: float, batch: int, targets: str, dm: Any, train: Any, test: Any, test_images: int,
    warmup: int, build_kw: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    columns, shape_cols = _word_columns(targets, dm.tokenizer)
    words_only = targets == "shape-words"
    model = build(name, n_classes=len(columns), **build_kw).train()
    head = model[-1] if isinstance(model, nn.Sequential) else getattr(model, "head", None)
    if isinstance(head, nn.Linear):  # every word starts rare, as the captioner's word head does
        nn.init.constant_(head.bias, math.log(0.05 / 0.95))

    def step_loss(step: int) -> torch.Tensor:
        x, said, _ = _multilabel_batch(train, step * batch, batch, columns, words_only)
        return F.binary_cross_entropy_with_logits(model(x), said)

    losses, seconds = _train(model, steps, lr, warmup, step_loss)
    model.eval()
    with torch.no_grad():
        x, _, truth = _multilabel_batch(test, 0, test_images, columns, words_only)
        scores = model(x)[:, shape_cols]
    tail = losses[-max(1, steps // 10) :]
    return {
        "model": name,
        "targets": targets,
        "steps": steps,
        "shape_auc": round(shape_auc(scores, truth), 3),
        "shape_accuracy": round(((scores > 0).float() == truth).double().mean().item(), 3),
        "always_absent": round(1 - truth.mean().item(), 3),
        "columns": len(columns),
        "final_loss": round(sum(tail) / len(tail), 3),
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,cat_shapes,cat_shapes+convstem,vit")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps, then cosine decay (0: constant lr)")
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    p.add_argument("--stage", type=int, default=-1, help="CAT models: the stage read out (default the last)")
    p.add_argument(
        "--pool", choices=("mean", "max", "mil"), default=None,
        help="CAT models: pooling of that stage (mil: every token scores, each class takes its best token)",
    )  # fmt: skip
    p.add_argument("--project", type=int, default=0, help="CAT models: read through the captioner's projection")
    p.add_argument("--targets", choices=TARGETS, default="shape", help="what is taught (see the module docstring)")
    p.add_argument("--max-objects", type=int, default=1, help="objects per image: 1 to this many")
    p.add_argument("--skip-cpsa", default="", help="CAT models: stages whose CPSA blocks are skipped, e.g. 1,2")
    p.add_argument("--stem", choices=("patch", "conv"), default=None, help="CAT models: CATConfig.stem override")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list as the last line")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name in a.models.split(","):
        kw = {}
        if name.strip().startswith("cat_"):
            skip = tuple(int(k) for k in a.skip_cpsa.split(",") if k.strip())
            kw = dict(stage=a.stage, pool=a.pool, skip_cpsa=skip, stem=a.stem, project=a.project)
        r = run(
            name.strip(), a.steps, a.lr, seed=a.seed, test_images=a.test_images, warmup=a.warmup,
            targets=a.targets, max_objects=a.max_objects, **kw,
        )  # fmt: skip
        rows.append(r)
        if a.targets != "shape":
            print(
                f"{r['model']:22s} {r['targets']} ({r['columns']} words): shape-word AUC {r['shape_auc']:.3f} (blind "
                f"0.5), present/absent right {r['shape_accuracy']:.3f} (always absent {r['always_absent']:.3f})  "
                f"loss {r['final_loss']:.3f}  {r['params']:,} params  {r['seconds']} s",
                flush=True,
            )
            continue
        print(
            f"{r['model']:22s} shape accuracy {r['test_accuracy']:.3f} (chance {1 / len(SHAPES):.3f})  "
            f"loss {r['final_loss']:.3f} (chance {r['chance_loss']:.3f})  {r['params']:,} params  {r['seconds']} s",
            flush=True,
        )
    if a.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
