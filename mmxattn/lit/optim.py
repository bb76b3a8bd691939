"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Fine-tuning groups (:func:`finetune_param_groups`): every parameter of an :class:`~mmxattn.model.MMXAttn` belongs
to one of three components, each with its own learning rate:

* ``encoder``: ``visual.*`` (the image encoder), optionally with layer-wise LR decay over its layer groups;
* ``text``: ``text.*`` (text encoder, token embedding -- also the LM head's weight when tied), ``pooler.*``,
  ``image_proj.*`` (stage tokens -> width D), ``logit_scale``, ``word_head.*`` and ``word_context.*`` (when
  built): the new retrieval side between the encoder and the embeddings;
* ``decoder``: ``decoder.*`` (multimodal decoder), ``lm_head.*`` (when untied) and ``itm_head.*``.

A parameter outside these prefixes (none today) gets the base ``lr`` in an ``other`` component.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["COMPONENTS", "build_optimizer", "component_of", "finetune_param_groups", "param_groups", "warmup_cosine"]

# name prefixes of each component (see the module docstring)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "encoder": ("visual.",),
    "text": ("text.", "pooler.", "image_proj.", "logit_scale", "word_head.", "word_context."),
    "decoder": ("decoder.", "lm_head.", "itm_head."),
}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything that must not decay: 1-D tensors (norms, biases, scales),
    position tables, embeddings-like tokens and the temperature (``model.no_weight_decay()`` names them)."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if _decays(name, p, skip) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _no_decay_names(model: nn.Module) -> set[str]:
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def _decays(name: str, p: nn.Parameter, skip: set[str]) -> bool:
    short = name.split(".")[-1]
    return not (p.ndim <= 1 or name in skip or short in ("relative_position_bias_table", "ape", "positional_embedding"))


def component_of(name: str) -> str:
    """``"encoder"``, ``"text"``, ``"decoder"`` or ``"other"`` for a parameter name of MMXAttn."""
    return next((c for c, prefixes in COMPONENTS.items() if name.startswith(prefixes)), "other")


def finetune_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    encoder_lr: float | None = None,
    text_lr: float | None = None,
    decoder_lr: float | None = None,
    layer_decay: float = 1.0,
) -> list[dict]:
    """AdamW groups with one learning rate per component (``None`` = ``lr``) and, for the encoder, layer-wise LR
    decay (BEiT, Bao et al. 2021): encoder layer group ``i`` of ``n`` (``model.visual.layer_groups()``, input to
    output) gets ``encoder_lr * layer_decay ** (n - 1 - i)``. Each group is split into decayed / not decayed
    parameters as in :func:`param_groups`. Groups carry ``name`` (``"encoder.3.decay"``), ``component`` and
    ``layer`` (encoder layer index, -1 elsewhere). Frozen (``requires_grad=False``) parameters are left out."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    lrs = {"encoder": encoder_lr, "text": text_lr, "decoder": decoder_lr, "other": None}
    for comp, value in lrs.items():
        if value is not None and value < 0:
            raise ValueError(f"{comp}_lr must be >= 0, got {value}")
    layer_of: dict[str, int] = {}
    n_layers = 1
    if layer_decay != 1.0:
        visual = getattr(model, "visual", None)
        if not callable(getattr(visual, "layer_groups", None)):
            raise ValueError(
                f"layer_decay={layer_decay} needs an encoder with layer_groups(); {type(visual).__name__} has none"
            )
        groups = visual.layer_groups()
        n_layers = len(groups)
        layer_of = {f"visual.{n}": i for i, g in enumerate(groups) for n in g}
    skip = _no_decay_names(model)
    buckets: dict[tuple[str, int, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once (under their first name)
            continue
        seen.add(id(p))
        comp = component_of(name)
        layer = layer_of.get(name, n_layers - 1) if comp == "encoder" else -1
        buckets.setdefault((comp, layer, _decays(name, p, skip)), []).append(p)
    out = []
    for (comp, layer, decays), params in buckets.items():
        base = lrs[comp] if lrs[comp] is not None else lr
        scale = layer_decay ** (n_layers - 1 - layer) if comp == "encoder" else 1.0
        tag = f"{comp}.{layer}" if comp == "encoder" else comp
        out.append(
            {
                "params": params,
                "lr": base * scale,
                "weight_decay": weight_decay if decays else 0.0,
                "name": f"{tag}.{'decay' if decays else 'no_decay'}",
                "component": comp,
                "layer": layer,
            }
        )
    return out


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    *,
    encoder_lr: float | None = None,
    text_lr: float | None = None,
    decoder_lr: float | None = None,
    layer_decay: float = 1.0,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (two groups), or over :func:`finetune_param_groups` when any per-component
    lr or a layer decay is given (the two-group layout is kept otherwise, so older checkpoints still resume).

    ``fused``: torch's fused AdamW kernel; None chooses it where :func:`default_fused` says (CUDA), torch's
    default otherwise (on the CPU a per-parameter loop; ``True`` there takes the fused CPU kernel of torch >= 2.4).
    Pass False where gradients are clipped under Lightning's mixed precision, which refuses optimizers that unscale
    gradients themselves (the fused one does)."""
    if encoder_lr is None and text_lr is None and decoder_lr is None and layer_decay == 1.0:
        groups = param_groups(model, weight_decay)
    else:
        groups = finetune_param_groups(model, lr, weight_decay, encoder_lr, text_lr, decoder_lr, layer_decay)
    if fused is None:
        fused = default_fused(model)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


# On the CPU torch's default AdamW is a Python loop over the parameters (~10 elementwise passes each); its fused
# kernel (CPU from torch 2.4 on, `build_optimizer(..., fused=True)`) gives the same steps (to 1e-6 over 40 steps of
# the shapes job) and took an optimizer step from 10.0 to 3.6 ms there, but whole steps only 0.95x (word-only) and
# 1.0x (joint), about 12 s of the 14-minute main job, and its two main-job runs landed at the low end of the config's
# grounding range (0.558 / 0.567 against 0.622 / 0.604 for the same seeds looped; runs of that recipe vary this much
# with any change of rounding). Too little gain to change what the documented runs used: the CPU default stays torch's.


def default_fused(model: nn.Module) -> bool:
    """Whether :func:`build_optimizer` picks the fused AdamW kernel by default: every trainable parameter a
    floating-point tensor on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def warmup_cosine(
    opt: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    min_ratio: float = 0.0,
    restart_at: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_ratio`` of the peak at
    ``total_steps`` (stepped once per optimizer step).

    ``total_steps`` may be a callable, asked once when warmup ends. The LightningModule passes
    ``trainer.estimated_stepping_batches`` that way: asking for it inside ``configure_optimizers`` builds the train
    DataLoader before a checkpoint is restored, which would start a resumed epoch from its beginning.

    ``restart_at`` > 0 runs two schedules: before that step, the warmup and then the peak held (a first phase that
    trains part of the model); from it, a fresh warmup and cosine over the remaining ``total_steps - restart_at``.
    """
    total: list[int] = []
    if restart_at < 0:
        raise ValueError(f"restart_at must be >= 0, got {restart_at}")

    def factor(step: int) -> float:
        if step < restart_at:
            return min(1.0, (step + 1) / max(1, warmup_steps))
        step -= restart_at
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if not total:
            total.append(int(total_steps() if callable(total_steps) else total_steps) - restart_at)
        progress = min(1.0, (step - warmup_steps) / max(1, total[0] - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
