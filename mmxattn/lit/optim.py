"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["build_optimizer", "param_groups", "warmup_cosine"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything that must not decay: 1-D tensors (norms, biases, scales),
    position tables, embeddings-like tokens and the temperature (``model.no_weight_decay()`` names them)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        short = name.split(".")[-1]
        if p.ndim <= 1 or name in skip or short in ("relative_position_bias_table", "ape", "positional_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98)
) -> torch.optim.AdamW:
    # fused AdamW where the device supports it (CUDA); foreach on the CPU
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(
    opt: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_ratio`` of the peak at
    ``total_steps`` (stepped once per optimizer step).

    ``total_steps`` may be a callable, asked once when warmup ends. The LightningModule passes
    ``trainer.estimated_stepping_batches`` that way: asking for it inside ``configure_optimizers`` builds the train
    DataLoader before a checkpoint is restored, which would start a resumed epoch from its beginning.
    """
    total: list[int] = []

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if not total:
            total.append(int(total_steps() if callable(total_steps) else total_steps))
        progress = min(1.0, (step - warmup_steps) / max(1, total[0] - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
