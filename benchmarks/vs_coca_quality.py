"""Quality at an equal training budget: MMXAttn vs open_clip's CoCa on the embedded shapes data, one process.

    .venv/bin/python benchmarks/vs_coca_quality.py --minutes 10 --json     # mmx_shapes vs a matched CoCa
    .venv/bin/python benchmarks/vs_coca_quality.py --quick --json          # tiny sizes, seconds (the smoke test)

Data: :class:`~mmxattn.data.datamodule.ShapesDataModule` with configs/shapes.yaml's settings (64 px, batch 64 images,
its train size, 1000 test images, 5 captions each, seed 0, the word tokenizer, context length 24) serves both
models: each run gets a fresh train loader with the same seed, so both see the same images in the same order, and
both are evaluated on the same (pre-loaded) test batches. Each trains with its own recipe's captions: ours with
shapes.yaml's ``train_captions_per_image`` (each image encoded once for several of its captions;
``--captions-per-image 1`` gives ours one caption per image too), CoCa with open_clip's one caption per image
(its forward pairs every image with one text; the caption is the one ours gets first).

Budget: each model trains for ``--minutes`` of wall-clock COMPUTE time, one after the other (ours first, see
``--order``): the clock runs only around a step (forward, losses, backward, clipping, optimizer and scheduler
step); fetching a batch (generation / memory-mapped reads, augmentation, tokenisation) and model building are
outside it. Both use the same plain loop (no Lightning Trainer): ours calls ``MMXAttnModule.training_step`` (its
own losses, weighted as configs/shapes.yaml weighs them, which this script reads: contrastive with
duplicate-caption positives, caption, ITM on hard negatives when its weight is above 0), CoCa
calls ``open_clip.loss.CoCaLoss(caption_loss_weight=2, clip_loss_weight=1)``.

Ours trains the main job's two phases (configs/shapes.yaml: ``word_weight``, ``word_head_stage``, ``word_context``,
``word_only_steps``, ``word_only_schedule``): first the word-presence loss alone (only the encoder up to the word
head's stage runs), then every loss. The config's split (843 word-only steps then 843 joint ones: ratio 1) is kept
at any budget: each phase's step is timed, and the budget buys ``n`` joint steps and ``ratio * n`` word-only ones,
all counted in ours' compute. ``--single-phase`` trains ours without the word head (the thirteenth session's main
job).

Threads: 1 by default. On a shared CPU (load above the core count) an OpenMP worker that the kernel deschedules
stalls every op it takes part in: at load ~4 on 2 cores a step took 2.5-3x LONGER with 2 threads than with 1.

Optimisation, identical for both (configs/shapes.yaml's recipe): AdamW from :func:`mmxattn.lit.optim.build_optimizer`
(peak lr 1e-3, betas (0.9, 0.98), weight decay 0.05 on matrices only; norms, biases, position tables, CLS and
temperature not decayed), gradient-norm clipping at 1.0, :func:`mmxattn.lit.optim.warmup_cosine` down to 5% of the
peak. The number of steps the budget allows is estimated per model from ``--probe-steps`` timed steps (the first
not counted) taken before its budget starts, outside it, after which its initial weights are restored and a fresh
optimizer is built; the schedule's length is that estimate and its warmup ``min(200, 20%)`` of it (shapes.yaml
warms up 200 of 843 joint steps); ours' word-only phase warms up and holds the peak, and its joint phase gets its own
warmup and cosine (``word_only_schedule: restart``). A run that goes past its estimate continues at the final
learning rate. CoCa additionally gets open_clip's training-loop clamp of its logit
scale to ``[0, ln 100]`` after every step (ours clamps inside its forward).

The peer (open_clip 3.x ``CoCa``, random init, no network), configured by ``vs_coca.coca_config_for`` plus:

* text tower and multimodal decoder with our widths, depths, heads, vocabulary, context length and embedding size;
  pad/sot/eot ids are our tokenizer's (0/1/2): ``CoCa(pad_id=)`` is its caption loss's ignore index and its text
  tower's ``text_cfg.pad_id`` drives the tower's key-padding mask (every CoCa text tower appends a CLS token and
  masks pads). open_clip 3.3.0 builds that mask one position off (its "legacy" CLS mask; ``TextTransformer`` has a
  ``correct_cls_mask`` switch that ``CLIPTextCfg`` cannot reach): we switch the fix on, so the peer's CLS sees
  exactly the caption (``--coca-legacy-cls-mask`` keeps open_clip's default). Its multimodal decoder is
  initialised by :func:`init_coca_decoder` (open_clip 3.3.0 leaves its LM head at ``torch.empty``). Both are the
  issues open_clip PR #551 ("CoCa: fix MultimodalTransformer init + Mask CLS token at end of seq") was about.
  CoCa's decoder has more parameters than ours (0.80M vs 0.54M): each cross-attention block has its own MLP and
  its LM head is not tied to the token embedding;
* ViT: patch 8 at 64 px, an 8x8 token grid: the finest grid our decoder reads (CAT stage 2 of mmx_shapes), width =
  our text width (128) with 4 heads of 32 like both text towers, depth chosen so that its trunk (no attentional
  pooler / ln_post / projection) has the parameter count closest to our CAT encoder: 8 layers, 1.61M vs 1.70M
  (ours with the main job's conv stem, ``model.overrides`` in shapes.yaml, which this script also reads; 1.67M with
  CAT's patchify stem; widths 192x4 and 256x2 come as close; ``--vit-width``/``--vit-depth`` override). Its
  attentional pooler has ``our image token count + 1`` queries (open_clip's original CoCa setup: query 0 is the pooled embedding, the rest
  feed the decoder), so both decoders read 80 image tokens.

Evaluation (:func:`evaluate_pair`, the same code for both): full-gallery recall i2t/t2i R@1/5/10 with
:func:`mmxattn.metrics.retrieval_metrics` (text_to_image from the eval batches) of cosine similarity, also
gallery-normalised (``*_norm``: the inverted softmax at each model's own learned temperature), and greedy
captions (EOS stops a row; up to ``context_length - 1`` new tokens; ours with its KV cache, CoCa with open_clip's
prefix-recomputing loop, reproduced here without ``transformers``) scored by :func:`mmxattn.metrics.caption_metrics`
(CIDEr-D, BLEU-4, ROUGE-L; METEOR with ``--meteor``), and checked against the scene they describe
(``caption_fit``: share true of their image; ``caption_unnamed``: share of object phrases naming no object there;
:func:`mmxattn.evaluation.caption_check_metrics`). Ours only: grounding accuracy (on the references and on its own
captions) and decoder-re-ranked recall (``EvalAccumulator``; CoCa's decoder reads pooled queries, not image
positions, so it has no grounding). Ceilings:
``dm.ceilings("test")`` and the held-out-reference / constant-caption scores (:func:`shapes_reference_scores`: one
reference scored against the OTHER four, while the models are scored against all five, so a model's BLEU-4 can
exceed that "ceiling").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_coca import _vit_trunk_params, build_coca, coca_config_for, coca_special, n_params, param_counts  # noqa: E402

from mmxattn.config import config_to_dict  # noqa: E402
from mmxattn.data.datamodule import ShapesDataModule  # noqa: E402
from mmxattn.data.shapes_captions import check_caption  # noqa: E402
from mmxattn.data.shapes_render import Scene  # noqa: E402
from mmxattn.evaluate import shapes_reference_scores  # noqa: E402
from mmxattn.evaluation import EvalAccumulator, caption_check_metrics  # noqa: E402
from mmxattn.lit.module import MMXAttnModule  # noqa: E402
from mmxattn.lit.optim import build_optimizer, warmup_cosine  # noqa: E402
from mmxattn.metrics import caption_metrics, retrieval_metrics  # noqa: E402
from mmxattn.runtime import tune_cpu_allocator  # noqa: E402

RECIPE = dict(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98), min_lr_ratio=0.05, max_warmup=200, warmup_frac=0.2)
CLIP_NORM = 1.0
# train_size None: configs/shapes.yaml's
FULL = dict(preset="mmx_shapes", train_size=None, test_size=1000, batch_size=64, rerank=10, probe=5)
QUICK = dict(preset="mmx_tiny", train_size=96, test_size=12, batch_size=8, rerank=3, probe=3, minutes=0.04)
# The main job's loss weights and re-ranking score (configs/shapes.yaml), so this comparison trains what it runs.
_SHAPES_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.yaml")
_LOSS_KEYS = ("contrastive_weight", "caption_weight", "itm_weight", "attn_entropy_weight", "rerank_with")
_WORD_KEYS = (
    "word_weight",
    "word_head_stage",
    "word_context",
    "word_only_schedule",
    "attn_word_weight",
    "attn_word_objective",
    "attn_word_phrase_words",
)


@functools.cache  # read once; callers copy what they return
def _main_job_config(path: str = _SHAPES_YAML) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def main_job_data(path: str = _SHAPES_YAML) -> dict[str, Any]:
    """configs/shapes.yaml's data settings (``data.init_args``)."""
    return dict((_main_job_config(path).get("data") or {}).get("init_args") or {})


