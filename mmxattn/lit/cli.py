"""LightningCLI entry point: ``python train.py fit|validate|test --config configs/<x>.yaml``.

The data module is chosen in the config (``data.class_path``: ShapesDataModule or ImageTextDataModule); its
tokenizer properties (vocab size, special ids, context length) and image size are linked into the model, so a
config never states them twice. After ``fit`` the best checkpoint is tested (``--test_after_fit false`` skips
it), the test metrics are printed as one JSON object, and the folder of attention-map PNGs is named.
glibc's malloc is told to keep freed tensor buffers (:func:`mmxattn.runtime.tune_cpu_allocator`;
``MMXATTN_TUNE_MALLOC=0`` turns that off).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from ..runtime import tune_cpu_allocator
from .checkpoint_io import AtomicCheckpointIO
from .module import MMXAttnModule

__all__ = ["BadDataCheckpoint", "MMXAttnCLI", "main"]

_LINKS = ("vocab_size", "pad_id", "bos_id", "eos_id", "context_length", "img_size")


class MMXAttnCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `predict`: the data modules have no predict split; captions of new images come from
        # `python -m mmxattn caption` or MMXAttn.caption, so the subcommand would only fail after loading everything
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in _LINKS:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="test the best checkpoint after fit")
        parser.add_argument(
            "--metrics_file", type=str | None, default=None, help="also write the final test metrics JSON here"
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning's version replaces the model's settings with the checkpoint's hyper-parameters, silently
        # overriding the config and the command line for `--ckpt_path FILE` (not for `last`), and reads the file
        # outside the checkpoint IO, so a damaged file was a raw traceback. Here the config and the command line
        # decide every setting (a checkpoint of another architecture is a clear error when its weights load); the
        # file is only checked, and it holds every weight, so the run's vision_pretrained file is not needed.
        sub = self.config.get("subcommand")
        path = self.config.get(f"{sub}.ckpt_path") if sub else None
        if not path or path in ("last", "best", "hpc") or str(path).startswith("registry"):
            return
        from ..checkpoint import CheckpointError, read_checkpoint

        try:
            read_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as e:
            print(f"error: --ckpt_path: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        overrides = self.config.get(f"{sub}.model.overrides")
        if isinstance(overrides, dict) and overrides.get("vision_pretrained"):
            self.config[f"{sub}.model.overrides"] = {k: v for k, v in overrides.items() if k != "vision_pretrained"}

    def _run_subcommand(self, subcommand: str) -> None:
        from ..checkpoint import CheckpointError
        from ..data.robust import BadDataError, DataSetupError

        try:
            super()._run_subcommand(subcommand)
        except CheckpointError as e:  # a checkpoint that does not fit: one line naming it, not a traceback
            if os.environ.get("MMXATTN_TRACEBACK") == "1":
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except (DataSetupError, BadDataError) as e:
            # data that cannot be used (found at setup: a missing file or column, a wrong image root, a split that is
            # empty, unusable or smaller than one batch) or too much broken data (found while training): one line
            # naming the input, as for a bad setting. Any other exception keeps its traceback.
            if os.environ.get("MMXATTN_TRACEBACK") == "1":
                raise
            msg = str(e)
            if isinstance(e, BadDataError) and "max_fraction=" in msg:
                msg += "; the limit is --data.init_args.max_broken_fraction"
            trainer = getattr(self, "trainer", None)
            saved = [cb.saved for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, BadDataCheckpoint)]
            saved = [s for s in saved if s]
            if saved:
                step, path = saved[0]
                msg += f"; the training state at step {step} is saved in {path}: after fixing the data, "
                msg += "--ckpt_path last resumes from it"
            print(f"error: {msg}\n(MMXATTN_TRACEBACK=1 shows the traceback)", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def instantiate_classes(self) -> None:
        # a bad setting (a missing data file, an out-of-range option) is a one-line error naming it, exit status 2,
        # instead of a traceback through jsonargparse in which the data module's message is one line of many
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
            if os.environ.get("MMXATTN_TRACEBACK") == "1":
                raise
            print(f"error: {_config_error(e)}\n(MMXATTN_TRACEBACK=1 shows the traceback)", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def _sub(self) -> Any:
        return self.config.get(self.config.get("subcommand")) or self.config

    def before_fit(self) -> None:
        # a Ctrl-C or SIGTERM saves last.ckpt where the config keeps one (mmxattn.lit.callbacks.InterruptCheckpoint)
        from pytorch_lightning.callbacks import ModelCheckpoint

        from .callbacks import InterruptCheckpoint

        have = {str(cb.dirpath) for cb in self.trainer.callbacks if isinstance(cb, InterruptCheckpoint)}
        for cb in list(self.trainer.callbacks):
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and str(cb.dirpath) not in have:
                self.trainer.callbacks.append(InterruptCheckpoint(cb.dirpath, cb.CHECKPOINT_NAME_LAST))
                have.add(str(cb.dirpath))
        # too much broken data stops the run (BadDataError): keep the steps trained so far in last.ckpt too
        if not any(isinstance(cb, BadDataCheckpoint) for cb in self.trainer.callbacks):
            last = next(
                (
                    cb
                    for cb in self.trainer.callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath
                ),
                None,
            )
            if last is not None:
                name = (last.CHECKPOINT_NAME_LAST or "last") + last.FILE_EXTENSION
                self.trainer.callbacks.append(BadDataCheckpoint(os.path.join(last.dirpath, name)))

    def after_fit(self) -> None:
        cfg = self._sub()
        if getattr(self.trainer, "interrupted", False):
            return
        if not cfg.get("test_after_fit", True) or self.datamodule is None:
            return
        has_split = getattr(self.datamodule, "has_split", None)
        if not hasattr(self.datamodule, "test_dataloader") or (has_split is not None and not has_split("test")):
            print("no test split configured: skipping the test after fit", flush=True)
            return
        ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        self._report(cfg)

    after_test = None  # set below: the same report after a stand-alone `test`

    def _report(self, cfg: Any) -> None:
        if not self.trainer.is_global_zero:
            return
        metrics = {k.split("/", 1)[1]: v for k, v in self.model.last_metrics.items() if k.startswith("test/")}
        ceilings = getattr(self.datamodule, "ceilings", None)
        if callable(ceilings):
            metrics["ceilings"] = ceilings("test")
        if hasattr(self.datamodule, "constant_caption"):
            metrics["constant_caption"] = self.datamodule.constant_caption()
            if hasattr(self.datamodule, "caption_fit_rate"):  # caption_fit's baseline
                metrics["constant_caption_fit"] = self.datamodule.caption_fit_rate(metrics["constant_caption"], "test")
        out = json.dumps(metrics, sort_keys=True)
        print("\nTEST METRICS " + out, flush=True)
        path = cfg.get("metrics_file")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        for cb in self.trainer.callbacks:
            paths = getattr(cb, "last_paths", None)
            if paths:
                print(f"attention maps: {Path(paths[0]).parent}", flush=True)
        tested = getattr(self.trainer, "ckpt_path", None)  # the file `test` loaded (None: the weights in memory)
        print(f"tested checkpoint: {tested or 'none (the weights in memory)'}", flush=True)
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best and self.config.get("subcommand") == "fit":
            print(f"best checkpoint: {best}", flush=True)


class BadDataCheckpoint(pl.Callback):
    """Save ``path`` (the run's ``last.ckpt``) when a fit stops because too much of its training data is broken
    (``BadDataError``), so the steps trained so far are not lost: after fixing the data, ``--ckpt_path last``
    resumes there. ``saved`` is then ``(global step, path)``. Single-process runs only: under DDP the error is one
    rank's, and a save on that rank alone would wait for the others at the save's barrier."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.saved: tuple[int, str] | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from ..data.robust import BadDataError

        if not isinstance(exception, BadDataError) or trainer.state.fn != "fit" or trainer.world_size != 1:
            return
        if trainer.global_step == 0:
            return  # nothing trained yet: leave an earlier last.ckpt alone
        try:
            trainer.save_checkpoint(self.path)
        except Exception as e:  # never hide the data error behind a failed save
            print(f"warning: could not save {self.path} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            return
        self.saved = (trainer.global_step, self.path)


class _Parser(LightningArgumentParser):
    """LightningCLI's parser, whose command-line errors are one ``error: ...`` line (exit 2) instead of the usage
    text (a hundred lines of options) and, for an option of the data module, a jsonargparse union dump: an unknown
    option is named with the closest valid one. ``MMXATTN_TRACEBACK=1`` (or ``JSONARGPARSE_DEBUG``) gives
    jsonargparse's own report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("MMXATTN_TRACEBACK") == "1" or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        try:
            text = _parse_error(message, parser)
        except Exception:  # the short form is a courtesy: never lose the error to it
            text = message
        print(f"error: {text}\n(`{prog} --help` lists the options)", file=sys.stderr, flush=True)
        self.exit(2)


def _parse_error(message: str, parser: Any) -> str:
    """One line for a command-line error of jsonargparse: an unknown option (top level or of the data module's
    class) named with the closest valid option, a union error reduced to the data module's own message."""
    m = re.match(r"unrecognized arguments: (\S+)", message)
    if m and m.group(1).startswith("--"):
        name = m.group(1).split("=", 1)[0]
        options = [o for a in getattr(parser, "_actions", ()) for o in a.option_strings if o.startswith("--")]
        return f"unknown option {name}" + _did_you_mean(name, options)
    m = re.search(r"does not accept option '([\w.]+)'", message)  # from a config file
    if m:
        options = [o for a in getattr(parser, "_actions", ()) for o in a.option_strings if o.startswith("--")]
        return message + _did_you_mean(f"--{m.group(1)}", options).replace("--", "")
    m = re.search(
        r"Parser key \"([\w.]+)\".*?class_path '([\w.]+)':\s*(?:Option|Key) '([\w.]+)' is not accepted", message, re.S
    )
    if m:
        group, class_path, key = m.groups()
        mod, _, cls = class_path.rpartition(".")
        params = [n for n in inspect.signature(getattr(importlib.import_module(mod), cls)).parameters if n != "self"]
        option = f"--{group}.init_args.{key}"
        return f"unknown option {option} of {cls}" + _did_you_mean(option, [f"--{group}.init_args.{p}" for p in params])
    if _UNION in message and "Errors:" in message:
        return _union_error(message)
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _union_error(message: str) -> str:
    """A jsonargparse union error (``data`` is "a LightningDataModule or None") as ``--data.init_args.KEY: what is
    wrong``: its nested ``Parser key`` lines become the option's name, the ``None`` alternative and the repeated
    given value are left out."""
    head = re.match(r'Parser key "([\w.]+)"', message)
    parts = [head.group(1)] if head else []
    class_path, out = None, []
    for line in message.split("Errors:", 1)[1].splitlines():
        line = line.strip().removeprefix("- ").strip()
        if not line or line.startswith(("Expected a <class 'NoneType'>", "Given value")):
            continue
        m = re.fullmatch(r"Problem with given class_path '([\w.]+)':", line)
        if m:
            class_path = m.group(1)
            continue
        m = re.fullmatch(r'Parser key "([\w.]+)":', line)
        if m:
            parts += ["init_args", m.group(1)] if class_path and "init_args" not in parts else [m.group(1)]
            continue
        out.append(line)
    where = f" (class_path {class_path!r})" if class_path and "init_args" not in parts else ""
    return f"--{'.'.join(parts)}: " + "; ".join(out) + where


def _did_you_mean(name: str, options: list[str]) -> str:
    """ "; did you mean --x?" for the valid option closest to ``name`` (first by its last component among the
    options of the same group, e.g. ``--model.``), or ""."""
    group = name.rsplit(".", 1)[0] if "." in name else None
    same = {o.rsplit(".", 1)[-1]: o for o in options if group is not None and o.rsplit(".", 1)[0] == group}
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(same), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {same[close[0]]}?"
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


_UNION = "Does not validate against any of the Union subtypes"


def _config_error(e: BaseException) -> str:
    """The message of a failed instantiation; for a class given by class_path (the data module), jsonargparse wraps
    the class's own error into a union error whose other lines only say that None was not given."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if _UNION not in text or "Errors:" not in text:
        return text
    errors = text.split("Errors:", 1)[1].split("\nGiven value", 1)[0]
    lines = [ln.strip().removeprefix("- ").strip() for ln in errors.splitlines()]
    ours = [ln for ln in lines if ln and not ln.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(ours) or text


def _after_test(self: MMXAttnCLI) -> None:
    self._report(self._sub())


MMXAttnCLI.after_test = _after_test


def main(args: list[str] | None = None) -> MMXAttnCLI:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    tune_cpu_allocator()  # reuse freed tensor buffers instead of page-faulting fresh ones (mmxattn.runtime)
    try:
        return _cli(args)
    except SIGTERMException:  # a SystemExit without a code: the run would exit 0, as if it had finished
        raise SystemExit(128 + 15) from None


def _cli(args: list[str] | None) -> MMXAttnCLI:
    return MMXAttnCLI(
        MMXAttnModule,
        None,  # the data module class comes from the config (class_path)
        subclass_mode_data=True,
        # as a class_path, not an instance: jsonargparse cannot serialise an instance into the saved config.yaml
        # (it warned on every run) and the config would not name the plugin
        trainer_defaults={"plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.AtomicCheckpointIO"}]},
        save_config_kwargs={"overwrite": True},
        parser_class=_Parser,  # command-line errors in one line, not the usage text
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
        args=args,  # None: LightningCLI reads sys.argv itself
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True
