"""Loading and exporting trained models without executing code from files.

* ``mmxattn.load(path)`` reads a Lightning checkpoint (``torch.load(weights_only=True)``: tensors and plain data
  only) or an exported directory (``model.safetensors`` + ``config.json`` + ``tokenizer.json`` +
  ``preprocess.json``), and returns the model in eval mode with its tokenizer and eval transform attached.
* ``mmxattn.export(model, directory)`` writes that directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import config_from_dict, config_to_dict

__all__ = ["CheckpointError", "export", "load", "read_checkpoint", "tokenizer_mismatch"]

EXPORT_FILES = ("config.json", "model.safetensors")


class CheckpointError(ValueError):
    """The file is not an mmxattn checkpoint, or its weights do not fit its config."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` and an error that says what the file is when it is not a
    checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is an empty file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError) as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from e
    except Exception as e:  # the weights-only unpickler raises many kinds on foreign or corrupt files
        raise CheckpointError(f"{path} {_why_unloadable(path, e)}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _why_unloadable(path: Path, e: Exception) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused is, in words (not torch's advice to load it
    unsafely): a damaged torch.save archive, a file of another kind, or a pickle holding more than plain data."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    cause = ""
    if lines[0].startswith("Weights only load failed"):  # torch's advice to load unsafely first, the reason later
        at = [i for i, line in enumerate(lines) if "WeightsUnpickler error:" in line]
        if at:  # the reason follows the marker, on its line or the next
            after = [lines[at[0]].split("WeightsUnpickler error:", 1)[1].strip(), *lines[at[0] + 1 : at[0] + 2]]
            cause = next((part for part in after if part), "")
        else:
            skip = ("Check the documentation", "Please file an issue", "Re-running", "(")
            cause = next((line for line in lines[1:] if not line.startswith(skip)), "")
        cause = cause.strip().split(". ")[0]  # its first sentence, not the allow-listing advice after it
    if head.startswith(b"PK\x03\x04"):
        if cause:  # a readable archive whose pickle names classes or functions: refused, nothing of it runs
            return (
                f"holds objects that the safe loader refuses ({cause[:160]}); mmxattn checkpoints hold plain data "
                "only, and a file's code is never run"
            )
        return f"is a damaged or truncated checkpoint archive ({lines[0].split('. ')[0][:160]})"
    if head[:1] == b"\x80":  # a bare pickle, not a torch.save archive
        return "is a pickle, not a torch.save checkpoint archive" + (f" ({cause[:160]})" if cause else "")
    return f"is not a PyTorch checkpoint (a torch.save archive starts with 'PK'; this file starts with {head[:12]!r})"


