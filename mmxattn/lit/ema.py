"""Exponential moving average (EMA) of a model's weights, for evaluating and saving a smoothed copy.

Built on :class:`torch.optim.swa_utils.AveragedModel` with :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`
(PyTorch's own EMA): the first update copies the weights, every later one does
``ema = decay_t * ema + (1 - decay_t) * weights`` (a fused ``foreach`` lerp per device and dtype). With ``warmup``
the decay starts low and rises, ``decay_t = min(decay, (1 + t) / (10 + t))`` at update ``t`` (TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` rule), so a short fine-tuning run's average is not dominated by the
starting weights.

Buffers are not averaged: they are copied from the model at every update (BatchNorm statistics of timm encoders
follow the live model, and integer buffers such as CAT's ``relative_position_index`` are never blended).

:class:`ModelEMA` is a plain object, not an ``nn.Module``, so assigning it to a LightningModule attribute registers
nothing: its parameters stay out of ``parameters()`` (DDP, the optimiser, the model summary) and out of the
module's ``state_dict``; the LightningModule saves it explicitly (see :mod:`mmxattn.lit.module`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA copy of ``model`` (deep-copied, gradients off, eval mode).

    Args:
        model: the module to average (its current weights are the starting copy; the first :meth:`update` copies
            again, so building early is fine).
        decay: the EMA decay in [0, 1).
        warmup: ramp the decay up over the first updates (see the module docstring).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.averaged = AveragedModel(model, use_buffers=False)
        self.averaged.requires_grad_(False)
        self.averaged.eval()
        self.num_updates = 0  # host-side count (== averaged.n_averaged), so the decay needs no device sync

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state-dict keys as the source model)."""
        return self.averaged.module

    def decay_at(self, t: int) -> float:
        """Decay applied at update ``t`` (0-based; update 0 is a plain copy)."""
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.multi_avg_fn = get_ema_multi_avg_fn(self.decay_at(self.num_updates))
        self.averaged.update_parameters(model)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.num_updates += 1

    def to(self, device: torch.device | str) -> ModelEMA:
        device = torch.device(device)
        if device != self.averaged.n_averaged.device:  # called every step: only move when needed
            self.averaged.to(device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged model's own state dict (keys as the source model's)."""
        return self.module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.num_updates = int(num_updates)
        self.averaged.n_averaged.fill_(self.num_updates)
