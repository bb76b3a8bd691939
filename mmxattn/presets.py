"""Named presets: plain data (dicts of config fields), turned into models by :func:`create_model` and
:func:`create_encoder`. Adding a preset never adds a code path."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import CATConfig, MMXAttnConfig, TextConfig

__all__ = [
    "ENCODER_PRESETS",
    "MODEL_PRESETS",
    "list_presets",
    "list_encoder_presets",
    "get_config",
    "create_encoder",
    "create_model",
    "get_encoder_config",
]

# CAT image encoders. cat_t/s/b are the official ImageNet sizes (SPEC.md); the rest are small CPU sizes.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "cat_t": dict(embed_dim=64, depths=(1, 1, 3, 1), num_heads=(2, 4, 8, 16), drop_path_rate=0.1),
    "cat_s": dict(embed_dim=96, depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "cat_b": dict(embed_dim=96, depths=(1, 1, 6, 1), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    # the shared/cat_reference fixture's configuration
    "cat_micro": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
    # tests: 64 px, 4x4 windows -> 16x16, 8x8, 4x4 token grids over three stages
    "cat_pico": dict(
        embed_dim=32, depths=(1, 1, 1), num_heads=(1, 2, 4), img_size=64, window=4, num_classes=0, drop_path_rate=0.0
    ),
    # the embedded shapes data set on a CPU budget: 64 px input
    "cat_shapes": dict(
        embed_dim=48, depths=(1, 1, 1), num_heads=(2, 4, 8), img_size=64, window=4, num_classes=0, drop_path_rate=0.0
    ),
}

# open_clip's BPE ids (mmxattn.text.tokenizer.OpenCLIPTokenizer): its 49408 tokens plus a pad id of our own,
# because open_clip pads with 0, which is also the real token "!".
_BPE = dict(vocab_size=49409, pad_id=49408, bos_id=49406, eos_id=49407)

# Whole models: {"vision": encoder preset name or dict, "text": dict, other MMXAttnConfig fields}.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # the smallest useful model, for CPU tests
    "mmx_tiny": dict(
        vision="cat_pico",
        text=dict(vocab_size=64, context_length=16, width=64, heads=2, layers=1, decoder_layers=1),
        embed_dim=64,
        image_stages=(-2, -1),
    ),
    # the embedded shapes data set, trained on 2 CPU cores in minutes
    "mmx_shapes": dict(
        vision="cat_shapes",
        text=dict(vocab_size=64, context_length=24, width=128, heads=4, layers=2, decoder_layers=2),
        embed_dim=128,
        image_stages=(-2, -1),
    ),
    # the official CAT-T encoder at 224 px with a CoCa-tiny-like text side (open_clip BPE vocabulary)
    "mmx_cat_t": dict(
        vision=dict(preset="cat_t", num_classes=0, checkpoint_stages=(0,)),
        text=dict(context_length=32, width=256, heads=4, layers=4, decoder_layers=4, **_BPE),
        embed_dim=256,
        image_stages=(-2, -1),
        tokenizer="openclip",
    ),
    "mmx_cat_s": dict(
        vision=dict(preset="cat_s", num_classes=0, checkpoint_stages=(0,)),
        text=dict(context_length=64, width=512, heads=8, layers=6, decoder_layers=6, **_BPE),
        embed_dim=512,
        image_stages=(-2, -1),
        tokenizer="openclip",
    ),
}


def list_presets() -> list[str]:
    """Model presets accepted by :func:`create_model`."""
    return sorted(MODEL_PRESETS)


def list_encoder_presets() -> list[str]:
    """Encoder presets accepted by :func:`create_encoder`."""
    return sorted(ENCODER_PRESETS)


def _unknown(kind: str, name: str, choices: list[str]) -> KeyError:
    return KeyError(f"unknown {kind} preset {name!r}; choose one of {choices}")


def get_encoder_config(name_or_config: str | CATConfig | dict, **overrides: Any) -> CATConfig:
    if isinstance(name_or_config, CATConfig):
        return dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config
    if isinstance(name_or_config, dict):
        fields = dict(name_or_config)
        base = fields.pop("preset", None)
        if base is not None and base not in ENCODER_PRESETS:
            raise _unknown("encoder", base, list_encoder_presets())
        base_fields = dict(ENCODER_PRESETS[base]) if base else {}
        return CATConfig(**{**base_fields, **fields, **overrides})
    if name_or_config not in ENCODER_PRESETS:
        raise _unknown("encoder", name_or_config, list_encoder_presets())
    return CATConfig(**{**ENCODER_PRESETS[name_or_config], **overrides})


def create_encoder(name_or_config: str | CATConfig | dict = "cat_t", **overrides: Any):
    """Build a :class:`~mmxattn.vision.cat.CATEncoder` from a preset name or a :class:`CATConfig`.

    ``create_encoder("cat_t", num_classes=0, img_size=448)`` overrides fields of the preset.
    """
    from .vision.cat import CATEncoder

    return CATEncoder(get_encoder_config(name_or_config, **overrides))


_TOP = {f.name for f in dataclasses.fields(MMXAttnConfig)} - {"vision", "text"}
_TEXT = {f.name for f in dataclasses.fields(TextConfig)}
_VISION = {f.name for f in dataclasses.fields(CATConfig)}


def _sub_fields(key: str, value: Any, cls: type, fields: set[str]) -> dict[str, Any]:
    """The fields a ``vision=``/``text=`` override sets: a config of ``cls`` or a dict of its field names."""
    if isinstance(value, cls):
        return dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise TypeError(f"{key}= takes a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    unknown = sorted(set(value) - fields)
    if unknown:
        extra = ' or "preset": an encoder preset name' if cls is CATConfig else ""
        raise ValueError(f"{key}={{...}} has unknown field(s) {unknown}: not fields of {cls.__name__}{extra}")
    return value


def get_config(name: str | MMXAttnConfig, **overrides: Any) -> MMXAttnConfig:
    """The :class:`MMXAttnConfig` of a preset with overrides.

    Overrides are top-level fields (``embed_dim=...``), ``vision={...}`` / ``text={...}`` dicts merged into the
    sub-configs, or a field name of exactly one sub-config (``vocab_size=...``, ``img_size=...``); a name found in
    both sub-configs must be given inside ``vision=``/``text=``.
    """
    if isinstance(name, MMXAttnConfig):
        base = dataclasses.asdict(name)
    else:
        if name not in MODEL_PRESETS:
            raise _unknown("model", name, list_presets())
        p = dict(MODEL_PRESETS[name])
        p.pop("tokenizer", None)
        v = p.pop("vision")
        base = {
            **p,
            "vision": dataclasses.asdict(get_encoder_config(v)),
            "text": dataclasses.asdict(TextConfig(**p.get("text", {}))),
        }
    vision = dict(base.pop("vision"))
    text = dict(base.pop("text"))
    for key, value in overrides.items():
        if key == "vision":
            if isinstance(value, str) or (isinstance(value, dict) and "preset" in value):
                # another encoder preset: its fields replace the model preset's encoder (the model never uses a
                # classification head, so none is built unless asked for)
                spec = {"preset": value} if isinstance(value, str) else value
                vision = dataclasses.asdict(get_encoder_config({"num_classes": 0, **spec}))
            else:
                vision.update(_sub_fields("vision", value, CATConfig, _VISION))
        elif key == "text":
            text.update(_sub_fields("text", value, TextConfig, _TEXT))
        elif key in _TOP:
            base[key] = value
        elif key in _TEXT and key in _VISION:
            raise ValueError(
                f"override {key!r} exists in both vision and text configs; pass vision={{...}} or text={{...}}"
            )
        elif key in _TEXT:
            text[key] = value
        elif key in _VISION:
            vision[key] = value
        else:
            raise ValueError(
                f"unknown override {key!r} for model preset {name!r}: not a field of MMXAttnConfig, TextConfig or CATConfig"
            )
    return MMXAttnConfig(vision=CATConfig(**vision), text=TextConfig(**text), **base)


def create_model(name: str | MMXAttnConfig = "mmx_tiny", *, tokenizer: Any = None, **overrides: Any):
    """Build an :class:`~mmxattn.model.MMXAttn` from a preset name (see :func:`list_presets`) or a config."""
    from .model import MMXAttn

    cfg = get_config(name, **overrides)
    wants_bpe = isinstance(name, str) and MODEL_PRESETS[name].get("tokenizer") == "openclip"
    # a vocab_size override means "not this tokenizer": the caller attaches its own
    if tokenizer is None and wants_bpe and cfg.text.vocab_size == _BPE["vocab_size"]:
        from .text.tokenizer import OpenCLIPTokenizer

        tokenizer = OpenCLIPTokenizer(context_length=cfg.text.context_length)
    return MMXAttn(cfg, tokenizer=tokenizer)
