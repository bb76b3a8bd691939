"""Other image encoders behind :class:`~mmxattn.vision.cat.CATEncoder`'s interface: timm models and open_clip
visual towers, so :class:`~mmxattn.model.MMXAttn` can be fine-tuned from a pretrained encoder.

Selected by ``MMXAttnConfig.vision_backend``::

    mmxattn.create_model("mmx_tiny", vision_backend="timm:convnext_atto", vision_pretrained=None)
    mmxattn.create_model("mmx_cat_t", vision_backend="open_clip:ViT-B-16", vision_pretrained="laion2b_s34b_b88k")

``vision.img_size`` sets the encoder's input size (ViT position embeddings are resampled to it when weights load),
so the data transforms and the encoder agree; ``vision.drop_path_rate``, ``in_chans`` and ``grad_checkpointing``
are passed on where the encoder has them. Every other ``vision`` field is CAT's and ignored here.

A "stage" is one entry of the encoder's feature list: a resolution stage of a hierarchical model (ResNet: stem
+ 4 layers; ConvNeXt / Swin: 4 stages) or one block of a plain ViT (all at the patch grid), so
``image_stages=(-2, -1)`` reads the last two stages / blocks. Tokens are the patch tokens only (class and register
tokens dropped), row-major over the stage grid, ``(B, h_i * w_i, C_i)``.

Weights (``vision_pretrained``):

* ``None``: random init.
* a local file (``.safetensors`` or ``.pth``/``.pt``/``.bin``, read with ``weights_only=True``) -- the offline
  path. timm: the model's own state dict as timm saves it (e.g. ``model.safetensors`` from the model's Hugging Face
  repo); keys must fit (the classifier is dropped), else a ``ValueError`` lists the missing / unexpected keys.
  open_clip: a full CLIP checkpoint (visual and text towers, e.g. ``open_clip_model.safetensors``), loaded
  strictly by open_clip. A path that does not exist raises ``FileNotFoundError``.
* with a network: timm ``"hub"`` downloads the model name's default weights (pick others with a tag in the name,
  ``timm:vit_base_patch16_224.augreg_in21k``, or ``vision_pretrained="augreg_in21k"``); open_clip takes a pretrained
  tag (``open_clip.list_pretrained_tags_by_model(name)``). Downloads go to the timm / open_clip / Hugging Face
  caches, so a machine that downloaded once can then run offline (``HF_HUB_OFFLINE=1``).
* open_clip also takes its own schemas as the model name: ``open_clip:local-dir:/path/to/dir`` (a folder holding
  ``open_clip_config.json`` and the weights, e.g. a downloaded ``hf-hub`` repo, fully offline) and
  ``open_clip:hf-hub:org/repo``; ``vision_pretrained`` is ignored with a schema.

Each adapter exposes ``mean`` / ``std`` (the normalisation its weights were trained with: timm's
``pretrained_cfg``, open_clip's preprocess config), for the data transforms.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import CATConfig

__all__ = ["TimmEncoder", "OpenCLIPVisualEncoder", "build_adapter", "freeze_layer_groups", "layer_decay_scales"]

_WEIGHT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz"}
_HUB = {"hub", "true", "default"}


def build_adapter(spec: str, cat_cfg: CATConfig, pretrained: str | None = None) -> nn.Module:
    """``"timm:<model name>"`` -> :class:`TimmEncoder`; ``"open_clip:<model name>"`` -> :class:`OpenCLIPVisualEncoder`
    (or a :class:`TimmEncoder` over the tower's trunk when the open_clip tower is a timm model)."""
    prefix, _, name = spec.partition(":")
    if not name or prefix not in ("timm", "open_clip"):
        raise ValueError(f"vision_backend {spec!r}: expected 'cat', 'timm:<model name>' or 'open_clip:<model name>'")
    if prefix == "timm":
        return TimmEncoder.create(
            name,
            img_size=cat_cfg.img_size,
            pretrained=pretrained,
            in_chans=cat_cfg.in_chans,
            drop_path_rate=cat_cfg.drop_path_rate,
            grad_checkpointing=cat_cfg.grad_checkpointing,
        )
    return OpenCLIPVisualEncoder.create(
        name, img_size=cat_cfg.img_size, pretrained=pretrained, grad_checkpointing=cat_cfg.grad_checkpointing
    )


def _is_path(s: str) -> bool:
    return "/" in s or "\\" in s or Path(s).suffix.lower() in _WEIGHT_SUFFIXES or Path(s).exists()


def _check_file(what: str, path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: pretrained weight file {path!r} does not exist")
    return str(path)


def _unknown_name(what: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else ""
    return ValueError(f"{what}: unknown model name {name!r}{hint}")


class _StageEncoder(nn.Module):
    """What the adapters share: stage resolution, grid sizes, layer groups, the helpers of the encoder contract.

    Subclasses set ``self.model``, ``stage_dims``, ``mean``/``std`` and implement ``_run(x, indices)`` ->
    list of (B, C_i, h_i, w_i) maps for the sorted absolute ``indices``, and ``_stage_module_names()``.
    """

    model: nn.Module
    stage_dims: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fixed_size: tuple[int, int] | None = None  # an encoder that only takes one input size (ViT position table)

    def __init__(self) -> None:
        super().__init__()
        self._grid_cache: dict[tuple[int, int], list[tuple[int, int]]] = {}

    # ---- description -------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stage_dims)

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    @property
    def layers(self) -> list[nn.Module] | None:
        """One module per stage (not registered twice: a property), so MMXAttn can freeze the stages after the
        last one it reads."""
        try:
            return [self.get_submodule(n) for n in self._stage_module_names()]
        except AttributeError:
            return None

    def _stage_module_names(self) -> list[str]:
        raise NotImplementedError

    def _run(self, x: Tensor, indices: list[int]) -> list[Tensor]:
        raise NotImplementedError

    def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid ``(h_i, w_i)`` of every stage for a ``height x width`` image (found once per size by a
        no-grad forward of one blank image in eval mode; training state and BatchNorm statistics are untouched)."""
        key = (int(height), int(width))
        if key not in self._grid_cache:
            p = next(self.parameters())
            modes = {m: m.training for m in self.modules()}
            self.eval()
            try:
                with torch.no_grad():
                    x = torch.zeros(1, self.in_chans, *key, device=p.device, dtype=p.dtype)
                    maps = self._run(x, list(range(self.num_stages)))
            finally:
                for m, mode in modes.items():
                    m.training = mode
            self._grid_cache[key] = [(int(f.shape[-2]), int(f.shape[-1])) for f in maps]
        return list(self._grid_cache[key])

    # ---- forward -----------------------------------------------------------------------------------------
    def _resolve_stages(self, stages: Iterable[int] | None) -> list[int]:
        n, name = self.num_stages, type(self).__name__
        if stages is None:
            return list(range(n))
        wanted = [int(s) for s in stages]
        if not wanted or any(not -n <= s < n for s in wanted):
            raise ValueError(f"{name}: stages must be indices in [-{n}, {n}), got {wanted}")
        resolved = [s % n for s in wanted]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"{name}: stages {wanted} name a stage twice")
        return resolved

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected images of shape (B, {self.in_chans}, H, W), got {shape}")
        if self.fixed_size is not None and tuple(x.shape[2:]) != self.fixed_size:
            raise ValueError(
                f"{name}: this encoder takes {self.fixed_size[0]}x{self.fixed_size[1]} images (its position "
                f"embedding's size, set by vision.img_size), got {x.shape[2]}x{x.shape[3]}"
            )

    def forward_features(self, x: Tensor, stages: Iterable[int] | None = None) -> list[Tensor]:
        """Patch tokens of each requested stage (default: all), ``(B, h_i * w_i, C_i)`` row-major, in the order
        requested. Stops after the last requested stage."""
        self._check_input(x)
        wanted = self._resolve_stages(stages)
        order = sorted(wanted)
        maps = self._run(x, order)  # (B, C_i, h_i, w_i) in block order
        if len(maps) != len(order):
            raise RuntimeError(f"{type(self).__name__}: asked the encoder for {len(order)} stages, got {len(maps)}")
        by_index = dict(zip(order, maps))
        return [by_index[i].flatten(2).transpose(1, 2) for i in wanted]  # (B, h*w, C), row-major

    def forward(self, x: Tensor) -> Tensor:
        """Mean of the last stage's tokens, ``(B, C)`` (there is no classifier head)."""
        return self.forward_features(x, stages=[-1])[0].mean(dim=1)

    # ---- training helpers --------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (position / class embeddings; 1-D params are skipped anyway)."""
        fn = getattr(self.model, "no_weight_decay", None)
        names = set(fn()) if callable(fn) else set()
        own = {n for n, _ in self.named_parameters()}
        return {f"model.{n}" for n in names} & own

    def layer_groups(self) -> list[list[str]]:
        """Parameter names (as in ``named_parameters()``) in groups ordered from input to output: ``groups[0]``
        is everything before the first block (stem, patch embedding, class / position embeddings), then one group
        per block in forward order; parameters after the last block (the final norm) join the last group.
        Every parameter, trainable or not, is in exactly one group. For layer-wise LR decay (group ``i`` gets
        ``decay ** (len(groups) - 1 - i)``) and for freezing all but the last ``n`` groups."""
        return _groups_by_stage(list(self.named_parameters()), [f"{n}." for n in self._stage_module_names()])


def _groups_by_stage(named: list[tuple[str, Any]], stage_prefixes: list[str]) -> list[list[str]]:
    """Group parameter names by the stage module that holds them; those outside every stage go to the stem if
    they come (in registration order) before the first stage parameter, else to the last group."""
    stem: list[str] = []
    stages: list[list[str]] = [[] for _ in stage_prefixes]
    tail: list[str] = []
    seen_stage = False
    for name, _ in named:
        hit = next((i for i, p in enumerate(stage_prefixes) if name.startswith(p)), None)
        if hit is not None:
            stages[hit].append(name)
            seen_stage = True
        else:
            (tail if seen_stage else stem).append(name)
    groups = [stem] + [g for g in stages if g]
    groups[-1] = groups[-1] + tail
    return [g for g in groups if g]


def _merge_outside(groups: list[list[str]], inside: Any) -> list[list[str]]:
    """Leading groups with no block parameters become one stem group, trailing ones join the last block group."""
    idx = [i for i, g in enumerate(groups) if any(inside(n) for n in g)]
    if not idx:
        return [[n for g in groups for n in g]]
    first, last = idx[0], idx[-1]
    out = [[n for g in groups[:first] for n in g]] + groups[first:last]
    out.append(groups[last] + [n for g in groups[last + 1 :] for n in g])
    return [g for g in out if g]


def freeze_layer_groups(encoder: nn.Module, trainable_last: int) -> None:
    """Freeze every parameter of ``encoder`` except those of its last ``trainable_last`` layer groups (0 freezes
    all). Only ever freezes: parameters already frozen stay frozen."""
    groups = encoder.layer_groups()
    if trainable_last < 0:
        raise ValueError(f"trainable_last must be >= 0, got {trainable_last}")
    params = dict(encoder.named_parameters())
    for group in groups[: max(len(groups) - trainable_last, 0)]:
        for name in group:
            params[name].requires_grad_(False)


def layer_decay_scales(encoder: nn.Module, decay: float, prefix: str = "") -> dict[str, float]:
    """Learning-rate multiplier of every encoder parameter for layer-wise LR decay (BEiT, Bao et al. 2021): the
    last group gets 1, each group before it ``decay`` times the next. Names get ``prefix`` (e.g. ``"visual."``)."""
    groups = encoder.layer_groups()
    return {prefix + n: decay ** (len(groups) - 1 - i) for i, g in enumerate(groups) for n in g}


# ---------------------------------------------------------------------------------------------------- timm
class TimmEncoder(_StageEncoder):
    """A timm model (any with ``forward_intermediates``: ResNet, ConvNeXt, Swin, EfficientNet, ViT, EVA, ...)
    as a stage encoder. Its classifier head is removed; its state-dict keys are timm's under ``model.``."""

    def __init__(self, model: nn.Module, mean: Iterable[float] | None = None, std: Iterable[float] | None = None):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise ValueError(f"TimmEncoder: {type(model).__name__} has no forward_intermediates/feature_info")
        self.model = model
        info = list(model.feature_info)
        self.stage_dims = tuple(int(f["num_chs"]) for f in info)
        self._stage_names = [str(f["module"]) for f in info]
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
        pe = getattr(model, "patch_embed", None)
        self.in_chans = _in_chans(model)
        if pe is not None and getattr(pe, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False):
            self.fixed_size = tuple(int(s) for s in pe.img_size)
        # Drop the classifier (and pooling norms) that stage tokens never reach; keep the final token norm.
        if hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers(len(info), prune_norm=False, prune_head=True)

    @classmethod
    def create(
        cls,
        name: str,
        img_size: int | None = None,
        pretrained: str | None = None,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> TimmEncoder:
        """``timm.create_model(name, num_classes=0, ...)`` with ``img_size`` / ``drop_path_rate`` where the model
        takes them, weights from ``pretrained`` (see the module docstring)."""
        import timm

        if not timm.is_model(name):
            raise _unknown_name("TimmEncoder", name, timm.list_models())
        file = None
        hub = False
        if pretrained:
            if _is_path(str(pretrained)):
                file = _check_file(f"TimmEncoder({name})", str(pretrained))
            elif str(pretrained).lower() in _HUB:
                hub = True
            else:  # a pretrained tag, e.g. "augreg_in21k"
                if "." in name:
                    raise ValueError(f"TimmEncoder: model {name!r} already names a pretrained tag; got {pretrained!r}")
                name, hub = f"{name}.{pretrained}", True
        kwargs: dict[str, Any] = dict(num_classes=0, in_chans=in_chans)
        optional = {"img_size": img_size, "drop_path_rate": drop_path_rate}
        model = _create_timm(name, hub, kwargs, {k: v for k, v in optional.items() if v is not None})
        if file is not None:
            _load_timm_file(model, file, name)
        enc = cls(model)
        enc.set_grad_checkpointing(grad_checkpointing)
        return enc

    def _stage_module_names(self) -> list[str]:
        return [f"model.{n}" for n in self._stage_names]

    @property
    def norm(self) -> nn.Module | None:
        """The model's final token LayerNorm (ViT, Swin, EVA ...), applied by MMXAttn to the last stage; None for
        models whose final norm acts on pooled features (ConvNeXt) or that have none (ResNet)."""
        m = getattr(self.model, "norm", None)
        shape = getattr(m, "normalized_shape", None)
        if m is None or type(m).__name__.endswith("2d") or tuple(shape or ()) != (self.stage_dims[-1],):
            return None
        return m

    def _run(self, x: Tensor, indices: list[int]) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )

    def layer_groups(self) -> list[list[str]]:
        matcher = getattr(self.model, "group_matcher", None)
        if not callable(matcher):
            return super().layer_groups()
        from timm.models import group_parameters

        # timm's own block-level grouping (the one its layer-decay optimiser uses), made to fit the contract
        raw = group_parameters(self.model, matcher(coarse=False))
        groups = [[f"model.{n}" for n in raw[k]] for k in sorted(raw)]
        prefixes = tuple(f"{n}." for n in self._stage_module_names())
        return _merge_outside(groups, lambda n: n.startswith(prefixes))


def _in_chans(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, str):
        try:
            return int(model.get_submodule(first).in_channels)
        except AttributeError:
            pass
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3


def _create_timm(name: str, pretrained: bool, kwargs: dict, optional: dict) -> nn.Module:
    """``timm.create_model``, dropping the ``optional`` keywords a model's constructor does not take."""
    import timm

    optional = dict(optional)
    while True:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs, **optional)
        except TypeError as e:
            bad = next((k for k in optional if f"'{k}'" in str(e)), None)
            if bad is None:
                raise
            del optional[bad]


def _load_timm_file(model: nn.Module, path: str, name: str) -> None:
    """Load a timm-format state dict from a local file, strictly apart from the classifier; the model family's
    ``checkpoint_filter_fn`` (timm's own, as used for hub weights) resamples position embeddings to this
    ``img_size`` and converts original-release layouts."""
    from timm.models import load_state_dict

    sd = load_state_dict(path, weights_only=True)  # safetensors, or torch.load(weights_only=True); unwraps EMA/DDP
    if sd and all(k.startswith("model.") for k in sd):  # saved from a TimmEncoder
        sd = {k[len("model.") :]: v for k, v in sd.items()}
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filt):
        sd = filt(sd, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(c + ".") for c in classifier)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: model {tuple(own[k].shape)}, file {tuple(sd[k].shape)}"
        for k in own
        if k in sd and own[k].shape != sd[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing {missing[:5]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected {unexpected[:5]}"] if unexpected else []
        parts += [f"{len(shapes)} with other shapes {shapes[:3]}"] if shapes else []
        raise ValueError(f"TimmEncoder({name}): weights in {path} do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------------- open_clip
class OpenCLIPVisualEncoder(_StageEncoder):
    """An open_clip ``VisionTransformer`` tower (the ViT-* CLIP models): one stage per transformer block, the
    patch tokens of each (class token dropped) on the patch grid. The projection and attentional pooler, which
    patch tokens never reach, are removed; patch dropout is disabled (it would break the token grid).
    ``ln_post`` is exposed as ``norm`` when it normalises every token (the usual CLIP layout)."""

    def __init__(self, tower: nn.Module, mean: Iterable[float], std: Iterable[float]) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(tower, VisionTransformer):
            raise ValueError(
                f"OpenCLIPVisualEncoder: expected an open_clip VisionTransformer, got {type(tower).__name__}"
            )
        width = tower.conv1.out_channels
        n = len(tower.transformer.resblocks)
        token_norm = tower.attn_pool is None and not tower.final_ln_after_pool
        tower.prune_intermediate_layers(n, prune_norm=not token_norm, prune_head=True)  # proj -> None
        if tower.attn_pool is not None:
            tower.attn_pool = tower.attn_pool_contrastive = None
        tower.patch_dropout = nn.Identity()
        self.model = tower
        self.stage_dims = (int(width),) * n
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = int(tower.conv1.in_channels)
        self.patch = tuple(int(p) for p in tower.patch_size)
        self.fixed_size = tuple(int(s) for s in tower.image_size)

    @classmethod
    def create(
        cls, name: str, img_size: int | None = None, pretrained: str | None = None, grad_checkpointing: bool = False
    ) -> nn.Module:
        """``open_clip.create_model(name, pretrained, force_image_size=img_size).visual`` behind the encoder
        interface (a :class:`TimmEncoder` when the tower is a timm trunk, e.g. SigLIP / ConvNeXt CLIP models)."""
        import open_clip
        from open_clip.timm_model import TimmModel

        schema = name.startswith(("hf-hub:", "local-dir:"))
        if not schema and name.replace("/", "-") not in open_clip.list_models():
            raise _unknown_name("OpenCLIPVisualEncoder", name, open_clip.list_models())
        if schema:
            pretrained = None  # the schema names the weights
        elif pretrained:
            if _is_path(str(pretrained)):
                pretrained = _check_file(f"OpenCLIPVisualEncoder({name})", str(pretrained))
            else:
                tags = open_clip.list_pretrained_tags_by_model(name)
                if pretrained not in tags:
                    raise ValueError(
                        f"OpenCLIPVisualEncoder: {pretrained!r} is neither a local file nor a pretrained tag of "
                        f"{name!r} (tags: {tags})"
                    )
        clip = open_clip.create_model(name, pretrained=pretrained or None, force_image_size=img_size)
        tower = clip.visual
        cfg = getattr(tower, "preprocess_cfg", {}) or {}
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        if isinstance(tower, TimmModel):
            enc: _StageEncoder = TimmEncoder(tower.trunk, mean=mean, std=std)
        else:
            enc = cls(tower, mean, std)
        enc.set_grad_checkpointing(grad_checkpointing)
        return enc

    def _stage_module_names(self) -> list[str]:
        return [f"model.transformer.resblocks.{i}" for i in range(self.num_stages)]

    @property
    def norm(self) -> nn.Module | None:
        m = self.model.ln_post
        return None if isinstance(m, nn.Identity) else m

    def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(height // self.patch[0], width // self.patch[1])] * self.num_stages

    def _run(self, x: Tensor, indices: list[int]) -> list[Tensor]:
        out = self.model.forward_intermediates(
            x, indices=indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        return out["image_intermediates"]