def main_job_losses(path: str = _SHAPES_YAML) -> dict[str, Any]:
    model = _main_job_config(path).get("model") or {}
    return {k: model[k] for k in _LOSS_KEYS if k in model}


def main_job_overrides(path: str = _SHAPES_YAML) -> dict[str, Any]:
    """configs/shapes.yaml's preset overrides (``model.overrides``: the conv stem), so ours is the main job's model."""
    return copy.deepcopy((_main_job_config(path).get("model") or {}).get("overrides") or {})


def main_job_word_phase(path: str = _SHAPES_YAML) -> dict[str, Any]:
    """configs/shapes.yaml's word head (``word_weight``, ``word_head_stage``, ``word_context``,
    ``word_only_schedule``, ``attn_word_weight``, ``attn_word_objective``, ``attn_word_phrase_words``) and
    ``word_ratio``: its word-only steps per joint step (``word_only_steps`` over the rest of ``max_epochs`` epochs of ``train_size // batch_size``
    steps). Empty when the main job has no word head."""
    cfg = _main_job_config(path)
    model = cfg.get("model") or {}
    if float(model.get("word_weight", 0.0)) <= 0:
        return {}
    out = {k: model[k] for k in _WORD_KEYS if k in model}
    n_word = int(model.get("word_only_steps", 0))
    if n_word > 0:
        data = main_job_data(path)
        total = int((cfg.get("trainer") or {}).get("max_epochs", 1)) * (
            int(data.get("train_size", 18000)) // int(data.get("batch_size", 64))
        )
        if total <= n_word:
            raise ValueError(f"{path}: word_only_steps {n_word} leaves no joint steps of {total}")
        out["word_ratio"] = n_word / (total - n_word)
    return out


