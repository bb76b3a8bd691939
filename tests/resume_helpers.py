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


class InterruptAt(pl.Callback):
    """Stop a run at micro-batch ``batch_idx`` of epoch 0 as an interrupt would: ``where`` is a hook of the batch
    ("on_before_backward", "on_after_backward", "on_before_optimizer_step": a Ctrl-C there, i.e. a
    KeyboardInterrupt raised in the middle of the training step), "sigterm" (what Lightning's SIGTERM handler
    does, called in-process: it sets a flag, and the loop stops once the batch is done), or "sigint_in_step" /
    "2sigint_in_step": one or two real SIGINTs sent to this process inside ``optimizer.step``, once the weights
    are updated (an optimizer step hook), or "sigint_in_chunk": a real SIGINT in the forward of the second chunk of a
    grad-cached batch (the first chunk's gradients already in .grad)."""

    def __init__(self, batch_idx: int, where: str) -> None:
        self.batch_idx, self.where, self._current = batch_idx, where, -1

    def on_train_start(self, trainer, pl_module) -> None:
        if self.where.endswith("sigint_in_step"):
            trainer.optimizers[0].register_step_post_hook(self._sigint)
        if self.where == "sigint_in_chunk":  # grad caching: in the second chunk's forward, after the first's backward
            real, calls = pl_module.compute_losses, {"n": 0}

            def compute_losses(batch, contrastive=True):
                calls["n"] = calls["n"] + 1 if self._current == self.batch_idx else 0
                if calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return real(batch, contrastive=contrastive)

            pl_module.compute_losses = compute_losses

    def _sigint(self, optimizer, args, kwargs) -> None:
        if self._current == self.batch_idx:
            for _ in range(2 if self.where.startswith("2") else 1):
                os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._current = batch_idx if trainer.current_epoch == 0 else -1

    def _hit(self, where: str) -> None:
        if self._current == self.batch_idx and self.where == where:
            raise KeyboardInterrupt

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._hit("on_before_backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._hit("on_after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._hit("on_before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "sigterm" and self._current == self.batch_idx:
            trainer._signal_connector._sigterm_notifier_fn(signal.SIGTERM, None)


class RecordLoggingSteps(pl.Callback):
    """The step each training batch's metrics are logged at (Lightning's logging step, ``_batches_that_stepped``:
    what a logger's x axis shows), by batch index."""

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[batch_idx] = trainer.fit_loop.epoch_loop._batches_that_stepped
