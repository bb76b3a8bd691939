"""``python -m mmxattn.evaluate --ckpt PATH [--config CONFIG.yaml] [--split test]``

Prints ONE JSON object: retrieval recall (with ``*_rerank`` after decoder re-ranking), caption metrics,
grounding accuracy and ``n_images`` (``null`` where a metric does not apply). On the shapes data it adds the data
set's ceilings (best achievable retrieval, a held-out reference caption's scores, a constant caption's scores) so
the model's numbers can be read against them.

The data come from ``--config`` (a training config's ``data:`` section) or, without one, from the data-module
settings saved in the checkpoint (an exported model folder, which has none, needs ``--config``). Nothing in the
checkpoint is executed: it is read with ``weights_only=True``, and data settings read from it may only name local
paths.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load, read_checkpoint
from .data.robust import BadDataError
from .evaluation import METRIC_KEYS, EvalAccumulator
from .model import RERANK_METHODS
from .runtime import tune_cpu_allocator

__all__ = ["build_datamodule", "evaluate", "main", "shapes_reference_scores"]

_ALLOWED_DATA = {
    "mmxattn.data.datamodule.ShapesDataModule",
    "mmxattn.data.datamodule.ImageTextDataModule",
    "ShapesDataModule",
    "ImageTextDataModule",
}


def _data_section(config: str | None, ckpt: dict[str, Any]) -> dict[str, Any]:
    if config is not None:
        import yaml

        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"--config {path} does not exist")
        cfg = yaml.safe_load(path.read_text()) or {}
        data = cfg.get("data")
        if not data:
            raise ValueError(f"{path} has no 'data:' section")
        return data
    data = ckpt.get("mmxattn_data")
    if not data:
        raise ValueError("the checkpoint stores no data-module settings; pass --config with a 'data:' section")
    _only_local_paths(data)
    return data


def _only_local_paths(data: Any) -> None:
    """Refuse data settings read from a checkpoint that name a command or a remote URL: WebDataset runs a
    ``pipe:`` URL as a shell command (and fetches ``http://`` ones through one), so a checkpoint could otherwise run
    code through its data settings. The same settings given on purpose in a ``--config`` are the user's choice."""
    init = (data.get("init_args") or {}) if isinstance(data, dict) else None
    if not isinstance(init, dict):
        raise ValueError("the checkpoint's data settings are not a mapping; pass --config with a 'data:' section")
    for key, value in init.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and (v.strip().startswith("pipe:") or "://" in v):
                raise ValueError(
                    f"the checkpoint's data settings give {key}={v!r}, a command or a remote URL; only local paths are "
                    "taken from a checkpoint (pass --config with a 'data:' section to use such a source)"
                )


def build_datamodule(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """Instantiate a data module from a config's ``data:`` section (only the project's own classes)."""
    class_path = data.get("class_path", "mmxattn.data.datamodule.ShapesDataModule")
    if class_path not in _ALLOWED_DATA:
        raise ValueError(f"data.class_path {class_path!r} is not one of {sorted(_ALLOWED_DATA)}")
    name = class_path.rsplit(".", 1)[-1]
    cls = getattr(importlib.import_module("mmxattn.data.datamodule"), name)
    # private keys ("_class_path", written by LightningCLI into older checkpoints' data settings) are not init args
    init = {k: v for k, v in dict(data.get("init_args") or {}).items() if not str(k).startswith("_")}
    kwargs = {**init, **(overrides or {})}
    return cls(**kwargs)


def shapes_reference_scores(dm: Any, split: str) -> dict[str, Any]:
    """Caption-metric ceilings of the shapes data: one held-out reference per image scored against the others,
    and the constant (most frequent training) caption scored against all but that held-out one (and the share of
    the images it is true of: its ``caption_fit``)."""
    from .metrics import caption_metrics

    ds = dm.dataset(split)
    refs = {i: list(c) for i, c in enumerate(ds.reference_captions())}
    held = {i: c[0] for i, c in refs.items()}
    rest = {i: c[1:] for i, c in refs.items()}
    const = dm.constant_caption()
    heldout_scores = caption_metrics(held, rest, meteor=False)
    constant_scores = caption_metrics({i: const for i in refs}, rest, meteor=False)
    return {
        "heldout_reference": {k: heldout_scores[k] for k in ("cider", "bleu4")},
        "constant_caption": {"caption": const, **{k: constant_scores[k] for k in ("cider", "bleu4")}}
        | {"caption_fit": dm.caption_fit_rate(const, split)},
    }


@torch.no_grad()
def evaluate(
    model: Any,
    dm: Any,
    split: str = "test",
    *,
    rerank: int = 10,
    rerank_with: str = "itm",
    meteor: bool = True,
    gen_kwargs: dict[str, Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    if split not in ("val", "test"):
        raise ValueError(f"--split must be 'val' or 'test', got {split!r}")
    if getattr(model, "tokenizer", None) is not None and hasattr(dm, "use_tokenizer"):
        dm.use_tokenizer(model.tokenizer)  # references tokenized as the model was trained (a rebuilt word vocabulary
        # could number its words otherwise)
    dm.setup("validate" if split == "val" else "test")
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    if isinstance(loader, list) and not loader:
        raise ValueError(f"the data module has no {split} split configured")
    if getattr(model, "tokenizer", None) is None and getattr(dm, "tokenizer", None) is not None:
        model.tokenizer = dm.tokenizer
    acc = EvalAccumulator(model, rerank=rerank, rerank_with=rerank_with, meteor=meteor, gen_kwargs=gen_kwargs)
    device = model.logit_scale.device
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        acc.update(batch)  # counts the broken samples the loader skipped (a batch of them only has no images)
    out: dict[str, Any] = {k: None for k in METRIC_KEYS}
    out.update(acc.compute())
    if hasattr(dm, "ceilings"):
        out["ceilings"] = {**dm.ceilings(split), **shapes_reference_scores(dm, split)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmxattn.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint (.ckpt) written by train.py, or a folder written by mmxattn.export (with --config)",
    )
    p.add_argument("--config", default=None, help="training config whose data: section to evaluate on")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--rerank", type=int, default=10, help="decoder re-ranking of the top N candidates (0 = off)")
    p.add_argument(
        "--rerank-with",
        default=None,
        choices=list(RERANK_METHODS),
        help="re-ranking score (default: the one the checkpoint's training run evaluated with, else itm)",
    )
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam"], help="caption generation")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves starting Java)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate on the first N batches only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.rerank < 0:
        p.error(f"--rerank must be >= 0 (0 = off), got {a.rerank}")
    for flag, value in (("--batch-size", a.batch_size), ("--max-batches", a.max_batches), ("--num-beams", a.num_beams)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    tune_cpu_allocator()  # mmxattn.runtime: reuse freed tensor buffers (MMXATTN_TUNE_MALLOC=0: off)
    try:
        if Path(a.ckpt).is_dir():  # an exported model: weights and tokenizer, but no data settings
            if a.config is None:
                raise ValueError(
                    f"{a.ckpt} is an exported model folder, which stores no data settings; pass --config with a "
                    "'data:' section (or --ckpt the training checkpoint)"
                )
            ckpt = {}
        else:
            ckpt = read_checkpoint(a.ckpt)
        data = _data_section(a.config, ckpt)
        model = load(a.ckpt, device=a.device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {"num_workers": 0} | ({"batch_size": a.batch_size} if a.batch_size else {})
    overrides |= _model_overrides(data, model)
    gen = {"strategy": a.strategy} | ({"num_beams": a.num_beams} if a.strategy == "beam" else {})
    try:
        dm = build_datamodule(data, overrides)
        metrics = evaluate(
            model,
            dm,
            a.split,
            rerank=a.rerank,
            # load() set the score the training run evaluated with (checkpoint.scoring_info), where it is known
            rerank_with=a.rerank_with or model.rerank_with_default or "itm",
            meteor=not a.no_meteor,
            gen_kwargs=gen,
            max_batches=a.max_batches,
        )
    except (FileNotFoundError, ValueError, TypeError, BadDataError) as e:  # data settings or data that do not work
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, sort_keys=True))
    return 0


def _model_overrides(data: dict[str, Any], model: Any) -> dict[str, Any]:
    """Data-module arguments that must follow the trained model, not the config: its image size and context
    length; for image-text data also no train file (evaluation never reads it; the model's tokenizer replaces a
    vocabulary built from it). A config that says otherwise is reported on stderr."""
    init = dict(data.get("init_args") or {})
    out: dict[str, Any] = {"img_size": int(model.cfg.vision.img_size), "context_length": model.cfg.text.context_length}
    for key, value in out.items():
        if key in init and init[key] != value:
            print(
                f"note: evaluating with the model's {key}={value} (the data settings say {init[key]})", file=sys.stderr
            )
    if str(data.get("class_path", "")).endswith("ImageTextDataModule") and getattr(model, "tokenizer", None):
        out |= {"train_path": None, "tokenizer": "openclip"}  # placeholder: evaluate() swaps in the model's
    return out


if __name__ == "__main__":
    sys.exit(main())