ROW_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "cider", "bleu4", "rouge_l")
NORM_KEYS = ("i2t_r1_norm", "i2t_r5_norm", "t2i_r1_norm", "t2i_r5_norm")  # gallery-normalised recall, both models
_CHECKED = ("i2t_r1", "caption_fit")  # computed by evaluate_pair and by EvalAccumulator for ours: must agree


# ---------------------------------------------------------------------------------------------- models
def build_ours(args: argparse.Namespace, dm: ShapesDataModule) -> MMXAttnModule:
    torch.manual_seed(args.seed)
    module = MMXAttnModule(
        preset=args.preset,
        vocab_size=dm.vocab_size,
        pad_id=dm.pad_id,
        bos_id=dm.bos_id,
        eos_id=dm.eos_id,
        context_length=dm.context_length,
        img_size=dm.img_size,
        lr=RECIPE["lr"],
        weight_decay=RECIPE["weight_decay"],
        betas=RECIPE["betas"],
        min_lr_ratio=RECIPE["min_lr_ratio"],
        overrides=main_job_overrides() or None,
        **main_job_losses(),
        **{k: v for k, v in args.word_phase.items() if k != "word_ratio"},
    )
    module.model.tokenizer = dm.tokenizer
    return module


@dataclasses.dataclass
class Phase:
    """A stretch of training in :func:`train_for`: ``share`` steps of it per step of the last phase, entered by
    calling ``start``. The last phase runs until the budget is spent."""

    name: str
    share: float
    start: Callable[[], None]


