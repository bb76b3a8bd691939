"""Config checks: every int/float/bool field of the config dataclasses rejects a wrong type or value at construction
with a message naming the field, and ``config_from_dict`` refuses what is not a config (no silent defaults)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from mmxattn.config import CATConfig, MMXAttnConfig, TextConfig, config_from_dict, config_to_dict
from mmxattn.presets import get_config, get_encoder_config, list_encoder_presets, list_presets

SMALL_CAT = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window=4, num_classes=0)
SMALL_TEXT = dict(vocab_size=16, context_length=8, width=16, heads=2, layers=1, decoder_layers=1)


def _fields(cls: type, kind: str) -> list[str]:
    """The fields of ``cls`` annotated ``kind`` (or ``kind | None``); annotations are strings (PEP 563)."""
    return [f.name for f in dataclasses.fields(cls) if f.type in (kind, f"{kind} | None")]


# ---------------------------------------------------------------------------------------------------------------
# the audit's examples


def test_zero_heads_or_width_are_value_errors_not_zero_division():
    with pytest.raises(ValueError, match=r"TextConfig: heads must be an int >= 1, got 0"):
        TextConfig(heads=0)
    with pytest.raises(ValueError, match=r"TextConfig: width must be an int >= 1, got 0"):
        TextConfig(width=0, heads=1)
    with pytest.raises(ValueError, match=r"heads must be an int >= 1, got -2"):
        TextConfig(width=4, heads=-2)


def test_strings_for_numbers_are_type_errors_naming_the_field():
    with pytest.raises(TypeError, match=r"CATConfig: embed_dim must be an int, got str '32'"):
        CATConfig(embed_dim="32")
    with pytest.raises(TypeError, match=r"TextConfig: vocab_size must be an int, got str '64'"):
        TextConfig(vocab_size="64")
    with pytest.raises(TypeError, match=r"CATConfig: mlp_ratio must be a number, got str '4'"):
        CATConfig(mlp_ratio="4")


def test_non_square_img_size_says_an_int_is_required():
    with pytest.raises(TypeError, match=r"img_size must be an int \(square images.*got tuple \(64, 96\)"):
        CATConfig(img_size=(64, 96))


@pytest.mark.parametrize("bad", [(1.7, 1, 1, 1), (1, 1, 2.0, 1), (True, 1, 1, 1), "1131"])
def test_depths_must_be_ints_nothing_truncated(bad):
    with pytest.raises(TypeError, match="CATConfig: depths must"):
        CATConfig(depths=bad)


def test_tuple_fields_reject_non_integral_entries():
    with pytest.raises(TypeError, match=r"num_heads must hold ints only, got float 2\.5"):
        CATConfig(num_heads=(2, 2.5, 8, 16))
    with pytest.raises(TypeError, match=r"checkpoint_stages must hold ints only, got float 0\.5"):
        CATConfig(checkpoint_stages=(0.5,))
    with pytest.raises(TypeError, match=r"MMXAttnConfig: image_stages must hold ints only, got float -1\.5"):
        MMXAttnConfig(image_stages=(-1.5,))
    with pytest.raises(TypeError, match=r"image_stages must be a list or tuple of ints, got int -1"):
        MMXAttnConfig(image_stages=-1)


@pytest.mark.parametrize("field", ["init_logit_scale", "max_logit_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_logit_scales_must_be_finite(field, value):
    with pytest.raises(ValueError, match=f"MMXAttnConfig: {field} must be a finite number"):
        MMXAttnConfig(**{field: value})


def test_logit_scale_relations_are_kept():
    with pytest.raises(ValueError, match=r"max_logit_scale must be > 0, got -1"):
        MMXAttnConfig(max_logit_scale=-1.0)
    with pytest.raises(ValueError, match=r"init_logit_scale must be <= log\(max_logit_scale\)"):
        MMXAttnConfig(init_logit_scale=math.log(50.0), max_logit_scale=20.0)
    # a huge init used to overflow in exp() (OverflowError) instead of naming the relation
    with pytest.raises(ValueError, match=r"init_logit_scale must be <= log\(max_logit_scale\)"):
        MMXAttnConfig(init_logit_scale=1e4)
    assert MMXAttnConfig(init_logit_scale=math.log(20.0), max_logit_scale=20.0).max_logit_scale == 20.0


@pytest.mark.parametrize("ratio", [0, 0.0, -1.0, 0.001])
def test_text_mlp_ratio_must_give_an_mlp(ratio):
    with pytest.raises(ValueError, match="TextConfig: mlp_ratio"):
        TextConfig(**SMALL_TEXT, mlp_ratio=ratio)
    with pytest.raises(ValueError, match="CATConfig: mlp_ratio"):
        CATConfig(**SMALL_CAT, mlp_ratio=ratio)


# ---------------------------------------------------------------------------------------------------------------
# every field, systematically


@pytest.mark.parametrize("cls", [CATConfig, TextConfig, MMXAttnConfig])
def test_every_int_field_rejects_str_float_and_bool(cls):
    names = _fields(cls, "int")
    assert names, cls
    for name in names:
        for bad in ("3", 3.5, True, None):
            if name == "word_head_stage" and bad is None:
                continue  # None is that field's "off"
            with pytest.raises(TypeError, match=f"{cls.__name__}: {name} must be an int"):
                cls(**{name: bad})


@pytest.mark.parametrize("cls", [CATConfig, TextConfig, MMXAttnConfig])
def test_every_float_field_rejects_str_bool_and_non_finite(cls):
    names = _fields(cls, "float")
    assert names, cls
    for name in names:
        for bad in ("0.5", True, None):
            with pytest.raises(TypeError, match=f"{cls.__name__}: {name} must be a number"):
                cls(**{name: bad})
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{cls.__name__}: {name} must be"):
                cls(**{name: bad})


@pytest.mark.parametrize("cls", [CATConfig, TextConfig, MMXAttnConfig])
def test_every_bool_field_rejects_strings_and_ints(cls):
    names = _fields(cls, "bool")
    assert names, cls
    for name in names:
        for bad in ("false", 0, None):
            with pytest.raises(TypeError, match=f"{cls.__name__}: {name} must be a bool"):
                cls(**{name: bad})


@pytest.mark.parametrize("cls", [CATConfig, MMXAttnConfig])
def test_every_int_tuple_field_rejects_strings_floats_and_bools(cls):
    names = _fields(cls, "tuple[int, ...]")
    assert names, cls
    for name in names:
        with pytest.raises(TypeError, match=f"{cls.__name__}: {name} must be a list or tuple of ints, got str"):
            cls(**{name: "12"})
        for bad in (0.5, True):
            with pytest.raises(
                TypeError, match=f"{cls.__name__}: {name} must hold ints only, got {type(bad).__name__}"
            ):
                cls(**{name: (bad,)})


@pytest.mark.parametrize(
    "cls, field, value, match",
    [
        (CATConfig, "embed_dim", 0, "embed_dim must be positive"),
        (CATConfig, "img_size", 0, "img_size must be positive"),
        (CATConfig, "patch_size", 0, "patch_size must be positive"),
        (CATConfig, "window", -1, "window must be positive"),
        (CATConfig, "in_chans", 0, "in_chans must be positive"),
        (CATConfig, "num_classes", -1, "num_classes must be >= 0"),
        (CATConfig, "depths", (0, 1, 1, 1), "every stage needs at least one block"),
        (CATConfig, "num_heads", (0, 4, 8, 16), "num_heads\\[0\\]=0"),
        (CATConfig, "drop_path_rate", 1.0, "drop_path_rate must be in \\[0, 1\\)"),
        (TextConfig, "vocab_size", 3, "vocab_size must be >= 4"),
        (TextConfig, "context_length", 2, "context_length must be >= 3"),
        (TextConfig, "layers", 0, "layers and decoder_layers must be >= 1"),
        (TextConfig, "decoder_layers", 0, "layers and decoder_layers must be >= 1"),
        (TextConfig, "pad_id", -1, "pad_id=-1 is outside the vocabulary"),
        (TextConfig, "dropout", -0.1, "dropout must be in \\[0, 1\\)"),
        (MMXAttnConfig, "embed_dim", 0, "embed_dim must be positive"),
    ],
)
def test_out_of_range_values_are_value_errors(cls, field, value, match):
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})


def test_sub_configs_must_be_configs_or_dicts():
    with pytest.raises(TypeError, match=r"MMXAttnConfig: vision must be a CATConfig or a dict of its fields, got list"):
        MMXAttnConfig(vision=[64])
    with pytest.raises(TypeError, match=r"MMXAttnConfig: text must be a TextConfig or a dict of its fields, got str"):
        MMXAttnConfig(text="small")
    with pytest.raises(TypeError, match=r"vision_backend must be a str, got NoneType"):
        MMXAttnConfig(vision_backend=None)


def test_valid_numbers_are_normalised_to_plain_python_types():
    """numpy scalars and lists are accepted and stored as int / float / tuple, so configs stay hashable and their
    dicts JSON-able."""
    cfg = CATConfig(
        embed_dim=np.int64(16),
        depths=[1, np.int32(1)],
        num_heads=[1, 2],
        img_size=32,
        window=4,
        mlp_ratio=np.float32(2.0),
        drop_path_rate=0,
    )
    assert type(cfg.embed_dim) is int and cfg.depths == (1, 1) and all(type(d) is int for d in cfg.depths)
    assert type(cfg.mlp_ratio) is float and cfg.mlp_ratio == 2.0 and type(cfg.drop_path_rate) is float
    json.dumps(config_to_dict(cfg))
    hash(cfg)
    text = TextConfig(**{**SMALL_TEXT, "width": np.int64(16)}, mlp_ratio=2)
    assert type(text.width) is int and type(text.mlp_ratio) is float


# ---------------------------------------------------------------------------------------------------------------
# presets and round trips still work


@pytest.mark.parametrize("name", list_presets())
def test_every_model_preset_builds_and_round_trips(name):
    cfg = get_config(name)
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(d) == cfg


@pytest.mark.parametrize("name", list_encoder_presets())
def test_every_encoder_preset_builds(name):
    assert get_encoder_config(name).num_stages >= 1


def test_a_partial_config_dict_keeps_the_defaults_of_the_rest():
    cfg = config_from_dict({"embed_dim": 64, "text": {"vocab_size": 64, "width": 64, "heads": 2}})
    assert cfg.embed_dim == 64 and cfg.text.vocab_size == 64 and cfg.vision == CATConfig()


# ---------------------------------------------------------------------------------------------------------------
# config_from_dict: no silent default model


@pytest.mark.parametrize("bad", [[], [1, 2], "cat_t", None, 3])
def test_config_from_a_non_dict_is_a_type_error(bad):
    with pytest.raises(
        TypeError, match=f"MMXAttnConfig: a config must be a dict of its fields.*got {type(bad).__name__}"
    ):
        config_from_dict(bad)


def test_config_from_an_empty_or_unrecognised_dict_is_an_error():
    with pytest.raises(ValueError, match="MMXAttnConfig: the config dict is empty"):
        config_from_dict({})
    with pytest.raises(
        ValueError, match=r"MMXAttnConfig: unrecognised config: none of its keys \['model', 'weights'\]"
    ):
        config_from_dict({"model": "x", "weights": []})
    with pytest.raises(ValueError, match=r"MMXAttnConfig: unknown keys \['nope'\]"):
        config_from_dict({"embed_dim": 64, "nope": 1})
    with pytest.raises(TypeError, match=r"CATConfig: a config must be a dict of its fields, got list"):
        config_from_dict({"vision": [], "embed_dim": 64})


def test_an_export_whose_config_json_is_not_a_config_names_it(tmp_path):
    import mmxattn
    from mmxattn.checkpoint import CheckpointError

    d = mmxattn.export(mmxattn.create_model("mmx_tiny"), tmp_path / "exp")
    for bad in ([], {}):
        (d / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=r"config\.json: not a valid mmxattn config: MMXAttnConfig") as e:
            mmxattn.load(d)
        assert "missing" not in str(e.value)