def _model_state(ckpt: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if "mmxattn_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not an mmxattn checkpoint: it has no 'mmxattn_config'/'state_dict' "
            f"(top-level keys: {sorted(ckpt)[:10]})"
        )
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: its state_dict is a {type(sd).__name__}, not a mapping of tensors")
    return {k[len("model.") :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith("model.")}


def state_dict_mismatch(own: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, other shapes) of the state dict ``given`` against a model's ``own``: the last as
    ``"key: file (shape) vs config (shape)"``."""

    def shape(v: Any) -> tuple[int, ...]:
        return tuple(getattr(v, "shape", ()))

    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    wrong = [
        f"{k}: file {shape(given[k])} vs config {shape(v)}"
        for k, v in own.items()
        if k in given and shape(given[k]) != shape(v)
    ]
    return missing, unexpected, wrong


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    from .model import one_element_params_as_stored

    state = dict(state)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"weights in {source}: {len(not_tensors)} value(s) are not tensors (e.g. {not_tensors[0]}: "
            f"{type(state[not_tensors[0]]).__name__})"
        )
    one_element_params_as_stored(model, state)  # 0-d values written before one-element params became (1,)
    own = model.state_dict()
    missing, unexpected, wrong = state_dict_mismatch(own, state)
    # a float weight given as integers, booleans or complex numbers (or an integer index as floats) would be cast
    # silently by load_state_dict; other float widths (fp16, bf16, fp64) are fine
    wrong += [
        f"{k}: file {state[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in state
        and (
            state[k].is_complex()
            or state[k].is_floating_point() != own[k].is_floating_point()
            or (state[k].dtype == torch.bool and own[k].dtype != torch.bool)
        )
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights in {source} do not fit the model its config describes: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with other shapes or kinds of number (e.g. {wrong[:3]})"
        )
    model.load_state_dict(state, strict=True)


def scoring_info(hparams: dict[str, Any] | None) -> dict[str, Any]:
    """How the training run scored retrieval, from its Lightning hyper-parameters: ``rerank_with`` (the run's
    re-ranking score, "lm" when its matching head was not trained) and ``itm_trained``; ``{}`` when unknown."""
    from .model import RERANK_METHODS

    if not isinstance(hparams, dict) or not hparams:
        return {}
    itm_trained = float(hparams.get("itm_weight", 0.5)) > 0
    how = hparams.get("rerank_with", "itm")
    if how == "itm" and not itm_trained:
        how = "lm"
    return {"rerank_with": how if how in RERANK_METHODS else "itm", "itm_trained": itm_trained}


def tokenizer_mismatch(tokenizer: Any, text_cfg: Any) -> list[str]:
    """How ``tokenizer`` does not fit a model's ``TextConfig`` (empty: it fits). Its vocabulary must be the model's
    (the same rule as the model and the Lightning module apply: every id names one row of the token embedding and
    LM head) and its pad/bos/eos ids the config's (the text encoder masks, and generation starts and stops, by the
    config's ids)."""
    out = []
    if tokenizer.vocab_size != text_cfg.vocab_size:
        out.append(f"vocab_size {tokenizer.vocab_size} vs the model's {text_cfg.vocab_size}")
    for name in ("pad_id", "bos_id", "eos_id"):
        if getattr(tokenizer, name) != getattr(text_cfg, name):
            out.append(f"{name} {getattr(tokenizer, name)} vs the model's {getattr(text_cfg, name)}")
    return out


def _at_context_length(tokenizer: Any, context_length: int) -> Any:
    """``tokenizer`` padding to the model's ``context_length`` by default (the model encodes texts at its own length
    whatever the tokenizer's; this makes ``model.tokenizer(texts)`` give ids the model reads, too)."""
    if tokenizer.context_length == context_length:
        return tokenizer
    from .text.tokenizer import tokenizer_from_dict

    return tokenizer_from_dict({**tokenizer.to_dict(), "context_length": context_length})


def _attach(model: Any, tokenizer_dict: dict | None, preprocess: dict | None, tokenizer_source: Path) -> None:
    from .data.transforms import build_transforms
    from .model import RERANK_METHODS

    if tokenizer_dict is not None:
        from .text.tokenizer import tokenizer_from_dict

        try:
            tok = tokenizer_from_dict(tokenizer_dict)
        except (TypeError, ValueError) as e:  # a missing or invalid field: the message names it, we name the file
            raise CheckpointError(f"{tokenizer_source}: invalid tokenizer settings: {e}") from e
        problems = tokenizer_mismatch(tok, model.cfg.text)
        if problems:
            raise CheckpointError(
                f"{tokenizer_source}: its tokenizer does not fit the model's config ({'; '.join(problems)}): its ids "
                "would name other words than the weights were trained with"
            )
        model.tokenizer = _at_context_length(tok, model.cfg.text.context_length)
    pre = preprocess or {}
    kwargs = {k: tuple(pre[k]) for k in ("mean", "std") if k in pre}
    model.transform = build_transforms(int(pre.get("img_size", model.cfg.vision.img_size)), train=False, **kwargs)
    if pre.get("rerank_with") in RERANK_METHODS:
        model.rerank_with_default = pre["rerank_with"]
    if isinstance(pre.get("itm_trained"), bool):
        model.itm_trained = pre["itm_trained"]


def _without_pretrained(cfg: Any) -> Any:
    """``cfg`` without ``vision_pretrained``: the file holds every weight, so loading must not read (or download)
    the encoder weights the run started from, which may be gone or elsewhere."""
    import dataclasses

    return dataclasses.replace(cfg, vision_pretrained=None) if getattr(cfg, "vision_pretrained", None) else cfg


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or a ``CheckpointError`` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from e


def load(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """An :class:`~mmxattn.model.MMXAttn` in eval mode, with ``tokenizer`` and ``transform`` attached, from a
    Lightning checkpoint (``.ckpt``) or a directory written by :func:`export`."""
    from .model import MMXAttn

    path = Path(path)
    if path.is_dir():
        missing = [f for f in EXPORT_FILES if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path} is not an exported mmxattn model: missing {missing}")
        from safetensors.torch import load_file

        raw = _read_json(path / "config.json")
        try:
            cfg = config_from_dict(raw)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not a valid mmxattn config: {e}") from e
        model = MMXAttn(_without_pretrained(cfg))
        weights = path / "model.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
            raise CheckpointError(f"{weights}: cannot read the weights ({type(e).__name__}: {e})") from e
        if model.cfg.text.tie_embeddings and "lm_head.weight" not in state and "text.token_embedding.weight" in state:
            state["lm_head.weight"] = state["text.token_embedding.weight"]  # tied: stored once
        _load_weights(model, state, weights)
        tok = path / "tokenizer.json"
        pre = path / "preprocess.json"
        tok_dict, pre_dict = (_read_json(f) if f.exists() else None for f in (tok, pre))
        try:
            _attach(model, tok_dict, pre_dict, tok)
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: its tokenizer.json / preprocess.json is invalid: {e}") from e
    else:
        ckpt = read_checkpoint(path)
        state = _model_state(ckpt, path)
        try:
            cfg = config_from_dict(ckpt["mmxattn_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its mmxattn_config is invalid: {e}") from e
        model = MMXAttn(_without_pretrained(cfg))
        _load_weights(model, state, path)
        try:
            pre = ckpt.get("mmxattn_preprocess") or {}
            if not isinstance(pre, dict):
                raise TypeError(f"mmxattn_preprocess is a {type(pre).__name__}, not a mapping")
            _attach(model, ckpt.get("mmxattn_tokenizer"), {**scoring_info(ckpt.get("hyper_parameters")), **pre}, path)
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: its tokenizer / preprocessing settings are invalid: {e}") from e
    return model.to(device).eval()


def export(model: Any, directory: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``tokenizer.json`` (if the model has a tokenizer) and
    ``preprocess.json`` to ``directory``; :func:`load` reads it back. Those files are replaced in a folder that
    holds them (a ``tokenizer.json`` there is removed when the model has none); other files are left alone. A
    tokenizer that does not fit the model's config (another vocabulary size or other special ids) is a
    ``CheckpointError``, before anything is written."""
    from safetensors.torch import save_file

    d = Path(directory)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        problems = tokenizer_mismatch(tokenizer, model.cfg.text)
        if problems:
            raise CheckpointError(
                f"cannot export to {d}: the model's tokenizer does not fit its config ({'; '.join(problems)}); "
                "attach the tokenizer the model was trained with"
            )
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores no aliases; load() re-ties it
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config_to_dict(model.cfg), indent=2))
    if tokenizer is not None:  # at the model's context length, as load() attaches it
        tok_dict = {**tokenizer.to_dict(), "context_length": int(model.cfg.text.context_length)}
        (d / "tokenizer.json").write_text(json.dumps(tok_dict))
    else:  # one left by an earlier export into this folder would be loaded with these weights
        (d / "tokenizer.json").unlink(missing_ok=True)
    (d / "preprocess.json").write_text(json.dumps(preprocess_info(model)))
    return d


def preprocess_info(model: Any) -> dict[str, Any]:
    """Image size (the config's) and normalisation the model expects (stored with checkpoints and exports): those
    of the eval transform attached to it (``mmxattn.load`` attaches the stored ones, so a loaded model exports what it was
    trained with), else the encoder's own, else ImageNet's."""
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    visual, transform = model.visual, getattr(model, "transform", None)
    mean = getattr(transform, "mean", None) or getattr(visual, "mean", IMAGENET_MEAN)
    std = getattr(transform, "std", None) or getattr(visual, "std", IMAGENET_STD)
    info = {
        "img_size": int(model.cfg.vision.img_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    # how retrieve() re-ranks by default (see MMXAttn.rerank_with_default), where the model knows it
    if getattr(model, "rerank_with_default", None) is not None:
        info["rerank_with"] = model.rerank_with_default
    if isinstance(getattr(model, "itm_trained", None), bool):
        info["itm_trained"] = model.itm_trained
    return info