def ours_phases(module: MMXAttnModule, word_ratio: float) -> list[Phase]:
    """The main job's two phases for :func:`train_for`: ``word_ratio`` word-only steps per joint step, then the
    joint steps. Without a Trainer the module's ``global_step`` stays 0, so the phase is switched through the
    hyper-parameter :meth:`MMXAttnModule.compute_losses` compares it with: ``word_only_steps`` above any step count
    while the word loss trains alone, 0 afterwards."""

    def word_only(on: bool) -> Callable[[], None]:
        def switch() -> None:
            module.hparams.word_only_steps = sys.maxsize if on else 0

        return switch

    return [Phase("word-only", word_ratio, word_only(True)), Phase("joint", 1.0, word_only(False))]


def peer_config(ours: Any, args: argparse.Namespace) -> dict[str, Any]:
    """vs_coca's matched CoCa config with the ViT re-sized (module docstring) and our eos id in the text tower."""
    cfg = coca_config_for(ours)
    t = ours.cfg.text
    width = args.vit_width or t.width
    target = n_params(ours.visual) - (n_params(ours.visual.head) if getattr(ours.visual, "head", None) else 0)
    p2, p3 = _vit_trunk_params(width, 2, cfg), _vit_trunk_params(width, 3, cfg)  # trunk params are affine in depth
    depth = args.vit_depth or min(range(1, 25), key=lambda d: abs(p2 + (d - 2) * (p3 - p2) - target))
    heads = t.heads if width % t.heads == 0 else max(1, width // 64)
    cfg["vision_cfg"].update(width=width, layers=depth, head_width=width // heads)
    cfg["text_cfg"]["eos_id"] = t.eos_id
    return cfg


def build_peer(cfg: dict[str, Any], args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    coca = build_coca(cfg)  # includes init_coca_decoder
    coca.text.correct_cls_mask = not args.coca_legacy_cls_mask  # see the module docstring
    return coca


# ---------------------------------------------------------------------------------------------- training
def coca_loss_fn(coca: torch.nn.Module, pad_id: int) -> Callable[[dict[str, Any], int], Tensor]:
    import open_clip.loss

    loss = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=pad_id)

    def step(batch: dict[str, Any], i: int) -> Tensor:
        out = coca(batch["images"], batch["ids"])
        clip, cap = loss(out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
        return clip + cap

    return step


def _batches(dm: ShapesDataModule):
    """Endless train batches, epoch after epoch, in the data module's seeded order; yields (batch, fetch seconds)."""
    loader = dm.train_dataloader()  # a fresh sampler: every model starts at epoch 0, batch 0
    epoch = 0
    while True:
        dm.set_epoch(epoch)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            yield batch, time.perf_counter() - t0
        epoch += 1


def _one_step(model, loss_fn, opt, sched, batch, i, after_step) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(batch, i)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], CLIP_NORM)
    opt.step()
    if sched is not None:
        sched.step()
    after_step()
    return float(loss.detach())


def train_for(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[dict[str, Any], int], Tensor],
    dm: ShapesDataModule,
    budget_s: float,
    probe_steps: int,
    seed: int,
    after_step: Callable[[], None] = lambda: None,
    phases: list[Phase] | None = None,
    restart: bool = True,
) -> dict[str, Any]:
    """Train ``model`` for ``budget_s`` seconds of step compute (batch fetching excluded); see the module docstring.

    ``phases`` (ours' word-only phase, then the joint one): each is probed for its step time; the budget then buys
    ``n`` steps of the last phase and ``round(share * n)`` of each earlier one, run first, with
    ``warmup_cosine(..., restart_at=<steps before the last phase>)`` (the main job's ``word_only_schedule:
    restart``: the earlier phases warm up and hold the peak, the last gets its own warmup and cosine), or with
    ``restart=False`` one warmup and cosine over all of them (``"shared"``)."""
    model.train()
    phases = phases or [Phase("all", 1.0, lambda: None)]

    def optimizer():
        return build_optimizer(model, RECIPE["lr"], RECIPE["weight_decay"], RECIPE["betas"])

    # Probe: a few steps of each phase from the initial weights to time a step, then the weights are put back.
    init = copy.deepcopy(model.state_dict())
    step_s = []
    for phase in phases:
        phase.start()
        opt = optimizer()
        probe = []
        for i, (batch, _) in zip(range(max(2, probe_steps)), _batches(dm)):
            t0 = time.perf_counter()
            _one_step(model, loss_fn, opt, None, batch, i, after_step)
            probe.append(time.perf_counter() - t0)
        step_s.append(statistics.median(probe[1:]))  # the first step pays lazy initialisation
        model.load_state_dict(init)
        del opt
    del init
    n_last = max(2, int(budget_s / sum(p.share * s for p, s in zip(phases, step_s))))
    counts = [max(1, round(p.share * n_last)) for p in phases[:-1]] + [n_last]
    first = sum(counts[:-1])  # steps before the last phase
    est = first + n_last
    warm = max(1, min(RECIPE["max_warmup"], round(RECIPE["warmup_frac"] * (n_last if restart else est))))
    opt = optimizer()
    sched = warmup_cosine(opt, warm, est, min_ratio=RECIPE["min_lr_ratio"], restart_at=first if restart else 0)

    torch.manual_seed(seed)
    load_before = os.getloadavg()[0]
    compute = fetch = 0.0
    steps, losses, phase_steps = 0, [], []
    k = -1
    for batch, fetch_s in _batches(dm):
        if k < len(phases) - 1 and steps == sum(counts[: k + 1]):  # the next phase starts here
            k += 1
            phases[k].start()
            phase_steps.append(0)
        if compute >= budget_s:
            break
        fetch += fetch_s
        t0 = time.perf_counter()
        losses.append(_one_step(model, loss_fn, opt, sched, batch, steps, after_step))
        compute += time.perf_counter() - t0
        steps += 1
        phase_steps[k] += 1
    model.eval()
    # the last phase's losses (all of them if the budget ran out before it started or as it started)
    last = (losses[steps - phase_steps[-1] :] if len(phase_steps) == len(phases) else []) or losses
    tail = last[-max(1, len(last) // 10) :]
    out = {
        "steps": steps,
        "estimated_steps": est,
        "warmup_steps": warm,
        "probe_step_s": step_s[-1],
        "compute_s": compute,
        "fetch_s": fetch,
        "images_seen": steps * dm.batch_size,
        "captions_per_image": dm.train_captions_per_image,
        # mean over the last 10% of the last phase's steps (losses differ between models and phases)
        "final_loss": statistics.mean(tail),
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    if len(phases) > 1:
        out["phases"] = [
            {"name": p.name, "steps": n, "planned_steps": c, "probe_step_s": s}
            for p, n, c, s in zip(phases, phase_steps + [0] * (len(phases) - len(phase_steps)), counts, step_s)
        ]
    split = ", ".join(f"{p['name']} {p['steps']}" for p in out.get("phases", []))
    print(
        f"  {name}: {steps} steps{f' ({split})' if split else ''} in {compute:.1f} s compute (+{fetch:.1f} s data), "
        f"estimated {est}, warmup {warm}, loss {last[0]:.3f} -> {out['final_loss']:.3f}, load "
        f"{out['loadavg_1min'][0]:.2f}->{out['loadavg_1min'][1]:.2f}",
        flush=True,
    )
    return out


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def coca_greedy(coca: torch.nn.Module, images: Tensor, max_new: int, sot: int, eos: int, pad: int) -> Tensor:
    """Greedy captions (B, 1 + n) the way open_clip's ``CoCa.generate`` decodes: the image is encoded once, every
    step re-runs text tower + decoder on the whole prefix and takes the last position; finished rows get pad."""
    latent, embs = coca._encode_image(images)  # (B, E), (B, L, D)
    ids = torch.full((images.shape[0], 1), sot, dtype=torch.long, device=images.device)
    done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    for _ in range(max_new):
        logits = coca(None, ids, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))  # (B,)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return ids


@torch.no_grad()
def evaluate_pair(
    batches: list[dict[str, Any]],
    encode_image: Callable[[Tensor], Tensor],
    encode_text: Callable[[Tensor], Tensor],
    generate: Callable[[Tensor], Tensor],
    tokenizer: Any,
    meteor: bool,
    logit_scale: float | None = None,
) -> dict[str, Any]:
    """Retrieval recall and caption metrics of one model on the eval batches (the same code for both models).
    ``logit_scale``: the model's learned temperature, for the gallery-normalised recall (``*_norm``)."""
    img, txt, t2i, preds, refs, checks = [], [], [], {}, {}, []
    for batch in batches:
        base = sum(x.shape[0] for x in img)
        img.append(encode_image(batch["images"]).float())  # (B, E), L2-normalised
        txt.append(encode_text(batch["ref_ids"]).float())  # (R, E)
        t2i.append(batch["ref_image_index"] + base)  # (R,)
        for j, caption in enumerate(tokenizer.batch_decode(generate(batch["images"]))):
            preds[base + j], refs[base + j] = caption, list(batch["references"][j])
            if "scenes" in batch:  # is the caption true of its image?
                checks.append(check_caption(caption, Scene(*batch["scenes"][j])))
    out: dict[str, Any] = {"n_images": len(preds), "n_texts": int(sum(x.shape[0] for x in txt))}
    out.update(retrieval_metrics(torch.cat(img), torch.cat(txt), torch.cat(t2i), norm_scale=logit_scale))
    out.update(caption_metrics(preds, refs, meteor=meteor))
    out.update(caption_check_metrics(checks))
    out["examples"] = [preds[i] for i in range(min(3, len(preds)))]
    return out


def ours_extras(ours: Any, batches: list[dict[str, Any]], rerank: int, max_new_tokens: int) -> dict[str, Any]:
    """Grounding accuracy (on the references, and on ours' own greedy captions: ``grounding_acc_gen``) and
    decoder-re-ranked recall: ours only (EvalAccumulator)."""
    how = main_job_losses().get("rerank_with", "itm")
    if how == "itm" and ours.itm_head is None:
        how = "lm"
    gen = {"strategy": "greedy", "max_new_tokens": max_new_tokens}
    acc = EvalAccumulator(ours, rerank=rerank, rerank_with=how, captions=True, gen_kwargs=gen, grounding=True)
    for batch in batches:
        acc.update(batch)
    m = acc.compute()
    return {k: v for k, v in m.items() if k.endswith("_rerank") or k.startswith("grounding") or k in _CHECKED}


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def print_table(out: dict[str, Any]) -> None:
    ours, coca, ceil = out["ours"], out["coca"], out["ceilings"]
    held, const = ceil["heldout_reference"], ceil["constant_caption"]
    rows = [(k, ceil.get(k)) for k in ROW_KEYS[:7]] + [(k, ceil.get(k[: -len("_norm")])) for k in NORM_KEYS]
    rows += [(k, held.get(k)) for k in ("cider", "bleu4")] + [("rouge_l", None), ("meteor", None)]
    print(f"\n{'metric':16s} {'ours':>7s} {'coca':>7s} {'ours-coca':>9s} {'ceiling':>8s} {'constant':>8s}")
    for k, c in rows:
        a, b = ours.get(k), coca.get(k)
        d = _fmt(a - b) if a is not None and b is not None else "   -  "
        const_v = _fmt(const.get(k)) if k in ("cider", "bleu4") else "   -  "
        print(f"{k:16s} {_fmt(a):>7s} {_fmt(b):>7s} {d:>9s} {_fmt(c):>8s} {const_v:>8s}")
    for k in (
        "caption_fit",
        "caption_unnamed",
    ):  # generated captions checked against the scene (unnamed: lower is better)
        print(f"{k:16s} {_fmt(ours.get(k)):>7s} {_fmt(coca.get(k)):>7s}")
    for k in sorted(k for k in ours if k.endswith("_rerank") or k in ("grounding_acc", "grounding_acc_gen")):
        print(f"{k + ' (ours)':16s} {_fmt(ours[k]):>7s}")
    print(f"steps: ours {out['steps']['ours']}, coca {out['steps']['coca']} ({out['budget_minutes']} min each)")
    print("ceiling: retrieval = dm.ceilings('test'); captions = a held-out reference vs the other four")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="training budget per model (default 10; quick 0.04)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test (mmx_tiny, 96 images)")
    p.add_argument("--preset", default=None, help="our model preset (default mmx_shapes; quick mmx_tiny)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="ours' captions per image in a training batch (default: shapes.yaml's train_captions_per_image)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="shapes image cache (default data_cache/shapes; quick: none)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see the docstring)")
    p.add_argument("--order", default="ours,coca", choices=["ours,coca", "coca,ours"], help="training order")
    p.add_argument("--probe-steps", type=int, default=None, help="timed steps to size the schedule (5; quick 3)")
    p.add_argument("--rerank", type=int, default=None, help="ours' re-ranking depth for the extra rows (10; quick 3)")
    p.add_argument("--meteor", action="store_true", help="also METEOR (starts Java)")
    p.add_argument("--vit-width", type=int, default=None, help="CoCa ViT width (default: our text width)")
    p.add_argument("--vit-depth", type=int, default=None, help="CoCa ViT depth (default: params matched)")
    p.add_argument(
        "--single-phase",
        action="store_true",
        help="ours without the main job's word head and word-only phase (the thirteenth session's main job)",
    )
    p.add_argument("--coca-legacy-cls-mask", action="store_true", help="keep open_clip's off-by-one CLS pad mask")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    a = p.parse_args(argv)
    base = {**FULL, "minutes": 10.0} if not a.quick else {**FULL, **QUICK}
    for key, dest in (("preset", "preset"), ("train_size", "train_size"), ("test_size", "test_size")):
        setattr(a, dest, getattr(a, dest) or base[key])
    a.batch_size = a.batch_size or base["batch_size"]
    a.train_size = a.train_size or int(main_job_data().get("train_size", 18000))
    if a.captions_per_image is None:
        a.captions_per_image = 1 if a.quick else int(main_job_data().get("train_captions_per_image", 1))
    a.minutes = base["minutes"] if a.minutes is None else a.minutes
    a.probe_steps = a.probe_steps or base["probe"]
    a.rerank = base["rerank"] if a.rerank is None else a.rerank
    a.cache_dir = a.cache_dir or (None if a.quick else "data_cache/shapes")
    a.word_phase = {} if a.single_phase else main_job_word_phase()
    if a.minutes <= 0:
        raise SystemExit(f"--minutes must be > 0, got {a.minutes}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tune_cpu_allocator()  # as train.py does; both peers share the process (MMXATTN_TUNE_MALLOC=0: off)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; there is no Trainer here
    warnings.filterwarnings("ignore", message="java not found.*")
    budget = 60.0 * args.minutes
    dm = ShapesDataModule(
        img_size=64,
        train_size=args.train_size,
        val_size=max(8, args.test_size // 2),
        test_size=args.test_size,
        batch_size=args.batch_size,
        num_workers=0,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    # ours trains with the main job's several captions per image (same seed: the same images in the same order);
    # CoCa with open_clip's recipe, one caption per image (its forward pairs every image with one text)
    dm_ours = dm
    if args.captions_per_image > 1:
        dm_ours = ShapesDataModule(**{**dm.hparams, "train_captions_per_image": args.captions_per_image})
        dm_ours.setup("fit")
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    test_batches = list(dm.test_dataloader())  # the same tensors for both models
    print(f"data ready in {time.perf_counter() - t0:.1f} s (not in the budget); loadavg {os.getloadavg()}")
    module = build_ours(args, dm)
    ours = module.model
    coca_cfg = peer_config(ours, args)
    coca = build_peer(coca_cfg, args)
    sot, eos, pad = coca_special(coca_cfg)
    if (sot, eos, pad) != (dm.bos_id, dm.eos_id, dm.pad_id):
        raise RuntimeError(f"CoCa special ids {(sot, eos, pad)} != tokenizer's {(dm.bos_id, dm.eos_id, dm.pad_id)}")
    params = param_counts(ours, coca)
    print(f"torch threads {torch.get_num_threads()}, budget {args.minutes} min per model")
    print(f"ours ({args.preset}): {json.dumps(config_to_dict(ours.cfg))}")
    print(f"coca (open_clip.CoCa): {json.dumps(coca_cfg)}")
    for name, p in params.items():
        print(f"  {name:4s} params: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in p.items()))

    word_ratio = args.word_phase.get("word_ratio", 0.0)
    ours_phases_ = ours_phases(module, word_ratio) if word_ratio > 0 else None

    def clamp_coca() -> None:
        with torch.no_grad():  # open_clip's training loop: logit_scale.clamp_(0, ln 100) after each step
            coca.logit_scale.clamp_(0, 4.6052)

    runs = {
        "ours": lambda: train_for(
            "ours",
            module,
            module.training_step,
            dm_ours,
            budget,
            args.probe_steps,
            args.seed,
            phases=ours_phases_,
            restart=args.word_phase.get("word_only_schedule", "shared") == "restart",
        ),
        "coca": lambda: train_for(
            "coca", coca, coca_loss_fn(coca, pad), dm, budget, args.probe_steps, args.seed, clamp_coca
        ),
    }
    train = {name: runs[name]() for name in args.order.split(",")}

    max_new = dm.context_length - 1
    gens = {
        "ours": lambda im: ours.generate(im, max_new_tokens=max_new, strategy="greedy"),
        "coca": lambda im: coca_greedy(coca, im, max_new, sot, eos, pad),
    }
    encoders = {"ours": (ours.encode_image, ours.encode_text), "coca": (coca.encode_image, coca.encode_text)}
    rows: dict[str, dict[str, Any]] = {}
    for name in ("ours", "coca"):
        t1 = time.perf_counter()
        scale = float((ours.get_logit_scale() if name == "ours" else coca.logit_scale.exp().clamp(max=100)).detach())
        rows[name] = evaluate_pair(test_batches, *encoders[name], gens[name], dm.tokenizer, args.meteor, scale)
        rows[name]["eval_s"] = time.perf_counter() - t1
        rows[name]["final_loss"] = train[name]["final_loss"]
        print(f"  {name}: evaluated in {rows[name]['eval_s']:.1f} s", flush=True)
    t1 = time.perf_counter()
    extra = ours_extras(ours, test_batches, args.rerank, max_new)
    print(f"  ours: grounding and re-ranking in {time.perf_counter() - t1:.1f} s", flush=True)
    for key in _CHECKED:  # the two evaluation paths must agree
        a, b = extra.pop(key), rows["ours"][key]
        if a != b and (a is None or b is None or abs(a - b) > 1e-6):
            raise RuntimeError(f"EvalAccumulator and evaluate_pair disagree on ours' {key}")
    rows["ours"].update(extra)
    rows["coca"]["grounding_acc"] = rows["coca"]["grounding_acc_gen"] = None
    ceilings = {**dm.ceilings("test"), **shapes_reference_scores(dm, "test")}
    out: dict[str, Any] = {
        "budget_minutes": args.minutes,
        "ours": rows["ours"],
        "coca": rows["coca"],
        "ceilings": ceilings,
        "configs": {
            "ours": config_to_dict(ours.cfg),
            "coca": coca_cfg,
            "coca_correct_cls_mask": not args.coca_legacy_cls_mask,
            "recipe": {**RECIPE, "clip_grad_norm": CLIP_NORM, "ours_loss": main_job_losses()}
            | {"ours_word_phase": args.word_phase},
            "data": {"preset": args.preset, "img_size": 64, "batch_size": args.batch_size, "seed": args.seed}
            | {"ours_captions_per_image": args.captions_per_image, "coca_captions_per_image": 1}
            | {"train_size": args.train_size, "test_size": args.test_size, "context_length": dm.context_length},
        },
        "params": params,
        "steps": {name: train[name]["steps"] for name in ("ours", "coca")},
        "train": train,
        "threads": torch.get_num_threads(),
        "order": args.order,
    }
    print_table(out)
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
