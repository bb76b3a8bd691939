"""Frozen configuration dataclasses. Each checks itself in ``__post_init__`` so a wrong config fails at
construction with a message naming the field, not somewhere deep inside a forward pass."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CATConfig", "TextConfig", "MMXAttnConfig", "config_from_dict", "config_to_dict"]


def _err(cls: str, msg: str) -> ValueError:
    return ValueError(f"{cls}: {msg}")


def _given(v: Any) -> str:
    """A value as error messages show it: its type and repr (``str '32'``, ``float 1.7``)."""
    return f"{type(v).__name__} {v!r:.80}"


def _is_int(v: Any) -> bool:
    # bool is an int subclass, but True for a size or a stage index is a mistake, not a 1
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(cls: str, cfg: Any, name: str, lo: int | None = None, why: str = "") -> None:
    """Field ``name`` must be an int (not a bool, not a float: nothing is truncated silently), ``>= lo`` when given;
    stored as a plain int (a numpy integer becomes one, so the config stays JSON-able)."""
    v = getattr(cfg, name)
    if not _is_int(v):
        raise TypeError(f"{cls}: {name} must be an int{why}, got {_given(v)}")
    if lo is not None and v < lo:
        raise _err(cls, f"{name} must be an int >= {lo}{why}, got {v}")
    object.__setattr__(cfg, name, int(v))


def _check_float(cls: str, cfg: Any, name: str) -> None:
    """Field ``name`` must be a finite real number (an int is fine, a bool or a string is not); stored as a float."""
    v = getattr(cfg, name)
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{cls}: {name} must be a number, got {_given(v)}")
    if not math.isfinite(v):
        raise _err(cls, f"{name} must be a finite number, got {v}")
    object.__setattr__(cfg, name, float(v))


def _check_bool(cls: str, cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, bool):  # a string "false" would be truthy
        raise TypeError(f"{cls}: {name} must be a bool (True or False), got {_given(v)}")


def _check_ints(cls: str, cfg: Any, name: str) -> None:
    """Field ``name`` must be a list or tuple of ints (no bools, no floats); stored as a tuple of plain ints, so the
    config stays hashable and frozen (YAML and JSON give lists)."""
    v = getattr(cfg, name)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"{cls}: {name} must be a list or tuple of ints, got {_given(v)}")
    bad = [x for x in v if not _is_int(x)]
    if bad:
        raise TypeError(f"{cls}: {name} must hold ints only, got {_given(bad[0])} in {list(v)!r:.80}")
    object.__setattr__(cfg, name, tuple(int(x) for x in v))


@dataclass(frozen=True)
class CATConfig:
    """The CAT image encoder (Lin et al. 2021). Defaults are CAT-T.

    ``window`` is the paper's "patch" size p: IPSA attends inside p x p windows, CPSA treats each window of one
    channel as a token of dimension p*p.
    """

    embed_dim: int = 64
    depths: tuple[int, ...] = (1, 1, 3, 1)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    img_size: int = 224
    patch_size: int = 4
    window: int = 7
    in_chans: int = 3
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = True
    # "patch" (official: one conv, kernel = stride = patch) or "conv" (ours: a small convolutional stem, see
    # mmxattn.vision.cat.PatchEmbed; the official state dicts only fit "patch")
    stem: str = "patch"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False  # recompute every stage's blocks in backward
    # Stages recomputed in backward even without grad_checkpointing: the high-resolution first stage holds
    # the most activations per FLOP (CAT-T at 224 px: 42% of the encoder's activations, 1/6 of its compute).
    checkpoint_stages: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = "CATConfig"
        # types first, so a wrong one is named here rather than failing in the arithmetic below
        for name in ("depths", "num_heads", "checkpoint_stages"):
            _check_ints(n, self, name)
        _check_int(n, self, "img_size", why=" (square images: one side length in pixels)")
        for name in ("embed_dim", "patch_size", "window", "in_chans", "num_classes"):
            _check_int(n, self, name)
        for name in ("mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate"):
            _check_float(n, self, name)
        for name in ("qkv_bias", "ape", "grad_checkpointing"):
            _check_bool(n, self, name)
        if not isinstance(self.stem, str):
            raise TypeError(f"{n}: stem must be a str ('patch' or 'conv'), got {_given(self.stem)}")
        ns = len(self.depths)
        stages = self.checkpoint_stages
        bad = [s for s in stages if not -ns <= s < ns]
        if bad:
            raise _err(n, f"checkpoint_stages {bad} out of range for {ns} stages")
        object.__setattr__(self, "checkpoint_stages", tuple(sorted({s % ns for s in stages})))
        if len(self.depths) == 0:
            raise _err(n, "depths must name at least one stage")
        if len(self.depths) != len(self.num_heads):
            raise _err(n, f"depths {self.depths} and num_heads {self.num_heads} must have the same length")
        if any(d < 1 for d in self.depths):
            raise _err(n, f"every stage needs at least one block, got depths={self.depths}")
        for i, h in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if h < 1 or dim % h:
                raise _err(n, f"stage {i} width {dim} is not divisible by num_heads[{i}]={h}")
        for name in ("embed_dim", "img_size", "patch_size", "window", "in_chans"):
            if getattr(self, name) < 1:
                raise _err(n, f"{name} must be positive, got {getattr(self, name)}")
        if not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) < 1:
            raise _err(n, f"mlp_ratio must give an MLP of at least one unit (> 0), got {self.mlp_ratio}")
        if self.img_size % self.patch_size:
            raise _err(n, f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size} (ape grid)")
        if self.stem not in ("patch", "conv"):
            raise _err(n, f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise _err(n, f"stem='conv' needs patch_size a power of two >= 2, got {self.patch_size}")
        if self.num_classes < 0:
            raise _err(n, f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise _err(n, f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(self.num_stages))


@dataclass(frozen=True)
class TextConfig:
    """Text encoder (causal, CLS pooled) and multimodal decoder (causal self-attn -> cross-attn -> MLP)."""

    vocab_size: int = 49408
    context_length: int = 32  # token positions including BOS/EOS
    width: int = 256
    heads: int = 4
    layers: int = 4  # text encoder blocks
    decoder_layers: int = 4  # multimodal decoder blocks
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    tie_embeddings: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        n = "TextConfig"
        for name in ("vocab_size", "context_length", "pad_id", "bos_id", "eos_id"):
            _check_int(n, self, name)
        for name in ("width", "heads"):
            _check_int(n, self, name, lo=1)
        for name in ("layers", "decoder_layers"):
            _check_int(n, self, name)
        for name in ("mlp_ratio", "dropout"):
            _check_float(n, self, name)
        for name in ("tie_embeddings", "grad_checkpointing"):
            _check_bool(n, self, name)
        if self.width % self.heads:
            raise _err(n, f"width {self.width} is not divisible by heads {self.heads}")
        if self.vocab_size < 4:
            raise _err(n, f"vocab_size must be >= 4 (pad, bos, eos and one word), got {self.vocab_size}")
        for name in ("pad_id", "bos_id", "eos_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise _err(n, f"{name}={v} is outside the vocabulary [0, {self.vocab_size})")
        if len({self.pad_id, self.bos_id, self.eos_id}) != 3:
            raise _err(n, f"pad_id, bos_id and eos_id must differ, got {self.pad_id}, {self.bos_id}, {self.eos_id}")
        if self.context_length < 3:
            raise _err(n, f"context_length must be >= 3, got {self.context_length}")
        if self.layers < 1 or self.decoder_layers < 1:
            raise _err(n, f"layers and decoder_layers must be >= 1, got {self.layers}, {self.decoder_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise _err(n, f"dropout must be in [0, 1), got {self.dropout}")
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise _err(n, f"mlp_ratio must give an MLP of at least one unit (> 0), got {self.mlp_ratio}")


@dataclass(frozen=True)
class MMXAttnConfig:
    """The whole model: image encoder + text towers.

    ``image_stages`` picks the encoder stages whose tokens the decoder reads (and the pooler pools); each is
    projected to the text width and given a 2-D position signal so attention can point at places.
    """

    vision: CATConfig = field(default_factory=CATConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # retrieval embedding size E
    image_stages: tuple[int, ...] = (-1,)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    itm_head: bool = True  # image-text matching head on the decoder, used for re-ranking
    # word-presence head on the image tokens (every token scores every vocabulary word), trained by the module's
    # word_weight > 0 with mmxattn.losses.WordPresenceLoss; MMXAttn.word_maps reads it
    word_head: bool = False
    # None: the word head reads the image tokens the decoder reads (projected to the text width). An encoder stage
    # (at most as deep as the deepest of image_stages; the decoder need not read it): the head reads that stage's
    # own tokens (the stage's channel width, on its token grid), before the projection. On the shapes data the projection's LayerNorm/Linear/position signal slowed the
    # learning of shape words ~4x (docs/benchmarks.md, "What the shapes models know"); the stage's tokens learn them
    # directly.
    word_head_stage: int | None = None
    # True (needs word_head): the decoder and the retrieval pooler also read what the word head sees. Every image
    # token gets Linear(V, W)(p), the word head's probabilities p (B, L, V) of every vocabulary word at that token
    # (with word_head_stage, that stage's maps max-pooled onto each read stage's grid), detached (only the word
    # loss trains the head) through a zero-initialised Linear: a no-op at the start of training. On the shapes
    # data the word head learns shapes that the captioner's attention does not (docs/benchmarks.md, "What the shapes
    # models know"). Its cost grows with the vocabulary (a (B, L, V) product per image): meant for small vocabularies.
    word_context: bool = False
    # What word_context's Linear reads of each probability p: "prob" (p itself) or "logprob" (max(log p, -8) / 8 + 1,
    # also in [0, 1]: 1 where the head is sure, 0 below e^-8). Attention logits are linear in what the tokens carry,
    # so with "logprob" a query can weigh several words' log-probabilities and attend in proportion to a PRODUCT
    # of their maps ("small" x "red" x "circle": where one object is all three), which a sum of probabilities
    # only approximates.
    word_context_input: str = "prob"
    # "cat" (the project's CAT encoder) or an adapter spec "timm:<model name>" / "open_clip:<model name>"
    vision_backend: str = "cat"
    vision_pretrained: str | None = None  # local file path (or hub tag, for users with a network)

    def __post_init__(self) -> None:
        n = "MMXAttnConfig"
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", CATConfig(**self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextConfig(**self.text))
        for name, cls in (("vision", CATConfig), ("text", TextConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"{n}: {name} must be a {cls.__name__} or a dict of its fields, got {_given(getattr(self, name))}"
                )
        _check_int(n, self, "embed_dim")
        _check_ints(n, self, "image_stages")
        for name in ("init_logit_scale", "max_logit_scale"):
            _check_float(n, self, name)
        for name in ("itm_head", "word_head", "word_context"):
            _check_bool(n, self, name)
        if self.word_head_stage is not None:
            _check_int(n, self, "word_head_stage", why=" (an encoder stage) or None")
        for name in ("word_context_input", "vision_backend"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{n}: {name} must be a str, got {_given(getattr(self, name))}")
        if self.vision_pretrained is not None and not isinstance(self.vision_pretrained, (str, os.PathLike)):
            raise TypeError(
                f"{n}: vision_pretrained must be a path (str) or None, got {_given(self.vision_pretrained)}"
            )
        if not self.image_stages:
            raise _err(n, "image_stages must name at least one encoder stage")
        if self.vision_backend == "cat":
            ns = self.vision.num_stages
            bad = [s for s in self.image_stages if not -ns <= s < ns]
            if bad:
                raise _err(n, f"image_stages {bad} out of range for an encoder with {ns} stages")
            norm = sorted({s % ns for s in self.image_stages})
            if len(norm) != len(self.image_stages):
                raise _err(n, f"image_stages {self.image_stages} repeats a stage")
        if self.word_head_stage is not None:
            if not self.word_head:
                raise _err(n, f"word_head_stage={self.word_head_stage} needs word_head=True")
            if self.vision_backend == "cat":
                ns = self.vision.num_stages
                deepest = max(s % ns for s in self.image_stages)
                if not -ns <= self.word_head_stage < ns or self.word_head_stage % ns > deepest:
                    raise _err(
                        n,
                        f"word_head_stage {self.word_head_stage} must be an encoder stage no deeper than the deepest "
                        f"of image_stages {self.image_stages} (the encoder stops there)",
                    )
        if self.word_context and not self.word_head:
            raise _err(n, "word_context=True needs word_head=True (the context is the word head's probabilities)")
        if self.word_context_input not in ("prob", "logprob"):
            raise _err(n, f"word_context_input must be 'prob' or 'logprob', got {self.word_context_input!r}")
        if self.embed_dim < 1:
            raise _err(n, f"embed_dim must be positive, got {self.embed_dim}")
        if self.max_logit_scale <= 0:
            raise _err(n, f"max_logit_scale must be > 0, got {self.max_logit_scale}")
        if self.init_logit_scale > math.log(self.max_logit_scale):  # no exp(): it overflows for a large init
            raise _err(
                n,
                f"init_logit_scale must be <= log(max_logit_scale) = {math.log(self.max_logit_scale):.4g}, "
                f"got {self.init_logit_scale}",
            )


def config_to_dict(cfg: Any) -> dict:
    """JSON-able dict of a config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def config_from_dict(d: dict) -> MMXAttnConfig:
    """Inverse of :func:`config_to_dict` for :class:`MMXAttnConfig`; unknown keys are an error naming them.

    ``d`` must be a dict holding at least one field of the config: an empty one (or a list, ...) is an error, not
    the default model, whose weights would not fit what the file was meant to describe."""
    if not isinstance(d, Mapping):
        raise TypeError(
            f"MMXAttnConfig: a config must be a dict of its fields (as config_to_dict writes), got {_given(d)}"
        )
    known = {f.name for f in dataclasses.fields(MMXAttnConfig)}
    if not d:
        raise ValueError(
            "MMXAttnConfig: the config dict is empty; expected the fields config_to_dict writes "
            f"(e.g. {sorted(known)[:6]})"
        )
    unknown = set(d) - known
    if unknown == set(d):
        raise ValueError(
            f"MMXAttnConfig: unrecognised config: none of its keys {sorted(map(str, d))[:10]} is a field of "
            f"MMXAttnConfig ({sorted(known)})"
        )
    if unknown:
        raise ValueError(f"MMXAttnConfig: unknown keys {sorted(map(str, unknown))}")
    d = dict(d)
    if "vision" in d:
        d["vision"] = _strict(CATConfig, d["vision"])
    if "text" in d:
        d["text"] = _strict(TextConfig, d["text"])
    return MMXAttnConfig(**d)


def _strict(cls: type, d: dict) -> Any:
    if not isinstance(d, Mapping):
        raise TypeError(f"{cls.__name__}: a config must be a dict of its fields, got {_given(d)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return cls(**d)
