"""Callbacks the resume test puts into a training subprocess (importable through PYTHONPATH=tests)."""

import os
import signal

import pytorch_lightning as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL the process right after optimizer step ``step`` (no cleanup, no final checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveFinalWeights(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}, self.path)


class LogBatches(pl.Callback):
    """Append "step: image ids" of every training batch to a text file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}: {list(batch['image_ids'])} {batch['ids'][:, 1:4].tolist()}\n")


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this process during the batch after optimizer step ``step``: before its optimizer step
    (SIGINT: a Ctrl-C in the middle of a training step) or, with ``after=True``, once the batch is done."""

    def __init__(self, step: int, signum: int, after: bool = False) -> None:
        self.step, self.signum, self.after = step, signum, after

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.after and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.after and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
