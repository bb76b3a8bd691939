"""Lightning callbacks: attention maps of a fixed set of validation images, written as PNGs and logged.

``AttentionMapLogger`` is a LightningCLI-friendly callback (typed arguments)::

    trainer:
      callbacks:
        - class_path: mmxattn.lit.callbacks.AttentionMapLogger
          init_args: {num_images: 4, every_n_epochs: 1}
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from ..viz import figure_to_png, plot_caption_attention, plot_encoder_attention, resolve_encoder_layer

__all__ = ["AttentionMapLogger", "InterruptCheckpoint"]

DEFAULT_ENCODER_LAYERS = ("layers.0.pre_ipsa_blocks.0.attn", "layers.0.cpsa_blocks.0.attn")


def _batch_images(batch: Any) -> Tensor | None:
    """The (B, 3, H, W) images of a validation batch (a dict with ``images``, or a tuple/list led by them)."""
    if isinstance(batch, dict):
        x = batch.get("images")
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    else:
        x = None
    return x if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == 3 and x.is_floating_point() else None


class AttentionMapLogger(pl.Callback):
    """After validation, draw where the model looks on a FIXED set of validation images.

    The first ``num_images`` images of the first validation batch are kept (on the CPU) the first time validation
    runs and reused every time, so maps of different epochs compare like with like. Every ``every_n_epochs``
    epochs (epochs ``n-1, 2n-1, ...``; once per epoch even with several validations per epoch), on global rank
    zero only and never during the sanity check, each image gets

    * ``epoch{E:03d}_img{i}_caption.png``: the greedy caption with one decoder cross-attention heatmap per word
      (:func:`mmxattn.viz.plot_caption_attention`, at most ``max_words`` words);
    * ``epoch{E:03d}_img{i}_encoder.png``: CAT encoder attention (:func:`mmxattn.viz.plot_encoder_attention`) of
      ``encoder_layer`` (a layer name such as ``"layers.1.cpsa_blocks.0.attn"``; default: the first IPSA and the
      first CPSA block of stage 0). Skipped for non-CAT encoders.

    The PNGs always go to ``out_dir`` (default ``<trainer.log_dir>/attention_maps``, which is the
    ``default_root_dir`` without a logger). They are also logged: ``WandbLogger`` -> ``log_image`` under
    ``attention/caption`` and ``attention/encoder``; ``TensorBoardLogger`` -> ``add_figure`` under
    ``attention/caption/img{i}`` and ``attention/encoder/img{i}``; other loggers: files only.

    A failure while drawing is reported as a warning and never stops training. ``last_paths`` lists the files of
    the latest round, ``last_duration_s`` its cost in seconds.

    Args:
        num_images: images drawn per round.
        every_n_epochs: draw every n-th epoch.
        encoder_layer: CAT attention layer for the encoder figure (None: the stage-0 IPSA and CPSA defaults).
        out_dir: where the PNGs go.
        max_words: caption words drawn per image (the caption itself is always shown whole).
        max_new_tokens: caption length limit (None: the model's context length).
        dpi: resolution of the PNGs.
    """

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 1,
        encoder_layer: str | None = None,
        out_dir: str | None = None,
        max_words: int = 10,
        max_new_tokens: int | None = None,
        dpi: int = 100,
    ) -> None:
        super().__init__()
        for name, value in (("num_images", num_images), ("every_n_epochs", every_n_epochs), ("max_words", max_words)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionMapLogger: {name} must be an int >= 1, got {value!r}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"AttentionMapLogger: max_new_tokens must be >= 1 or None, got {max_new_tokens!r}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.encoder_layer = encoder_layer
        self.out_dir: Path | None = None if out_dir is None else Path(out_dir)
        self.max_words = max_words
        self.max_new_tokens = max_new_tokens
        self.dpi = dpi
        self.images: Tensor | None = None  # (n, 3, H, W) on the CPU, fixed once taken
        self.last_paths: list[Path] = []
        self.last_duration_s: float | None = None
        self._logged_epoch: int | None = None
        self._announced = False
        self._encoder_layers: list[str] | None = None
        self._skip_encoder = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.out_dir is None:
            # trainer.log_dir broadcasts from rank zero, so every rank must ask (here, not in a rank-zero hook)
            base = trainer.log_dir or trainer.default_root_dir
            self.out_dir = Path(base) / "attention_maps"

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.images is None and dataloader_idx == 0 and trainer.is_global_zero:
            x = _batch_images(batch)
            if x is not None and len(x):  # an all-broken batch has no images: wait for the next one
                self.images = x[: self.num_images].detach().to("cpu", torch.float32).clone()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.images is None:
            return
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs != 0 or self._logged_epoch == epoch:
            return
        self._logged_epoch = epoch
        start = time.perf_counter()
        try:
            self._draw(trainer, pl_module, epoch)
        except Exception as e:  # a figure must never end a long run
            warnings.warn(f"AttentionMapLogger: drawing attention maps failed at epoch {epoch}: {e!r}", stacklevel=1)
        self.last_duration_s = time.perf_counter() - start

    # ------------------------------------------------------------------ drawing
    def _model(self, pl_module: pl.LightningModule) -> Any:
        # the weights evaluation uses (the EMA copy when the module keeps one)
        model = getattr(pl_module, "eval_model", None) or getattr(pl_module, "model", pl_module)
        if not (hasattr(model, "generate") and hasattr(model, "decoder") and hasattr(model, "visual")):
            raise TypeError(f"expected an MMXAttn model (pl_module.model), got {type(model).__name__}")
        return model

    def _layers(self, model: Any) -> list[str]:
        if self._encoder_layers is None:
            wanted = [self.encoder_layer] if self.encoder_layer is not None else list(DEFAULT_ENCODER_LAYERS)
            try:
                self._encoder_layers = [resolve_encoder_layer(model, w)[0] for w in wanted]
            except TypeError:  # not a CAT encoder: captions only
                self._encoder_layers, self._skip_encoder = [], True
        return self._encoder_layers

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        model = self._model(pl_module)
        layers = self._layers(model)
        out = self.out_dir or Path(trainer.default_root_dir) / "attention_maps"
        gen = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}
        device = pl_module.device
        figures: dict[str, list[tuple[Path, Any, str]]] = {"caption": [], "encoder": []}
        paths: list[Path] = []
        for i, image in enumerate(self.images):
            x = image.to(device)
            fig = plot_caption_attention(model, x, max_words=self.max_words, **gen)
            caption = fig.get_suptitle()
            figures["caption"].append((out / f"epoch{epoch:03d}_img{i}_caption.png", fig, caption))
            if layers:
                fig = plot_encoder_attention(model, x, layers)
                figures["encoder"].append((out / f"epoch{epoch:03d}_img{i}_encoder.png", fig, caption))
        for kind, items in figures.items():
            for i, (path, fig, _) in enumerate(items):
                self._to_tensorboard(trainer, f"attention/{kind}/img{i}", fig)
                paths.append(figure_to_png(fig, path, dpi=self.dpi))
            self._to_wandb(trainer, f"attention/{kind}", items)
        self.last_paths = paths
        if not self._announced:
            self._announced = True
            rank_zero_info(f"AttentionMapLogger: attention maps of {len(self.images)} validation images -> {out}")

    @staticmethod
    def _to_tensorboard(trainer: pl.Trainer, tag: str, fig: Any) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)

    @staticmethod
    def _to_wandb(trainer: pl.Trainer, key: str, items: list[tuple[Path, Any, str]]) -> None:
        if not items:
            return
        from pytorch_lightning.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key=key,
                    images=[str(path) for path, _, _ in items],  # the PNGs just written: no second rendering
                    step=trainer.global_step,
                    caption=[caption for _, _, caption in items],
                )


class InterruptCheckpoint(pl.callbacks.Checkpoint):
    """Save ``last.ckpt`` when a run is interrupted (Ctrl-C, or SIGTERM as schedulers send before killing a job),
    so ``--ckpt_path last`` resumes from the interrupted step instead of the last periodic save. Other exceptions
    (a crash, a non-finite loss) leave the periodic ``last.ckpt`` alone. ``train.py`` adds one beside every
    ``ModelCheckpoint`` that keeps a ``last.ckpt``.

    Not Lightning's ``OnExceptionCheckpoint``: with one of those among the callbacks, ``fit`` without a
    ``ckpt_path`` silently resumes from it, so re-running a finished (or changed) config in the same folder would
    restore the old run's ``last.ckpt`` instead of training anew. Resuming is asked for with ``--ckpt_path last``."""

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        super().__init__()
        if not filename:
            raise ValueError("InterruptCheckpoint: the filename cannot be empty")
        # set now, not in setup: an interrupt can come at any moment
        self.dirpath = dirpath
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.state.fn == "fit":
            rank_zero_info(f"interrupted: saving {self.ckpt_path} (resume with --ckpt_path last)")
            trainer.save_checkpoint(self.ckpt_path)
