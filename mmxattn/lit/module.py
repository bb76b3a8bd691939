"""The LightningModule: owns the MMXAttn model, its losses, metrics and optimisation.

Typed ``__init__`` arguments are the LightningCLI schema (``--model.lr 3e-4``); the data module's vocabulary
properties are linked into ``vocab_size`` / ``pad_id`` / ... by :mod:`mmxattn.lit.cli`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from ..config import config_to_dict
from ..evaluation import EvalAccumulator
from ..losses import CaptionLoss, ContrastiveLoss, ITMLoss, sample_hard_negatives
from ..presets import create_model
from .optim import build_optimizer, warmup_cosine

__all__ = ["MMXAttnModule", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


class MMXAttnModule(pl.LightningModule):
    """Joint captioning + retrieval training of :class:`~mmxattn.model.MMXAttn`.

    Args:
        preset: model preset (``mmxattn.list_presets()``).
        overrides: preset overrides, e.g. ``{"text": {"width": 256}, "image_stages": [-1]}``.
        vocab_size, pad_id, bos_id, eos_id, context_length, img_size: normally linked from the data module.
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with linear warmup then cosine decay to
            ``lr * min_lr_ratio`` over the run's optimizer steps.
        contrastive_weight, caption_weight, itm_weight: loss weights (CoCa's 1 and 2; ITM trains the re-ranker
            on in-batch hard negatives as BLIP does; 0 turns it off).
        label_smoothing: for the caption loss.
        nonfinite: "stop" (save the last good state, then raise naming the step and batch) or "skip" the batch.
        rerank, rerank_with: decoder re-ranking of the top candidates at evaluation (0 = off).
        gen_strategy, gen_max_new_tokens, gen_num_beams: how captions are generated at evaluation.
        val_captions: generate and score captions at validation (test always does).
        grounding_layers: decoder layers averaged for grounding accuracy (default all).
    """

    def __init__(
        self,
        preset: str = "mmx_shapes",
        overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        context_length: int | None = None,
        img_size: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        itm_weight: float = 0.5,
        label_smoothing: float = 0.0,
        nonfinite: str = "stop",
        rerank: int = 10,
        rerank_with: str = "itm",
        gen_strategy: str = "greedy",
        gen_max_new_tokens: int | None = None,
        gen_num_beams: int = 3,
        val_captions: bool = True,
        grounding_layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.save_hyperparameters()
        text = dict((overrides or {}).get("text", {}))
        for key, value in (("vocab_size", vocab_size), ("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None:
                text[key] = value
        if context_length is not None:
            text["context_length"] = context_length
        vision = dict((overrides or {}).get("vision", {}))
        if img_size is not None:
            vision["img_size"] = img_size
        rest = {k: v for k, v in (overrides or {}).items() if k not in ("text", "vision")}
        self.model = create_model(preset, text=text, vision=vision, **rest)
        t = self.model.cfg.text
        if itm_weight <= 0 and self.model.itm_head is not None:
            # an untrained matching head would re-rank at random, and DDP would wait for its gradients
            self.model.itm_head.requires_grad_(False)
        self.contrastive = ContrastiveLoss()
        self.caption_loss = CaptionLoss(pad_id=t.pad_id, label_smoothing=label_smoothing)
        self.itm_loss = ITMLoss()
        self._evaluator: EvalAccumulator | None = None
        self.last_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            if tok.vocab_size != self.model.cfg.text.vocab_size:
                raise ValueError(
                    f"data tokenizer vocab_size {tok.vocab_size} != model vocab_size {self.model.cfg.text.vocab_size}"
                )
            self.model.tokenizer = tok

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self._track_skipped(batch)
        if "images" not in batch:  # every sample of this batch was broken (skipped and counted)
            return None
        images, ids = batch["images"], batch["ids"]
        pos_ids = batch.get("pos_ids")
        m = self.model
        out = m(images, ids)
        losses = {
            "contrastive": self.contrastive(out.image_embeds, out.text_embeds, out.logit_scale, pos_ids=pos_ids),
            "caption": self.caption_loss(out.logits, ids[:, 1:]),
        }
        loss = self.hparams.contrastive_weight * losses["contrastive"] + self.hparams.caption_weight * losses["caption"]
        if self.hparams.itm_weight > 0 and m.itm_head is not None:
            losses["itm"] = self._itm(out, ids, pos_ids)
            loss = loss + self.hparams.itm_weight * losses["itm"]
        if not self._all_finite(loss):
            return self._nonfinite(loss, batch_idx)
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/logit_scale", out.logit_scale, batch_size=bs)
        return loss

    def _itm(self, out, ids: Tensor, pos_ids: Tensor | None) -> Tensor:
        """Matching loss on the positives plus one hard negative text per image and one hard negative image per
        text, sampled by similarity (BLIP, Li et al. 2022); the positives reuse the caption pass's decoder."""
        m = self.model
        with torch.no_grad():
            sim = out.image_embeds @ out.text_embeds.T
            neg_t, neg_i = sample_hard_negatives(sim, pos_ids=pos_ids)
        rows = torch.arange(ids.shape[0], device=ids.device)
        vt, vi = neg_t >= 0, neg_i >= 0
        img_idx = torch.cat([rows[vt], neg_i[vi]])
        txt_idx = torch.cat([neg_t[vt], rows[vi]])
        pos_logits = m.itm_from_decoder(out.decoder_states, ids)
        neg_logits = m.itm_logits(out.image_tokens[img_idx], ids[txt_idx], out.text_states[txt_idx])
        logits = torch.cat([pos_logits, neg_logits])
        labels = torch.cat([torch.ones_like(rows), torch.zeros_like(txt_idx)])
        return self.itm_loss(logits, labels)

    def _all_finite(self, loss: Tensor) -> bool:
        ok = bool(torch.isfinite(loss).all())
        # every rank must take the same decision, or DDP would wait forever for a skipped rank
        return self.trainer.strategy.reduce_boolean_decision(ok, all=True) if self._trainer is not None else ok

    def _nonfinite(self, loss: Tensor, batch_idx: int) -> None:
        where = f"step {self.global_step}, epoch {self.current_epoch}, batch {batch_idx}"
        if self.hparams.nonfinite == "skip":
            self.print(f"non-finite loss ({loss.item()}) at {where}: batch skipped")
            self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
            return None
        path = Path(self.trainer.default_root_dir) / "nonfinite-last-good.ckpt"
        self.trainer.save_checkpoint(path)  # the weights are still those of the last good step
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; last good state saved to {path}")

    def _track_skipped(self, batch: dict[str, Any]) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tracker = getattr(dm, "skip_tracker", None)
        if tracker is not None and hasattr(tracker, "update_from_batch"):
            tracker.update_from_batch(batch)

    def on_train_epoch_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tracker = getattr(dm, "skip_tracker", None)
        if tracker is not None and hasattr(tracker, "end_epoch"):
            summary = tracker.end_epoch()
            if summary.get("n_skipped"):
                self.print(f"epoch {self.current_epoch}: skipped {summary['n_skipped']} broken samples, e.g. "
                           f"{summary.get('examples', [])[:3]}")
            self.log("data/skipped", float(summary.get("n_skipped", 0)), sync_dist=True, reduce_fx="sum")

    # ------------------------------------------------------------------ evaluation
    def _make_evaluator(self, test: bool) -> EvalAccumulator:
        h = self.hparams
        gen = {"strategy": h.gen_strategy, "max_new_tokens": h.gen_max_new_tokens}
        if h.gen_strategy == "beam":
            gen["num_beams"] = h.gen_num_beams
        captions = (test or h.val_captions) and self.model.tokenizer is not None
        rerank_with = "lm" if h.rerank_with == "itm" and h.itm_weight <= 0 else h.rerank_with
        return EvalAccumulator(
            self.model,
            rerank=h.rerank,
            rerank_with=rerank_with,
            captions=captions,
            gen_kwargs=gen,
            meteor=test,
            grounding_layers=h.grounding_layers,
        )

    def on_validation_epoch_start(self) -> None:
        self._evaluator = self._make_evaluator(test=False)

    def on_test_epoch_start(self) -> None:
        self._evaluator = self._make_evaluator(test=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "images" in batch:
            self._evaluator.update(batch)

    test_step = validation_step

    def _log_eval(self, prefix: str) -> None:
        metrics = self._evaluator.compute()
        self.last_metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        numeric = {k: float(v) for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
        # already global (gathered across ranks inside compute), so no sync_dist
        self.log_dict(numeric, prog_bar=False, rank_zero_only=False)
        self._evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        if self._evaluator is not None and self._evaluator.records:
            self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        if self._evaluator is not None and self._evaluator.records:
            self._log_eval("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        opt = build_optimizer(self.model, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas))
        # the total is read lazily (see warmup_cosine): asking now would build the train loader before a resume
        sched = warmup_cosine(
            opt,
            warmup_steps=h.warmup_steps,
            total_steps=lambda: max(h.warmup_steps + 1, int(self.trainer.estimated_stepping_batches)),
            min_ratio=h.min_lr_ratio,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain data only, so the file loads with torch.load(weights_only=True).
        checkpoint["mmxattn_config"] = config_to_dict(self.model.cfg)
        if self.model.tokenizer is not None:
            checkpoint["mmxattn_tokenizer"] = self.model.tokenizer.to_dict()
        from ..checkpoint import preprocess_info

        pre = preprocess_info(self.model)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            for key in ("mean", "std"):
                if getattr(dm, key, None) is not None:
                    pre[key] = [float(v) for v in getattr(dm, key)]
            hp = getattr(dm, "hparams", None)
            if hp:  # how to rebuild the evaluation data (python -m mmxattn.evaluate without --config)
                checkpoint["mmxattn_data"] = {
                    "class_path": f"{type(dm).__module__}.{type(dm).__name__}",
                    "init_args": {k: v for k, v in dict(hp).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
                }
        checkpoint["mmxattn_preprocess"] = pre
        np_state = np.random.get_state()
        checkpoint["mmxattn_rng"] = {
            "torch": torch.get_rng_state(),
            "python": _to_plain(random.getstate()),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tok = checkpoint.get("mmxattn_tokenizer")
        if tok is not None and self.model.tokenizer is None:
            from ..text.tokenizer import tokenizer_from_dict

            self.model.tokenizer = tokenizer_from_dict(tok)
        rng = checkpoint.get("mmxattn_rng")
        if rng is not None:  # Lightning restores optimizer/scheduler/loops; the RNG streams are ours to restore
            torch.set_rng_state(rng["torch"])
            random.setstate(_to_tuple(rng["python"]))
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _to_plain(x: Any) -> Any:
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
