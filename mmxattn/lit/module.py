"""The LightningModule: owns the MMXAttn model, its losses, metrics and optimisation.

Typed ``__init__`` arguments are the LightningCLI schema (``--model.lr 3e-4``); the data module's vocabulary
properties are linked into ``vocab_size`` / ``pad_id`` / ... by :mod:`mmxattn.lit.cli`.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import random
import shutil
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..capture import capture_attention
from ..checkpoint import scoring_info, tokenizer_mismatch
from ..config import config_to_dict
from ..evaluation import EvalAccumulator, grounding_layer_names
from ..losses import (
    AttentionEntropyLoss,
    CaptionLoss,
    ContrastiveLoss,
    ITMLoss,
    WordAttentionLoss,
    WordPresenceLoss,
    positive_mask,
    sample_hard_negatives,
)
from ..presets import create_model
from .ema import ModelEMA
from .gradcache import ChunkStreams, batchnorm_buffers, label_count, split_batch
from .optim import build_optimizer, warmup_cosine
from .sigint import SigintDeferral

__all__ = ["MMXAttnModule", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


class MMXAttnModule(pl.LightningModule):
    """Joint captioning + retrieval training of :class:`~mmxattn.model.MMXAttn`.

    The fine-tuning controls (``encoder_lr`` to ``init_from``) and ``grad_cache_chunk_size`` all default to plain
    joint training.

    Args:
        preset: model preset (``mmxattn.list_presets()``).
        overrides: preset overrides, e.g. ``{"text": {"width": 256}, "image_stages": [-1]}``; a pretrained encoder
            is ``{"vision_pretrained": "cat_t.safetensors"}`` (or ``vision_backend`` for timm / open_clip towers).
        vocab_size: the tokenizer's vocabulary size (normally linked from the data module).
        pad_id: the padding token's id (normally linked from the data module).
        bos_id: the begin-of-text token's id (normally linked from the data module).
        eos_id: the end-of-text token's id (normally linked from the data module).
        context_length: token ids per caption (normally linked from the data module).
        img_size: the image side in pixels (normally linked from the data module).
        lr: AdamW's peak learning rate (linear warmup, then cosine decay to ``lr * min_lr_ratio`` over the run's
            optimizer steps).
        weight_decay: AdamW's decoupled weight decay (not on norms, biases, position tables, the learned query and
            CLS tokens, the temperature: ``MMXAttn.no_weight_decay``).
        betas: AdamW's betas.
        warmup_steps: optimizer steps of linear learning-rate warmup.
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        contrastive_weight: weight of the contrastive (InfoNCE) loss (CoCa's 1).
        caption_weight: weight of the caption loss (CoCa's 2).
        itm_weight: weight of the image-text matching loss, which trains the re-ranker on in-batch hard negatives
            as BLIP does (0 turns it off).
        label_smoothing: for the caption loss.
        attn_entropy_weight: > 0 adds ``attn_entropy_weight`` times
            :class:`~mmxattn.losses.AttentionEntropyLoss` (``diversity=attn_diversity``) of the decoder's
            cross-attention (heads averaged, queries that predict a caption token): it pushes the decoder to read
            each word from few image places, varying with the image, rather than from the image's average. Off by
            default: on the shapes data it made the maps sharp but not better grounded, and cost CIDEr
            (docs/benchmarks.md, "What the shapes models know"). Those layers run the eager attention path in
            training; no compile.
        attn_diversity: the ``diversity`` of that penalty (how much the batch's average attention is pushed to
            spread, i.e. to vary with the image).
        word_weight: > 0 builds the model's word head (``MMXAttnConfig.word_head``) and adds ``word_weight`` times
            :class:`~mmxattn.losses.WordPresenceLoss`: every image token scores every word, the image's best
            token per word is compared with the words of its captions. A readout that selects (a maximum over
            tokens) where the caption and retrieval paths average, so the encoder's tokens learn what their
            object is; :meth:`~mmxattn.model.MMXAttn.word_maps` shows where each word is seen.
        word_only_steps: the first ``word_only_steps`` training steps train the word loss alone (image encoder,
            projection and word head; nothing else is run or updated), then every loss as usual. The encoder first
            learns what the captions' words look like from a readout that selects, before the averaging caption
            and retrieval paths take part. Needs ``word_weight > 0``. Counted in optimizer steps, as
            ``freeze_encoder_steps``; the learning-rate schedule is set by ``word_only_schedule``. Under DDP every
            part still runs, the other terms weighted 0, so that all ranks reduce the same gradients: nothing else
            learns, but AdamW's weight decay does apply to it.
        word_only_schedule: "shared": one warmup + cosine over all steps, word-only ones included; "restart": the
            word-only phase warms up and holds the peak learning rate, and the joint phase gets a warmup and a
            cosine of its own over the remaining steps (the caption and retrieval parts start fresh there).
        word_head_stage: the word head reads this encoder stage's own tokens (one of the model's
            ``image_stages``) instead of the projected image tokens (``MMXAttnConfig.word_head_stage``); needs
            ``word_weight > 0``. With ``word_only_steps`` only the encoder up to that stage runs in that phase. On
            the shapes data the stage-0 tokens of a conv-stem encoder learnt the shape words that the projected
            tokens had not (docs/benchmarks.md, "What the shapes models know").
        word_context: the decoder and the retrieval pooler also read the word head's probabilities at every image
            token (``MMXAttnConfig.word_context``; detached, so only the word loss trains the head, added through a
            zero-initialised Linear). Needs ``word_weight > 0``.
        attn_word_weight: > 0 adds ``attn_word_weight`` times :class:`~mmxattn.losses.WordAttentionLoss` (after the
            word-only phase): the decoder's cross-attention (heads and ``grounding_layers`` averaged, the map the
            grounding metric scores) of the query that predicts a word is pulled towards the word head's map of
            that word (detached; no boxes are read). Needs ``word_weight > 0``. Those layers run the eager
            attention math in training (no measurable cost on the shapes model); ``compile`` is then ignored, as
            with ``attn_entropy_weight``.
        attn_word_objective: "map" (the KL divergence from the word head's map to the attention) or "evidence"
            (minus the log of the word head's probability of the word where the query looks); see
            :class:`~mmxattn.losses.WordAttentionLoss`.
        attn_word_phrase_words: words that make up object phrases (sizes, colours, shape names...): each run of
            them in a caption is a phrase whose queries are taught the product of its words' maps (see
            :class:`~mmxattn.losses.WordAttentionLoss` ``phrase_ids``). Each must be one token of the model's
            tokenizer. None: every word its own map. Ignored (with a warning) when ``attn_word_weight`` is 0.
        nonfinite: "stop" (save the last good state, then raise naming the step and batch) or "skip" the batch.
        rerank: how many top candidates evaluation re-ranks with the decoder (0 = off).
        rerank_with: the re-ranking score at evaluation: "itm", "lm" or "pmi" (see ``MMXAttn.retrieve``).
        gen_strategy: how evaluation generates captions ("greedy", "beam", "sample").
        gen_max_new_tokens: the most tokens generated per caption at evaluation (None: up to the context length).
        gen_num_beams: beams of ``gen_strategy="beam"``.
        val_captions: generate and score captions at validation (test always does; a validation within the
            word-only phase scores retrieval alone, without captions or re-ranking).
        grounding_layers: decoder layers averaged for grounding accuracy (default all).
        encoder_lr: peak learning rate of the encoder, ``visual.*`` (None = ``lr``; see :mod:`mmxattn.lit.optim`).
            The warmup + cosine schedule scales the three components' rates alike.
        text_lr: peak learning rate of the text side (None = ``lr``): ``text.*`` (with the token embedding, which
            is also the LM head when tied), ``pooler.*``, ``image_proj.*``, ``logit_scale``.
        decoder_lr: peak learning rate of the decoder (None = ``lr``): ``decoder.*``, ``lm_head.*`` (untied),
            ``itm_head.*``.
        layer_decay: layer-wise LR decay over the encoder's ``layer_groups()`` (stem, then blocks, input to
            output): group ``i`` of ``n`` gets ``encoder_lr * layer_decay ** (n - 1 - i)``; 1 = off.
        freeze_encoder_steps: the encoder does not change during the first K optimizer steps (global steps
            0 .. K-1), then trains. The optimizer holds every parameter from the start; during the freeze the
            frozen parameters' gradients are dropped (``grad = None``) just before each optimizer step, so AdamW
            skips them entirely: no update, no weight decay, no moment or step-count update (their Adam state
            starts fresh at the unfreeze). On one process they also get ``requires_grad=False`` for the freeze,
            so no backward runs through them (less compute and activation memory); under DDP they keep
            ``requires_grad`` (DDP's reducer expects a fixed set of gradients) and the backward still runs.
            Whether the encoder is frozen is a function of the global step alone, so resuming mid-freeze works.
        freeze_encoder_trainable_last: while frozen, the last N encoder layer groups still train (0 = all frozen).
        ema_decay: > 0 keeps an EMA of the weights (:class:`~mmxattn.lit.ema.ModelEMA`, updated after every
            optimizer step); validation and test evaluate the EMA weights. Checkpoints store the EMA weights as
            the model's ``state_dict`` (so ``mmxattn.load`` / ``mmxattn.evaluate`` get them) and the training
            weights under ``mmxattn_ema["training_weights"]`` (plain tensors; resume restores both).
        ema_warmup: ramp the EMA decay up as ``min(ema_decay, (1 + t) / (10 + t))`` (for short runs).
        grad_checkpointing: recompute encoder, text and decoder blocks in the backward pass (less activation
            memory, about a third more compute).
        init_from: a trained mmxattn model to start from: a Lightning ``.ckpt`` of this module (its evaluated
            weights: the EMA where the run kept one) or a folder written by ``mmxattn.export``. The model's
            architecture and tokenizer are the file's (``preset`` is not read; ``overrides`` and the word-head
            switches apply on top, and weights they add start fresh, warned), the data module is switched to the
            model's tokenizer (warned where it had built another: captions are read with the ids the weights
            know), and everything else starts anew: optimizer, schedule, step and epoch counters (unlike
            ``--ckpt_path``, which resumes a run). The data's ``img_size`` must be the model's. Keep the file while
            the run may be resumed or rebuilt from its saved hyperparameters: they name it.
        compile: ``torch.compile`` the model's forward for training (evaluation runs eager). The compiled
            function is kept outside the module tree, so checkpoint keys do not change (no ``_orig_mod.``). Where
            it cannot work (no C++ compiler for the CPU backend, no Triton on CUDA, an unsupported Python) or its
            first call fails, training warns and runs eager.
        grad_cache_chunk_size: gradient caching (Gao et al. 2021; open_clip's ``accum_freq`` reaches the same loss
            across loader batches): a batch of more than this many images is trained that many images at a time,
            with the contrastive loss of the WHOLE batch. Choose the largest batch that fits unchunked: peak memory
            is about that of an unchunked batch of this size, and each step adds a graph-free pass of both towers;
            a batch of this many images or fewer trains unchunked (on one device: nothing changes). A graph-free pass of the image and text towers over every
            chunk gives all embeddings; the whole batch's contrastive loss on them gives each embedding's gradient;
            then each chunk runs forward (each chunk draws from a random stream of its own, from its start in both
            passes: the same drop-path masks) and backward with ``<embedding, cached gradient>`` plus its other
            losses. Peak activation memory is one chunk's; the cost is the extra graph-free tower pass (measured in
            ``benchmarks/train_memory.py``). The gradient equals the unchunked batch's (tested to rounding) for the
            contrastive and caption terms (the caption loss stays the batch's token mean); the ITM term draws its
            hard negatives within each chunk (chunks of one image have none and are left out of its mean; a size
            of 1 with ``itm_weight > 0`` is an error), the word and attention terms are per chunk, averaged
            weighted by the chunks' captions (the attention-entropy penalty's diversity part is then a per-chunk
            diversity). BatchNorm layers (a ResNet backend) normalise each chunk on its own (warned; their running
            statistics move once per chunk, as with accumulation). Works with ``accumulate_grad_batches`` (each
            loader batch is chunked), bf16/16-mixed, the non-finite policy (the batch's chunks are undone; "stop"
            saves the window's gradients so far, as unchunked), a Ctrl-C (held back from the first chunk's backward
            to the batch's end) and DDP (the contrastive loss gathers every rank's cached embeddings, as unchunked;
            the chunks' backward passes add up locally and the last one is synchronised); FSDP and DeepSpeed, which
            reduce gradients in every backward pass, are refused. With ``compile=True`` and dropout/drop-path the
            compiled pass draws other masks than the eager first pass, so the cached gradient is that of slightly
            different activations. Lightning's ``on_before_backward`` / ``on_after_backward`` hooks run for the
            last chunk only. Costs besides the tower pass: with ``accumulate_grad_batches`` a copy of the window's
            gradients is held during each later micro-batch (to undo a skipped one); under DDP every batch takes
            the chunked path, also one of ``size`` images or fewer (the ranks' collectives must pair up).

    Precision: ``bf16-mixed`` / ``16-mixed`` come from the Trainer's ``precision``; the module computes the losses
    in fp32 from the (autocast) half-precision outputs (embeddings, caption / ITM logits are upcast), and forces
    nothing else to fp32.

    Gradient accumulation (the Trainer's ``accumulate_grad_batches``) sums the gradients of K micro-batch losses,
    which is right for the caption and ITM losses but does NOT enlarge the contrastive loss's negatives: each
    micro-batch's InfoNCE sees only its own B texts, and the sum of K losses over B-sized sets is not the
    gradient of one loss over K*B. For more negatives than fit in memory at once, load the large batch and set
    ``grad_cache_chunk_size`` (above).

    A run interrupted in the middle of an accumulation window (Ctrl-C, SIGTERM, any save there) keeps the window's
    gradients so far in its checkpoint (``mmxattn_partial_grads``), and the resumed run's step sums the same K
    micro-batches as an uninterrupted run's (on one process; under DDP each rank's partial sums are not saved).
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
        attn_entropy_weight: float = 0.0,
        attn_diversity: float = 1.0,
        word_weight: float = 0.0,
        word_only_steps: int = 0,
        word_only_schedule: str = "shared",
        word_head_stage: int | None = None,
        word_context: bool = False,
        attn_word_weight: float = 0.0,
        attn_word_objective: str = "map",
        attn_word_phrase_words: list[str] | None = None,
        nonfinite: str = "stop",
        rerank: int = 10,
        rerank_with: str = "itm",
        gen_strategy: str = "greedy",
        gen_max_new_tokens: int | None = None,
        gen_num_beams: int = 3,
        val_captions: bool = True,
        grounding_layers: list[int] | None = None,
        encoder_lr: float | None = None,
        text_lr: float | None = None,
        decoder_lr: float | None = None,
        layer_decay: float = 1.0,
        freeze_encoder_steps: int = 0,
        freeze_encoder_trainable_last: int = 0,
        ema_decay: float = 0.0,
        ema_warmup: bool = True,
        grad_checkpointing: bool = False,
        compile: bool = False,
        init_from: str | None = None,
        grad_cache_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        # evaluation options are checked now, not at the first validation hours into a run
        from ..generation import GenerationConfig
        from ..model import RERANK_METHODS

        GenerationConfig(strategy=gen_strategy, max_new_tokens=gen_max_new_tokens, num_beams=gen_num_beams)
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
            raise ValueError(f"rerank must be an int >= 0 (0 = off), got {rerank!r}")
        if rerank_with not in RERANK_METHODS:
            raise ValueError(f"rerank_with must be one of {RERANK_METHODS}, got {rerank_with!r}")
        if grad_cache_chunk_size is not None and (
            isinstance(grad_cache_chunk_size, bool)
            or not isinstance(grad_cache_chunk_size, int)
            or grad_cache_chunk_size < 1
        ):
            raise ValueError(f"grad_cache_chunk_size must be an int >= 1 or None (off), got {grad_cache_chunk_size!r}")
        _check_optim_args(
            lr, weight_decay, betas, warmup_steps, min_lr_ratio, contrastive_weight, caption_weight, itm_weight
        )
        _check_finetune_args(
            encoder_lr, text_lr, decoder_lr, layer_decay, freeze_encoder_steps, freeze_encoder_trainable_last, ema_decay
        )
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
        if word_weight < 0:
            raise ValueError(f"word_weight must be >= 0, got {word_weight}")
        if word_weight > 0:
            rest["word_head"] = True
        if word_head_stage is not None:
            if word_weight <= 0:
                raise ValueError(
                    f"word_head_stage={word_head_stage} needs word_weight > 0 (nothing would train the head)"
                )
            rest["word_head_stage"] = word_head_stage
        if word_context:
            if word_weight <= 0:
                raise ValueError("word_context=True needs word_weight > 0 (nothing would train the word head)")
            rest["word_context"] = True
        if word_only_steps < 0 or (word_only_steps > 0 and word_weight <= 0):
            raise ValueError(f"word_only_steps must be >= 0 and needs word_weight > 0, got {word_only_steps}")
        if attn_word_weight < 0 or (attn_word_weight > 0 and word_weight <= 0):
            raise ValueError(
                f"attn_word_weight must be >= 0 and needs word_weight > 0 (the word head's maps are its targets), "
                f"got attn_word_weight={attn_word_weight}, word_weight={word_weight}"
            )
        if attn_word_objective not in ("map", "evidence"):
            raise ValueError(f"attn_word_objective must be 'map' or 'evidence', got {attn_word_objective!r}")
        if attn_word_phrase_words and attn_word_weight <= 0:
            # an ablation of the term (--model.attn_word_weight 0 on configs/shapes.yaml) should not need a 2nd flag
            warnings.warn(
                "attn_word_phrase_words is ignored: it shapes the targets of the word-attention term, which "
                f"attn_word_weight={attn_word_weight} turns off",
                stacklevel=2,
            )
        if word_only_schedule not in ("shared", "restart"):
            raise ValueError(f"word_only_schedule must be 'shared' or 'restart', got {word_only_schedule!r}")
        self._init_tokenizer: Any = None  # init_from's tokenizer, given to the data module at setup
        if init_from is None:
            self.model = create_model(preset, text=text, vision=vision, **rest)
        else:
            self.model = self._model_from(init_from, overrides or {}, img_size, rest)
        t = self.model.cfg.text
        if itm_weight <= 0 and self.model.itm_head is not None:
            # an untrained matching head would re-rank at random, and DDP would wait for its gradients
            self.model.itm_head.requires_grad_(False)
        self.model.itm_trained = itm_weight > 0 and self.model.itm_head is not None
        if grad_cache_chunk_size == 1 and self.model.itm_trained:
            raise ValueError(
                "grad_cache_chunk_size=1 with itm_weight > 0: the matching head's hard negatives are drawn within "
                "each chunk, and a chunk of one image has none (the head would never train); use chunks of 2 or more "
                "images, or itm_weight 0"
            )
        if grad_cache_chunk_size and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        ):
            warnings.warn(
                f"grad_cache_chunk_size={grad_cache_chunk_size} with BatchNorm layers in the model (its image "
                "encoder): they normalise each chunk by the chunk's own statistics, so the gradient is that of "
                "chunk-sized BatchNorm batches (as with gradient accumulation), not the whole batch's",
                stacklevel=2,
            )
        # the score this run evaluates retrieval with (and what retrieve() defaults to on its checkpoints)
        self.model.rerank_with_default = scoring_info({"itm_weight": itm_weight, "rerank_with": rerank_with})[
            "rerank_with"
        ]
        self.contrastive = ContrastiveLoss()
        # check_labels=False: the model's forward has range-checked the ids (one host sync per step is enough)
        self.caption_loss = CaptionLoss(pad_id=t.pad_id, label_smoothing=label_smoothing, check_labels=False)
        self.itm_loss = ITMLoss()
        self.word_loss = WordPresenceLoss(ignore_ids=(t.pad_id, t.bos_id, t.eos_id))
        if word_weight <= 0 and self.model.word_head is not None:
            self.model.word_head.requires_grad_(False)  # as the ITM head: nothing trains it, DDP must not wait
        if attn_entropy_weight < 0:
            raise ValueError(f"attn_entropy_weight must be >= 0, got {attn_entropy_weight}")
        self.attn_entropy = AttentionEntropyLoss(diversity=attn_diversity)
        self.word_attention = WordAttentionLoss(
            ignore_ids=(t.pad_id, t.bos_id, t.eos_id), objective=attn_word_objective
        )
        self._grounding_attn = grounding_layer_names(self.model, grounding_layers)  # what the word term pulls
        self._evaluator: EvalAccumulator | None = None
        self.last_metrics: dict[str, Any] = {}
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # encoder parameters frozen for the first freeze_encoder_steps (those MMXAttn froze for good stay out)
        self._freezable = _freezable_params(self.model, freeze_encoder_trainable_last) if freeze_encoder_steps else []
        self._frozen = False
        # EMA copy, built before any compile (a plain object: nothing registered, see mmxattn.lit.ema)
        self._ema = ModelEMA(self.model, ema_decay, warmup=ema_warmup) if ema_decay > 0 else None
        self._rng_batch_start: tuple[Any, ...] | None = None  # RNG states as the current training step began
        # which training batch last began ((epoch, batch_idx)) and how far its gradients got: "forward" (.grad as
        # before it), "backward" (running, or stopped part-way), "done" (.grad includes it), "stepping" (the
        # optimizer step has begun to change .grad: unscaling, dropping frozen ones, clipping)
        self._grad_progress = SimpleNamespace(batch=None, stage=None)
        self._pending_grads: dict[str, Any] | None = None  # a resumed window's saved gradients, not yet put back
        self._resumed_fit = False  # a fit resumed from a checkpoint whose first training batch has not begun
        # a Ctrl-C during the optimizer step is held back until the batch is counted (mmxattn/lit/sigint.py)
        self._sigint = SigintDeferral()
        self._compiled: Any = None  # torch.compile'd model forward (training only), kept out of the module tree
        self._compiled_ok = False
        self._zeroed_in_step = False  # grad caching zeroed .grad itself before its chunks' backward passes
        # grad caching: what .grad was before this batch's chunks (None: nothing; "kept": no chunked batch running)
        self._undo: dict[Any, Tensor] | str | None = "kept"

    def _ignore_unk_word(self) -> None:
        """The word loss never targets ``<unk>`` (it names no one thing to find): its id comes from the model's
        tokenizer, which setup() replaces with the data's, so it is looked up at each step, not once."""
        unk = getattr(getattr(self.model, "tokenizer", None), "unk_id", None)
        if unk is not None and int(unk) not in self.word_loss.ignore_ids:
            self.word_loss.ignore_ids += (int(unk),)

    def _model_from(self, path: str, overrides: dict[str, Any], img_size: int | None, rest: dict[str, Any]) -> Any:
        """The model of ``init_from``: its config with ``overrides`` (and ``rest``: the word-head switches) on top,
        its weights loaded (those the overrides add start fresh, warned; a changed shape is an error)."""
        from ..checkpoint import CheckpointError, load, state_dict_mismatch

        try:
            base = load(path)  # a .ckpt (its evaluated weights) or an export folder
        except (FileNotFoundError, CheckpointError) as e:
            raise CheckpointError(f"init_from: {e}") from e
        have = base.cfg.vision.img_size
        if img_size is not None and img_size != have:
            raise CheckpointError(
                f"init_from {path}: the model was trained at img_size {have}, the data gives {img_size}; set "
                f"--data.init_args.img_size {have} (the position embedding and the preprocessing are the model's)"
            )
        # the text settings the data module linked in are replaced by the model's: its tokenizer comes along
        extra = {k: v for k, v in rest.items() if getattr(base.cfg, k, None) != v}
        model = create_model(base.cfg, tokenizer=base.tokenizer, **{**overrides, **extra})
        own, given = model.state_dict(), base.state_dict()
        missing, unexpected, wrong = state_dict_mismatch(own, given)
        if wrong:
            raise CheckpointError(
                f"init_from {path}: the overrides change the shapes of its weights ({'; '.join(wrong[:4])}"
                f"{'; ...' if len(wrong) > 4 else ''}); leave those settings as the model has them"
            )
        model.load_state_dict(given, strict=False)
        missing = [k for k in missing if not k.endswith("relative_position_index")]
        if missing:
            warnings.warn(
                f"init_from {path}: {len(missing)} weights are not in the file and start fresh (what the overrides "
                f"add), e.g. {missing[:4]}",
                stacklevel=3,
            )
        if unexpected:
            warnings.warn(
                f"init_from {path}: {len(unexpected)} of its weights have no place in this model and are not used "
                f"(what the overrides remove), e.g. {unexpected[:4]}",
                stacklevel=3,
            )
        self._init_tokenizer = base.tokenizer
        model.train()
        return model

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self._init_tokenizer is not None and getattr(dm, "tokenizer", None) is not None:
            # init_from: the data module reads captions with the model's tokenizer (warned where it differs)
            self._use_checkpoint_tokenizer(self._init_tokenizer.to_dict(), where=f"init_from {self.hparams.init_from}")
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            # On a resume the checkpoint's tokenizer replaces this one afterwards (on_load_checkpoint runs later).
            problems = tokenizer_mismatch(tok, self.model.cfg.text)
            if problems:
                raise ValueError(f"the data's tokenizer does not fit the model: {'; '.join(problems)}")
            self.model.tokenizer = tok
        if stage == "fit" and self.hparams.get("grad_cache_chunk_size") and self._trainer is not None:
            from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

            strategy = self.trainer.strategy
            if strategy.handles_gradient_accumulation or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
                raise ValueError(
                    f"grad_cache_chunk_size={self.hparams.grad_cache_chunk_size} works with one device or DDP; "
                    f"{type(strategy).__name__} synchronises or shards gradients in every backward pass, and grad "
                    "caching runs one per chunk: leave grad_cache_chunk_size unset, or use strategy ddp"
                )
        if stage == "fit" and self.hparams.compile and self._compiled is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            reason = compile_unsupported_reason(device)
            if reason is None and (self.hparams.attn_entropy_weight > 0 or self.hparams.attn_word_weight > 0):
                reason = "attn_entropy_weight / attn_word_weight > 0 record attention weights inside the forward"
            if reason:
                warnings.warn(f"compile=True ignored: {reason}; training runs eager", stacklevel=2)
            else:
                if device.type == "cpu":
                    # CAT's oneDNN linear (a custom op with weights as inputs) cannot be lowered by inductor in
                    # training graphs; plain F.linear can. A process-wide switch: eager CPU runs lose it too.
                    from ..vision.windows import set_onednn_linear

                    set_onednn_linear(False)
                # the bound forward, not the module: nothing new is registered, so state-dict keys are unchanged
                self._compiled = torch.compile(self.model.forward)

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------ training
    def compute_losses(self, batch: dict[str, Any], contrastive: bool = True) -> tuple[Tensor, dict[str, Tensor], Any]:
        """(weighted total, unweighted terms, model output) of one training batch, in fp32 under autocast.
        ``contrastive=False`` leaves the contrastive term out (grad caching computes it over the whole batch)."""
        images, ids = batch["images"], batch["ids"]
        pos_ids = batch.get("pos_ids")
        tii = batch.get("text_image_index")  # several captions per image (the data's train_captions_per_image)
        word_only = self.training and self.global_step < self.hparams.word_only_steps
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if word_only and not distributed:
            return self._word_only_losses(images, ids, tii)
        entropy_maps = word_maps = None
        if self.hparams.attn_entropy_weight > 0 or self.hparams.attn_word_weight > 0:
            # the decoder's cross-attention weights, recorded with their graph (the eager math, these layers only)
            which = "decoder.blocks.*.cross_attn" if self.hparams.attn_entropy_weight > 0 else self._grounding_attn
            with capture_attention(self.model, which=which, keep_grad=True) as maps:
                out = self._train_forward(images, ids, tii)
            if self.hparams.attn_entropy_weight > 0:
                entropy_maps = maps
            if self.hparams.attn_word_weight > 0:
                word_maps = [maps[n] for n in self._grounding_attn]
        else:
            out = self._train_forward(images, ids, tii)
        # Under bf16/fp16 autocast the embeddings and logits come out in half precision: the softmax
        # cross-entropies are taken in fp32 (a no-op copy-free .float() when they already are).
        losses = {"caption": self.caption_loss(out.logits.float(), ids[:, 1:])}
        loss = self.hparams.caption_weight * losses["caption"]
        if contrastive:
            losses["contrastive"] = self.contrastive(
                out.image_embeds.float(),
                out.text_embeds.float(),
                out.logit_scale.float(),
                pos_ids=pos_ids,
                text_image_index=tii,
            )
            loss = self.hparams.contrastive_weight * losses["contrastive"] + loss
        if self.hparams.itm_weight > 0 and self.model.itm_head is not None:
            losses["itm"] = self._itm(out, ids, pos_ids, tii)
            loss = loss + self.hparams.itm_weight * losses["itm"]
        if self.hparams.word_weight > 0:
            self._ignore_unk_word()
            losses["word"] = self.word_loss(out.word_tokens, self.model.word_head, ids, tii)
            loss = loss + self.hparams.word_weight * losses["word"]
        if entropy_maps is not None:
            # queries that predict a real token (query t predicts ids[:, t + 1]; the last one predicts nothing)
            predicts = F.pad(ids[:, 1:] != self.model.cfg.text.pad_id, (0, 1), value=False)
            losses["attn_entropy"] = self.attn_entropy(list(entropy_maps.values()), predicts)
            loss = loss + self.hparams.attn_entropy_weight * losses["attn_entropy"]
        if word_maps is not None:
            probs = out.word_probs
            if probs is None:
                probs = self.model.word_probs_per_image_token(out.word_tokens, images)
            if self.hparams.get("attn_word_phrase_words") and not self.word_attention.phrase_ids:
                self.word_attention.phrase_ids = self._phrase_ids(self.hparams.attn_word_phrase_words)
            losses["word_attention"] = self.word_attention(word_maps, probs, ids[:, 1:], tii)
            loss = loss + self.hparams.attn_word_weight * losses["word_attention"]
        if word_only:  # distributed: every parameter DDP expects gets a (zero) gradient from the other terms
            loss = self.hparams.word_weight * losses["word"] + 0.0 * loss
        return loss, losses, out

    def _train_forward(self, images: Tensor, ids: Tensor, text_image_index: Tensor | None = None) -> Any:
        if self._compiled is None or not self.training:
            return self.model(images, ids, text_image_index)
        try:
            out = self._compiled(images, ids, text_image_index)
        except Exception as e:  # noqa: BLE001 -- the compiler's failures have many types; see below
            # Before the first compiled step succeeded anything may be the compiler's fault; afterwards only
            # dynamo's own errors (a recompilation) are, and the rest (bad input, OOM) must surface.
            from torch._dynamo.exc import TorchDynamoException

            if self._compiled_ok and not isinstance(e, TorchDynamoException):
                raise
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training continues eager", stacklevel=2
            )
            self._compiled = None
            return self.model(images, ids, text_image_index)
        self._compiled_ok = True
        return out

    def _word_only_losses(self, images: Tensor, ids: Tensor, tii: Tensor | None) -> tuple[Tensor, dict, Any]:
        """The ``word_only_steps`` phase: the word-presence loss on the word head's tokens, nothing else computed."""
        self._ignore_unk_word()
        word = self.word_loss(self.model.encode_word_tokens(images), self.model.word_head, ids, tii)
        return self.hparams.word_weight * word, {"word": word}, SimpleNamespace(logit_scale=self.model.logit_scale)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self._track_skipped(batch)
        if "images" not in batch:  # every sample of this batch was broken (skipped and counted)
            return None
        chunk = self.hparams.get("grad_cache_chunk_size")
        distributed = self._trainer is not None and self.trainer.world_size > 1
        # under DDP every rank takes the same path whatever its batch size (their collectives must pair up)
        if chunk and (distributed or batch["images"].shape[0] > chunk):
            loss, losses, out = self._grad_cache_losses(batch, batch_idx, chunk)
        else:
            loss, losses, out = self.compute_losses(batch)
        if not self._all_finite(loss):
            self._undo_chunks()
            return self._nonfinite(loss, batch_idx)
        self._undo = "kept"  # grad caching's copy of the window's gradients is no longer needed
        bs = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/logit_scale", out.logit_scale, batch_size=bs)
        return loss

    def _grad_cache_losses(self, batch: dict[str, Any], batch_idx: int, size: int) -> tuple[Tensor, dict, Any]:
        """:meth:`compute_losses` of a batch, ``size`` images at a time (gradient caching,
        :mod:`mmxattn.lit.gradcache`): the contrastive term over the whole batch (under DDP, against every rank's
        embeddings, as unchunked), the other terms per chunk weighted by its share: the caption loss by its share
        of the batch's caption tokens (so that it is the whole batch's token mean), the ITM term by its share of
        the captions of chunks with more than one image (a chunk of one image has no negative to match against),
        the others by its share of the captions. Every chunk but the last is backpropagated here; the returned loss
        has the last chunk's graph and the whole batch's value. Nothing here is a collective but the contrastive
        loss's gather: under DDP, ranks whose batches split into different numbers of chunks stay in step."""
        hp, trainer = self.hparams, self._trainer
        chunks = split_batch(batch, size)
        if trainer is None or batch_idx % trainer.accumulate_grad_batches == 0:
            # a window's first micro-batch, whose .grad Lightning zeroes after the training step: zeroed now
            # instead, before the chunks add to it (optimizer_zero_grad then leaves it alone)
            for p in self.parameters():
                p.grad = None
            self._zeroed_in_step, self._undo = True, None
        else:  # a skipped or stopped batch leaves the window's gradients so far as they were
            self._undo = {p: p.grad.clone() for p in self.parameters() if p.grad is not None}
        distributed = trainer is not None and trainer.world_size > 1
        word_only = self.global_step < hp.word_only_steps
        # the word-only phase has no contrastive term; under DDP it is kept at weight 0, as compute_losses does, so
        # that the reducer sees a gradient for every parameter
        c_weight = 0.0 if word_only else hp.contrastive_weight
        streams = ChunkStreams(self.device, len(chunks))
        try:
            cache = c_loss = None
            if not word_only or distributed:
                img, txt = [], []
                bn = batchnorm_buffers(self.model)  # the graph pass updates BatchNorm statistics, this one must not
                with torch.no_grad():
                    for n, c in enumerate(chunks):
                        streams.enter(n)
                        i, t = self.model.training_embeddings(c.batch["images"], c.batch["ids"])
                        img.append(i.float())
                        txt.append(t.float())
                    for buffer, saved in bn:
                        buffer.copy_(saved)
                rows = torch.cat([c.rows for c in chunks])  # the texts' order in txt
                img, txt = torch.cat(img).requires_grad_(), torch.cat(txt).requires_grad_()
                scale = self.model.get_logit_scale().detach().float().requires_grad_()
                tii, pos = batch.get("text_image_index"), batch.get("pos_ids")
                with torch.enable_grad():
                    c_loss = self.contrastive(
                        img,
                        txt,
                        scale,
                        pos_ids=None if pos is None else pos[rows],
                        text_image_index=None if tii is None else tii[rows],
                    )
                cache = torch.autograd.grad(c_loss, [img, txt, scale])
            return self._chunk_passes(batch, chunks, streams, cache, c_loss, c_weight, word_only)
        finally:
            streams.leave()

    def _chunk_passes(
        self,
        batch: dict[str, Any],
        chunks: list[Any],
        streams: ChunkStreams,
        cache: tuple[Tensor, Tensor, Tensor] | None,
        c_loss: Tensor | None,
        c_weight: float,
        word_only: bool,
    ) -> tuple[Tensor, dict, Any]:
        """The graph pass of :meth:`_grad_cache_losses`: each chunk's forward, losses and (but the last) backward."""
        hp, trainer = self.hparams, self._trainer
        pad = self.model.cfg.text.pad_id
        n_rows, n_labels = batch["ids"].shape[0], max(label_count(batch["ids"], pad), 1)
        itm_rows = max(sum(c.rows.numel() for c in chunks if c.stop - c.start > 1), 1)
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        logged: dict[str, Tensor] = {} if word_only else {"contrastive": c_loss.detach()}
        value = 0.0 if word_only else c_weight * c_loss.detach()
        first_text, last = 0, len(chunks) - 1
        for n, c in enumerate(chunks):
            streams.enter(n)  # from the start of the chunk's stream: the graph-free pass's masks
            loss, terms, out = self.compute_losses(c.batch, contrastive=False)
            rows = c.rows.numel()
            share = {
                "": rows / n_rows,
                "caption": label_count(c.batch["ids"], pad) / n_labels,
                "itm": rows / itm_rows if c.stop - c.start > 1 else 0.0,
            }
            part = share[""] * loss
            if not word_only:  # (in the word-only phase under DDP the other terms are in the graph at weight 0)
                for k, w in (("caption", hp.caption_weight), ("itm", hp.itm_weight)):
                    if k in terms:
                        part = part + (share[k] - share[""]) * w * terms[k]
            value = value + part.detach()
            for k, v in terms.items():
                logged[k] = logged.get(k, 0.0) + share.get(k, share[""]) * v.detach()
            if cache is not None:
                g_img, g_txt, g_scale = cache
                g_txt, first_text = g_txt[first_text : first_text + rows], first_text + rows
                dot = (out.image_embeds.float() * g_img[c.start : c.stop]).sum()
                dot = dot + (out.text_embeds.float() * g_txt).sum()
                if n == last:  # the temperature's gradient, once: in the graph DDP's reducer synchronises
                    dot = dot + out.logit_scale.float() * g_scale
                part = part + c_weight * dot
            if not bool(torch.isfinite(part)):  # local: the step's decision is taken across ranks by the caller
                return value + part.detach(), logged, out
            if n < last:
                if n == 0:
                    # .grad now holds part of this batch, until the step's end: a Ctrl-C waits for the batch to end
                    self._defer_ctrl_c()
                self._grad_progress.stage = "backward"
                # as Lightning's backward of the returned loss: divided by the accumulation window, then scaled
                inner = part / accumulate if accumulate > 1 else part
                (inner if scaler is None else scaler.scale(inner)).backward()
        return part + (value - part.detach()), logged, out

    def _undo_chunks(self) -> None:
        """A skipped or stopped grad-cached batch: .grad back to what it was before its chunks' backward passes."""
        undo, self._undo = self._undo, "kept"
        if undo == "kept":
            return
        for p in self.parameters():
            p.grad = None if undo is None else undo.get(p)
        self._grad_progress.stage = "forward"

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self._zeroed_in_step:  # grad caching zeroed .grad before its chunks' backward passes: keep what they added
            self._zeroed_in_step = False
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _itm(self, out, ids: Tensor, pos_ids: Tensor | None, tii: Tensor | None = None) -> Tensor:
        """Matching loss on the positives plus one hard negative text per image and one hard negative image per
        text, sampled by similarity (BLIP, Li et al. 2022); the positives reuse the caption pass's decoder. With
        several captions per image, every (image, caption) pair is a row, and no text of an image (nor an equal
        string) is drawn as that image's negative."""
        m = self.model
        rows = torch.arange(ids.shape[0], device=ids.device)
        img_of = rows if tii is None else tii  # image row of every pair
        with torch.no_grad():
            sim = out.image_embeds[img_of] @ out.text_embeds.T
            mask = None if tii is None else positive_mask(tii, out.image_embeds.shape[0], pos_ids)[tii]
            neg_t, neg_i = sample_hard_negatives(sim, pos_ids=pos_ids, pos_mask=mask)
        vt, vi = neg_t >= 0, neg_i >= 0
        img_idx = img_of[torch.cat([rows[vt], neg_i[vi]])]
        txt_idx = torch.cat([neg_t[vt], rows[vi]])
        pos_logits = m.itm_from_decoder(out.decoder_states, ids)
        if txt_idx.numel() == 0:
            # no negative anywhere in the batch (one pair, all captions equal, or a batch thinned by skipped
            # samples): nothing to tell matching from, so the term is zero for this batch (with the head still
            # in the graph, so DDP sees its gradient)
            return pos_logits.float().sum() * 0.0
        # every image's keys/values projected once for all the pairs it appears in
        neg_logits = m.itm_logits(out.image_tokens, ids[txt_idx], out.text_states[txt_idx], image_index=img_idx)
        logits = torch.cat([pos_logits, neg_logits]).float()  # (N, 2), fp32 under autocast
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

    # ------------------------------------------------------------------ freezing / EMA
    def encoder_frozen(self, step: int | None = None) -> bool:
        """Whether the encoder is frozen at optimizer step ``step`` (default: the current global step)."""
        step = self.global_step if step is None else step
        return bool(self._freezable) and step < self.hparams.freeze_encoder_steps

    def _set_frozen(self, frozen: bool) -> None:
        if frozen == self._frozen:
            return
        for p in self._freezable:
            p.requires_grad_(not frozen)
        self._frozen = frozen

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the RNG streams as this step starts: an interrupt checkpoint taken inside the step saves these
        self._rng_batch_start = (torch.get_rng_state(), random.getstate(), np.random.get_state(), _cuda_rng_state())
        if self._resumed_fit:
            self._resumed_fit = False
            self._first_resumed_batch(batch_idx)
        elif self._pending_grads is not None:  # the redone micro-batch ran no backward this time (skipped)
            self._pending_grads = None
            warnings.warn(
                "the checkpoint's partial accumulation gradients were not put back (the redone micro-batch ran no "
                "backward): this optimizer step sums fewer micro-batches",
                stacklevel=2,
            )
        self._grad_progress.batch, self._grad_progress.stage = (self.current_epoch, batch_idx), "forward"
        self._zeroed_in_step, self._undo = False, "kept"
        if self._freezable:
            # requires_grad toggling only on one process: DDP's reducer needs a fixed set of gradients
            distributed = self._trainer is not None and self.trainer.world_size > 1
            self._set_frozen(self.encoder_frozen() and not distributed)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._defer_ctrl_c()
        self._grad_progress.stage = "stepping"  # .grad is about to change (frozen ones dropped, then clipping)
        # Runs before gradient clipping and the step: dropped gradients make AdamW skip the parameter (no update,
        # no weight decay, no moments), and the clipping norm covers only what is trained.
        if self.encoder_frozen():
            for p in self._freezable:
                p.grad = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any | None = None) -> None:
        closure = optimizer_closure
        if closure is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            closure = functools.partial(self._closure_then_unscaling, closure)
        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        self.model.clamp_logit_scale_()  # CLIP's rule: the learned temperature stays within its bound
        # the EMA update belongs to the optimizer step itself: callbacks' on_train_batch_end (where ModelCheckpoint
        # saves every_n_train_steps, e.g. last.ckpt) run before the module's, so an update made there was missing
        # from the step's checkpoint and lost on resume
        if self._ema is not None:
            self._ema.to(self.device).update(self.model)

    def _closure_then_unscaling(self, closure: Any) -> Any:
        out = closure()  # training step and backward of the window's last micro-batch
        self._defer_ctrl_c()
        self._grad_progress.stage = "stepping"  # 16-mixed: the loss scaler unscales .grad right after this
        return out

    # ------------------------------------------------------------------ Ctrl-C during the optimizer step
    # From the moment the optimizer step starts changing .grad (unscaling, clipping) and the weights, until
    # Lightning has counted the batch (on_train_batch_end), a Ctrl-C is held back: raised there, the interrupt
    # checkpoint holds the stepped weights with the batch counted, and a resumed run goes on at the next batch
    # (a Ctrl-C inside AdamW's update left part of the parameters stepped, and the batch was redone on them).

    def _defer_ctrl_c(self) -> None:
        ref = weakref.ref(self)  # the handler must not keep the module alive

        def still_training() -> bool:
            module = ref()
            trainer = None if module is None else module._trainer
            return trainer is not None and trainer.training and trainer.state.status == "running"

        self._sigint.start(still_training)

    def _raise_held_back_ctrl_c(self) -> None:
        if self._sigint.stop():
            raise KeyboardInterrupt

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._raise_held_back_ctrl_c()  # the batch is counted (processed): a resume goes on at the next one

    def on_train_end(self) -> None:
        self._set_frozen(False)
        self._raise_held_back_ctrl_c()  # a Ctrl-C during the last step: stop as asked (no test run follows)

    # ------------------------------------------------------------------ accumulation windows across a resume
    # Lightning counts the micro-batches of an accumulation window by the epoch's batch index (it zeroes .grad
    # before the backward of batch_idx % K == 0 and steps after that of (batch_idx + 1) % K == 0), and a resumed
    # run goes on from the batch its checkpoint stopped at: mid-window, the .grad that the earlier micro-batches
    # had summed must come back, or that step sums fewer than K of them. on_save_checkpoint stores it, the first
    # resumed batch puts it back.

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        progress = self._grad_progress
        progress.stage = "backward"
        if loss.requires_grad:
            # "done" is set by the autograd engine itself as the backward's last act: a Ctrl-C that arrives during
            # the backward (C++) is raised only once it is back in Python code, and must find the stage "done".
            # The callback is a builtin (setattr on a plain namespace): no Python code, nothing to interrupt.
            done = functools.partial(setattr, progress, "stage", "done")
            queue = torch.autograd.Variable._execution_engine.queue_callback
            loss.register_hook(lambda _grad: queue(done))
        super().backward(loss, *args, **kwargs)

    def on_after_backward(self) -> None:
        self._grad_progress.stage = "done"
        pending = self._pending_grads
        if pending is not None and pending["restore"] == "after_backward":  # the first resumed batch (checked)
            # the interrupted micro-batch has been redone (same weights, data and random numbers): .grad becomes
            # what it was then, its gradient added to those of the window's micro-batches before it
            self._put_back_grads(pending)

    def _partial_grads_to_save(self) -> dict[str, Any] | None:
        """What ``checkpoint["mmxattn_partial_grads"]`` holds when a checkpoint is written in the middle of an
        accumulation window: the parameters' summed gradients (by name, those that are not None), the batch at
        which a resume puts them back (before it runs, or right after its backward when the checkpoint was taken
        after the backward of a micro-batch that the resume redoes), and what must not have changed. None when
        the next batch starts a window (Lightning zeroes .grad there), without accumulation, or where they cannot
        be saved (warned)."""
        trainer = self._trainer
        if trainer is None or getattr(trainer.state, "fn", None) != "fit" or trainer.accumulate_grad_batches <= 1:
            return None
        if self._pending_grads is not None:  # saved again before the resumed batch they belong to got them
            return self._pending_grads
        now = trainer.fit_loop.epoch_loop.batch_progress.current
        # the batch a resume from this checkpoint runs first: an unfinished one is redone (the RNG states above)
        resume_at = now.processed
        if resume_at % trainer.accumulate_grad_batches == 0 or resume_at >= trainer.num_training_batches:
            return None
        epoch, last = self.current_epoch, self._grad_progress
        if last.batch == (epoch, resume_at) and last.stage in ("forward", "done"):
            restore = "batch_start" if last.stage == "forward" else "after_backward"
        elif last.batch == (epoch, resume_at - 1) and last.stage in ("forward", "done"):
            restore = "batch_start"  # that batch ran to its end (no backward at all when it was skipped)
        else:
            why = {
                "backward": "during a backward pass (the gradients may be partly summed)",
                "stepping": "during an optimizer step (the gradients were being unscaled, dropped or clipped)",
            }.get(last.stage, "outside a training batch")
            return self._partial_grads_lost(f"the checkpoint was written {why}")
        if trainer.world_size > 1 or trainer.strategy.handles_gradient_accumulation:
            return self._partial_grads_lost(
                f"{type(trainer.strategy).__name__} on {trainer.world_size} processes keeps a partial sum per rank"
            )
        # 16-mixed: .grad holds gradients of the scaled loss. The scale changes only in scaler.update(), after a
        # window's optimizer step, and the checkpoint holds the GradScaler's state: the resumed micro-batches are
        # scaled alike, so the saved and the new gradients add up as in the uninterrupted run. The scale is kept
        # to check that (a resume under another precision, or a changed scaler, drops the gradients).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return {
            "grads": {n: p.grad.detach() for n, p in self.named_parameters() if p.grad is not None},
            "epoch": epoch,
            "batch_idx": resume_at,
            "restore": restore,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "loss_scale": None if scaler is None else float(scaler.get_scale()),
        }

    def _partial_grads_lost(self, why: str) -> None:
        warnings.warn(
            f"checkpoint written in the middle of an accumulation window, without the window's gradients so far "
            f"({why}): a run resumed from it sums fewer than accumulate_grad_batches micro-batches at its first "
            "optimizer step",
            stacklevel=3,
        )
        return None

    def _first_resumed_batch(self, batch_idx: int) -> None:
        """The first training batch of a resumed fit: it gets the saved gradients of its window, if any."""
        pending, trainer = self._pending_grads, self.trainer
        k = trainer.accumulate_grad_batches
        if pending is None:
            if batch_idx % k != 0 and trainer.world_size == 1:
                warnings.warn(
                    f"resumed at batch {batch_idx}, in the middle of an accumulation window of {k}, from a checkpoint "
                    "without the window's gradients so far (mmxattn_partial_grads; written by an older version, or "
                    "during a backward pass or an optimizer step): this optimizer step sums fewer micro-batches",
                    stacklevel=2,
                )
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = None if scaler is None else float(scaler.get_scale())
        wanted = (pending["epoch"], pending["batch_idx"], pending["accumulate_grad_batches"], pending["loss_scale"])
        if (self.current_epoch, batch_idx, k, scale) != wanted:
            self._pending_grads = None
            warnings.warn(
                "the checkpoint's partial accumulation gradients (mmxattn_partial_grads) are for epoch "
                f"{wanted[0]}, batch {wanted[1]}, accumulate_grad_batches={wanted[2]}, loss scale {wanted[3]}; this "
                f"run resumed at epoch {self.current_epoch}, batch {batch_idx}, accumulate_grad_batches={k}, loss "
                f"scale {scale}: they are dropped, and this optimizer step sums fewer micro-batches",
                stacklevel=2,
            )
        elif pending["restore"] == "batch_start":
            self._put_back_grads(pending)  # no zero_grad inside a window: the backward adds to these

    def _put_back_grads(self, pending: dict[str, Any]) -> None:
        self._pending_grads = None
        grads = pending["grads"]
        named = dict(self.named_parameters())
        bad = sorted(n for n, g in grads.items() if n not in named or tuple(g.shape) != tuple(named[n].shape))
        if bad:
            warnings.warn(
                f"the checkpoint's partial accumulation gradients do not fit this model ({bad[:3]}): dropped",
                stacklevel=3,
            )
            return
        for name, p in named.items():  # a parameter without a saved gradient had none then
            g = grads.get(name)
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)

    @property
    def eval_model(self) -> Any:
        """The model that validation and test evaluate: the EMA copy once it has been updated, else the model."""
        if self._ema is None or self._ema.num_updates == 0:
            return self.model
        ema = self._ema.to(self.device).module
        ema.tokenizer, ema.transform = self.model.tokenizer, self.model.transform
        return ema

    def on_train_epoch_end(self) -> None:
        self._raise_held_back_ctrl_c()  # an epoch cut short after a step (on_train_batch_start returned -1)
        dm = getattr(self.trainer, "datamodule", None)
        tracker = getattr(dm, "skip_tracker", None)
        if tracker is not None and hasattr(tracker, "end_epoch"):
            summary = tracker.end_epoch(complete=self._epoch_ran_to_its_end(tracker))
            if summary.get("n_skipped"):
                self.print(
                    f"epoch {self.current_epoch}: skipped {summary['n_skipped']} broken samples, e.g. "
                    f"{summary.get('examples', [])[:3]}"
                )
            self.log("data/skipped", float(summary.get("n_skipped", 0)), sync_dist=True, reduce_fx="sum")

    def _epoch_ran_to_its_end(self, tracker: Any) -> bool:
        """Whether this training epoch ran every one of its batches in this process (not stopped by ``max_steps``,
        not resumed mid-way), so that the broken-sample share the tracker counted is the epoch's."""
        t = self.trainer
        if 0 < t.max_steps <= t.global_step:
            return False
        n = t.num_training_batches
        return math.isinf(n) or getattr(tracker, "n_batches", n) >= n

    def _phrase_ids(self, words: list[str]) -> tuple[int, ...]:
        """Token ids of ``attn_word_phrase_words`` in the model's tokenizer (looked up when first needed: setup
        may replace the tokenizer with the data's)."""
        tok = self.model.tokenizer
        vocab = list(getattr(tok, "vocab", None) or [])
        missing = [w for w in words if w not in vocab]
        if missing:
            raise ValueError(
                f"attn_word_phrase_words: {missing} are not single tokens of the tokenizer "
                f"({type(tok).__name__}, {len(vocab)} words)"
            )
        return tuple(vocab.index(w) for w in words)

    # ------------------------------------------------------------------ evaluation
    def _make_evaluator(self, test: bool) -> EvalAccumulator:
        h = self.hparams
        gen = {"strategy": h.gen_strategy, "max_new_tokens": h.gen_max_new_tokens}
        if h.gen_strategy == "beam":
            gen["num_beams"] = h.gen_num_beams
        # a validation within the word-only phase scores retrieval only: the decoder has not trained yet, so its
        # captions and re-ranking would cost time (a third of such an epoch on the shapes job) and say nothing
        word_phase = not test and 0 < h.get("word_only_steps", 0) and self.global_step <= h.word_only_steps
        captions = (test or h.val_captions) and not word_phase and self.model.tokenizer is not None
        return EvalAccumulator(
            self.eval_model,
            rerank=0 if word_phase else h.rerank,
            rerank_with=self.model.rerank_with_default,
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
        self._evaluator.update(batch)  # counts skipped broken samples too (an all-broken batch has no images)

    test_step = validation_step

    def _log_eval(self, prefix: str) -> None:
        metrics = self._evaluator.compute()
        self.last_metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        numeric = {k: float(v) for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
        # Already global (every rank gathers the whole set inside compute), the same on every rank: sync_dist with
        # "max" changes no value (exactly, unlike a mean) and keeps Lightning from warning once per metric under DDP
        self.log_dict(numeric, prog_bar=False, rank_zero_only=False, sync_dist=True, reduce_fx="max")
        self._evaluator.reset()

    def _on_any_rank(self, flag: bool) -> bool:
        # every rank must take the same branch: computing the metrics gathers across ranks
        return self.trainer.strategy.reduce_boolean_decision(flag, all=False) if self._trainer is not None else flag

    def on_validation_epoch_end(self) -> None:
        if self._evaluator is None:
            return
        if self._on_any_rank(bool(self._evaluator.records)):
            self._log_eval("val")
        elif self._on_any_rank(bool(self._evaluator.skipped)):  # training goes on; the test split must be readable
            skipped = self._evaluator.skipped_samples()
            monitors = sorted(
                {
                    str(m)
                    for cb in self.trainer.callbacks
                    if str(m := getattr(cb, "monitor", None) or "").startswith("val/")
                }
            )
            if monitors and self.trainer.state.fn == "fit":  # a checkpoint / early-stopping callback would fail on it
                from ..data.robust import BadDataError

                raise BadDataError(
                    f"validation: all {len(skipped)} samples were broken (e.g. {skipped[:3]}), so {monitors} cannot "
                    "be computed for the callbacks that monitor them; fix or replace the validation split (val_path)"
                )
            self.print(f"validation: all {len(skipped)} samples were broken and skipped, e.g. {skipped[:3]}")
            self._evaluator.reset()

    def on_test_epoch_end(self) -> None:
        if self._evaluator is not None and self._on_any_rank(bool(self._evaluator.records or self._evaluator.skipped)):
            self._log_eval("test")  # all broken: BadDataError naming them

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        self._set_frozen(False)  # the optimizer holds every trainable parameter, frozen or not
        opt = build_optimizer(
            self.model,
            lr=h.lr,
            weight_decay=h.weight_decay,
            betas=tuple(h.betas),
            encoder_lr=h.get("encoder_lr"),
            text_lr=h.get("text_lr"),
            decoder_lr=h.get("decoder_lr"),
            layer_decay=h.get("layer_decay", 1.0),
            fused=None if self._fused_adamw_allowed() else False,
        )
        # the total is read lazily (see warmup_cosine): asking now would build the train loader before a resume
        sched = warmup_cosine(
            opt,
            warmup_steps=h.warmup_steps,
            total_steps=lambda: max(h.warmup_steps + 1, int(self.trainer.estimated_stepping_batches)),
            min_ratio=h.min_lr_ratio,
            restart_at=h.word_only_steps if h.get("word_only_schedule", "shared") == "restart" else 0,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_adamw_allowed(self) -> bool:
        """False when the trainer clips gradients under Lightning's mixed precision (bf16-mixed / 16-mixed): its
        clipping refuses optimizers that unscale gradients themselves, as the fused AdamW does; and under any
        precision plugin with a loss scaler (FSDP's 16-mixed), which lets a fused optimizer skip the unscaling
        before clipping, so the norm would be clipped on gradients still multiplied by the loss scale."""
        if self._trainer is None:
            return True
        from pytorch_lightning.plugins.precision import MixedPrecision

        trainer = self.trainer
        plugin = trainer.precision_plugin
        scaled = isinstance(plugin, MixedPrecision) or getattr(plugin, "scaler", None) is not None
        return not (trainer.gradient_clip_val and scaled)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's default, except under FSDP: there the trainer's norm clipping is refused (torch's
        ``clip_grad_norm_`` is wrong on sharded gradients), so the root FSDP module's own ``clip_grad_norm_``,
        which reduces the norm over all shards, clips instead."""
        root = self.trainer.strategy.model if self._trainer is not None else None
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and _is_fsdp_root(root):
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def _check_checkpoint_fits(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another model configuration is one error naming the settings that differ (Lightning's
        strict load would print a size-mismatch line per tensor and name neither the file nor the setting)."""
        sd = checkpoint.get("state_dict")
        strategy = type(getattr(self._trainer, "strategy", None)).__name__ if self._trainer is not None else ""
        if not isinstance(sd, dict) or "FSDP" in strategy or "DeepSpeed" in strategy:
            return  # sharded strategies hold other names and shapes here: Lightning's own loading checks those
        from ..checkpoint import CheckpointError, state_dict_mismatch

        missing, unexpected, mismatched = state_dict_mismatch(self.state_dict(), sd)
        if not (mismatched or missing or unexpected):
            return

        def flat(d: Any, prefix: str = "") -> dict[str, Any]:
            if not isinstance(d, dict):
                return {prefix.rstrip("."): d}
            return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

        theirs, ours = flat(checkpoint.get("mmxattn_config") or {}), flat(config_to_dict(self.model.cfg))
        diff = [
            f"{k}: {theirs.get(k)!r} in the checkpoint, {ours.get(k)!r} here"
            for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)
        ]
        preset = (checkpoint.get("hyper_parameters") or {}).get("preset")
        if preset is not None and preset != self.hparams.get("preset"):
            diff.insert(0, f"preset: {preset!r} in the checkpoint, {self.hparams.get('preset')!r} here")
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        shown = "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "")
        saved_tok = checkpoint.get("mmxattn_tokenizer")
        if theirs.get("text.vocab_size") != ours.get("text.vocab_size") and (
            isinstance(saved_tok, dict) and saved_tok.get("type") == "word"
        ):
            # the usual cause: the data's word vocabulary was rebuilt from a train file with other words
            fix = (
                "The run's word vocabulary differs from the one the data built now (a train file with other words): "
                "read the data with the run's tokenizer (python -m mmxattn export --ckpt <this checkpoint> --out DIR, "
                "then --data.init_args.tokenizer DIR), or, to train on the new data from these weights as a new run, "
                "--model.init_from <this checkpoint> instead of --ckpt_path"
            )
        else:
            fix = (
                "Build the model as the run did (its config, e.g. the config.yaml saved with its logs, or the same "
                "--model.* settings)"
            )
        raise CheckpointError(
            f"checkpoint {path or ''} was written by a model of another configuration ({len(mismatched)} tensors of "
            f"other shapes, {len(missing)} missing, {len(unexpected)} unexpected). Differing settings: "
            f"{shown or 'none recorded'}. {fix}"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain data only, so the file loads with torch.load(weights_only=True).
        if self._ema is not None and self._ema.num_updates > 0:
            # The EMA weights are what the run evaluates: they go where every reader looks (state_dict "model.*");
            # the training weights, needed to resume, go aside (on_load_checkpoint swaps them back).
            sd = checkpoint["state_dict"]
            ema = self._ema.state_dict()
            checkpoint["mmxattn_ema"] = {
                "training_weights": {k: sd[f"model.{k}"] for k in ema},
                "num_updates": self._ema.num_updates,
                "decay": self._ema.decay,
            }
            sd.update({f"model.{k}": v for k, v in ema.items()})
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
                    "init_args": {
                        k: _absolute_if_local_path(k, v)
                        for k, v in dict(hp).items()
                        # LightningCLI adds "_class_path" (and similar private keys) to the hparams: not init args
                        if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, type(None)))
                    },
                }
        checkpoint["mmxattn_preprocess"] = pre
        torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        cuda_state = _cuda_rng_state()
        progress = getattr(
            getattr(getattr(self._trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None
        )
        now = getattr(progress, "current", None)
        if now is not None and self._rng_batch_start is not None and now.started > now.processed:
            # saved in the middle of a training step (an interrupt): the step is redone on resume, so it must draw
            # the random numbers it drew the first time
            torch_state, py_state, np_state, cuda_state = self._rng_batch_start
            self._uncount_the_redone_batch(checkpoint)
        checkpoint["mmxattn_rng"] = {
            "torch": torch_state,
            "python": _to_plain(py_state),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }
        if cuda_state is not None:  # this process's GPU (drop path and hard-negative draws run there)
            checkpoint["mmxattn_rng"]["cuda"] = cuda_state
        partial = self._partial_grads_to_save()
        if partial is not None:
            checkpoint["mmxattn_partial_grads"] = partial

    def _uncount_the_redone_batch(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved in the middle of a training step (an interrupt): Lightning's restart counts the
        interrupted batch as stepped in its logging step (``_batches_that_stepped``) wherever the batch would end an
        accumulation window (it assumes a save at the batch's end), and the redone batch counts it again, so every
        metric after the resume was logged one step later than in the uninterrupted run. The saved count is one
        lower for that case, so that the restart's increment lands where the run was."""
        loop = self._trainer.fit_loop.epoch_loop
        if loop._should_accumulate():  # mid-window: the restart adds nothing
            return
        state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
        if isinstance(state, dict) and isinstance(state.get("_batches_that_stepped"), int):
            state["_batches_that_stepped"] -= 1  # -1 at batch 0: the restart makes it 0

    def _use_checkpoint_tokenizer(self, saved: Any, where: str | None = None) -> None:
        """The checkpoint's weights were trained with its tokenizer, so it wins over the one this run built: a word
        vocabulary rebuilt from a slightly edited train file can hold as many words in another order, and every
        embedding row would silently name another word. The data module is given the saved tokenizer too (its
        ``use_tokenizer``), with a warning naming what changed; a data module that cannot switch is an error.

        Runs after ``setup`` (which attached the data's tokenizer) for ``fit/validate/test(ckpt_path=...)`` and
        ``load_from_checkpoint``, and from ``setup`` itself for ``init_from`` (``where`` then names that file)."""
        from ..checkpoint import CheckpointError
        from ..text.tokenizer import tokenizer_from_dict

        if where is None:
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            where = f"checkpoint {path}" if path else "the checkpoint"
        try:
            if not isinstance(saved, dict):
                raise TypeError(f"mmxattn_tokenizer is a {type(saved).__name__}, not a mapping")
            tok = tokenizer_from_dict(saved)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: its tokenizer (mmxattn_tokenizer) is invalid: {e}") from e
        problems = tokenizer_mismatch(tok, self.model.cfg.text)
        if problems:
            raise CheckpointError(f"{where}: its tokenizer does not fit its model's config: {'; '.join(problems)}")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        current = getattr(dm, "tokenizer", None)
        if current is None:
            current = self.model.tokenizer
        if current is not None and _same_tokenizer(current, tok):
            self.model.tokenizer = current
            return
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            change = _tokenizer_change(current, tok)
            if not callable(getattr(dm, "use_tokenizer", None)):
                raise CheckpointError(
                    f"{where} was trained with another tokenizer than the data module's ({change}), and "
                    f"{type(dm).__name__} cannot switch to the checkpoint's: its weights would read every caption "
                    "with other ids. Use the data settings the run was trained with"
                )
            warnings.warn(
                f"{where} was trained with another tokenizer than the one the data module built ({change}): "
                "continuing with the checkpoint's tokenizer, for the model and the data (its weights were trained "
                "with it)",
                stacklevel=2,
            )
            dm.use_tokenizer(tok)
        self.model.tokenizer = tok

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_fits(checkpoint)
        ema = checkpoint.get("mmxattn_ema")
        fitting = self._trainer is not None and getattr(self.trainer.state, "fn", None) == "fit"  # a str enum
        if ema is not None and self._ema is None and not fitting:
            # validate/test of an EMA run by a module built without ema_decay: evaluate the EMA weights, which
            # state_dict already holds (what the run evaluated and what mmxattn.load reads), not the raw ones
            warnings.warn(
                "this checkpoint's run kept an EMA of its weights; evaluating the EMA weights (as the run and "
                "mmxattn.load do) although this module has ema_decay=0",
                stacklevel=2,
            )
        elif ema is not None:  # runs before Lightning loads state_dict: give it the training weights back
            sd = checkpoint["state_dict"]
            averaged = {k: sd[f"model.{k}"] for k in ema["training_weights"]}
            sd.update({f"model.{k}": v for k, v in ema["training_weights"].items()})
            if self._ema is not None:
                self._ema.load_state_dict(averaged, ema["num_updates"])
            else:
                warnings.warn(
                    "resuming an EMA run with ema_decay=0: training goes on from the training weights and the "
                    "checkpoint's EMA is dropped",
                    stacklevel=2,
                )
        tok = checkpoint.get("mmxattn_tokenizer")
        if tok is not None:
            self._use_checkpoint_tokenizer(tok)
        rng = checkpoint.get("mmxattn_rng")
        if rng is not None:  # Lightning restores optimizer/scheduler/loops; the RNG streams are ours to restore
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.set_rng_state(rng["cuda"], torch.cuda.current_device())
            random.setstate(_to_tuple(rng["python"]))
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        # a checkpoint of a run stopped mid-window: its gradients go back at the first resumed batch (after
        # Lightning restored the loops and the precision plugin's loss scale); absent in older checkpoints
        self._resumed_fit = fitting
        partial = checkpoint.get("mmxattn_partial_grads")
        self._pending_grads = partial if fitting and isinstance(partial, dict) else None


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers encode alike: their settings compared as the installed code writes them (an
    open_clip tokenizer saved under another open_clip version with the same BPE file is the same tokenizer)."""
    try:
        return a.to_dict() == b.to_dict()
    except (AttributeError, NotImplementedError):
        return False


def _tokenizer_change(old: Any, new: Any) -> str:
    """What differs between the data's tokenizer ``old`` and the checkpoint's ``new``, in a few words."""
    a = old.to_dict() if callable(getattr(old, "to_dict", None)) else {"type": type(old).__name__}
    b = new.to_dict()
    if a.get("type") != b.get("type"):
        return f"the data's is {a.get('type')!r}, the checkpoint's {b.get('type')!r}"
    if isinstance(a.get("vocab"), list) and isinstance(b.get("vocab"), list):
        va, vb = a["vocab"], b["vocab"]
        moved = [f"id {i} is {x!r} here, {y!r} in the checkpoint" for i, (x, y) in enumerate(zip(va, vb)) if x != y]
        only_data = sorted(set(va) - set(vb))
        parts = [f"{len(moved)} of {min(len(va), len(vb))} ids name another word (e.g. {'; '.join(moved[:3])})"]
        if only_data:
            parts.append(f"words of the data unknown to the checkpoint: {only_data[:5]}")
        return ", ".join(parts)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} in the data, {b.get(k)!r} in the checkpoint" for k in keys[:5])


def _cuda_rng_state() -> Tensor | None:
    """This process's current GPU's generator state (each DDP rank saves its own), or None without CUDA in use;
    never initialises CUDA, nor touches the other GPUs."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.get_rng_state(torch.cuda.current_device())


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_optim_args(
    lr: Any,
    weight_decay: Any,
    betas: Any,
    warmup_steps: Any,
    min_lr_ratio: Any,
    contrastive_weight: Any,
    caption_weight: Any,
    itm_weight: Any,
) -> None:
    """The optimiser's and the losses' settings, checked when the module is built: a negative learning rate failed
    inside AdamW's constructor with a traceback, and a negative weight decay, warmup or loss weight trained without
    a word (a negative loss weight maximises that loss)."""
    if not _real(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not _real(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not _real(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    for name, value in (
        ("contrastive_weight", contrastive_weight),
        ("caption_weight", caption_weight),
        ("itm_weight", itm_weight),
    ):
        if not _real(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {value!r}")


def _check_finetune_args(
    encoder_lr: float | None,
    text_lr: float | None,
    decoder_lr: float | None,
    layer_decay: float,
    freeze_steps: int,
    trainable_last: int,
    ema_decay: float,
) -> None:
    for name, value in (("encoder_lr", encoder_lr), ("text_lr", text_lr), ("decoder_lr", decoder_lr)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None (= lr), got {value}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = off), got {layer_decay}")
    if freeze_steps < 0 or trainable_last < 0:
        raise ValueError(
            f"freeze_encoder_steps and freeze_encoder_trainable_last must be >= 0, got {freeze_steps}, {trainable_last}"
        )
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {ema_decay}")


def _freezable_params(model: Any, trainable_last: int) -> list[torch.nn.Parameter]:
    """Encoder parameters to freeze: all but the last ``trainable_last`` layer groups, minus those already frozen."""
    visual = model.visual
    named = dict(visual.named_parameters())
    if trainable_last == 0:
        names = list(named)
    else:
        if not callable(getattr(visual, "layer_groups", None)):
            raise ValueError(
                f"freeze_encoder_trainable_last={trainable_last} needs an encoder with layer_groups(); "
                f"{type(visual).__name__} has none"
            )
        groups = visual.layer_groups()
        if trainable_last >= len(groups):
            raise ValueError(
                f"freeze_encoder_trainable_last={trainable_last} keeps every one of the encoder's {len(groups)} "
                "layer groups trainable: nothing would be frozen"
            )
        names = [n for g in groups[: len(groups) - trainable_last] for n in g]
    return [named[n] for n in names if named[n].requires_grad]


def _is_fsdp_root(module: Any) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def compile_unsupported_reason(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (None: it should)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python / platform"
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (inductor's CUDA backend needs it)"
    elif kind == "cpu":
        cxx = os.environ.get("CXX")
        if not any(shutil.which(c) for c in ([cxx] if cxx else ["g++", "clang++", "c++"])):
            return "no C++ compiler found (inductor's CPU backend needs g++ or clang++; set CXX)"
    return None


_PATH_ARGS = ("train_path", "val_path", "test_path", "image_root", "cache_dir")


def _absolute_if_local_path(key: str, value: Any) -> Any:
    """A data module's file or folder argument as an absolute path when it names a local one, so that the
    checkpoint's data settings rebuild the data from any working directory (shard patterns and URLs unchanged)."""
    if key in _PATH_ARGS and isinstance(value, str) and value and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _to_plain(x: Any) -> Any:
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
