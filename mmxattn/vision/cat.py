"""CAT: Cross Attention in Vision Transformer (Lin et al. 2021, arXiv 2106.05786), the project's image encoder.

A hierarchical transformer: a 4x4 patch stem, then stages of Cross Attention Blocks (CAB = IPSA -> CPSA -> IPSA)
separated by patch merging. IPSA is multi-head attention inside p x p windows with a Swin relative position bias;
CPSA treats each p x p window of ONE channel as a token of dimension p*p and attends across windows (one head,
shared by all channels). Module and parameter names reproduce the official state-dict keys, so official
checkpoints load with ``strict=True`` (see :meth:`CATEncoder.load_pretrained`).

Any input size works, with the official dense-prediction rules: the image is padded to a multiple of the stem
patch, ``ape`` is resized bicubically when the stem grid differs from ``img_size``'s, LayerNorm outputs are
zero-padded to a multiple of the window before windowing (cropped after), odd grids are padded before merging. A
stage's window is fixed when the model is built (the official rule: ``p_i = min(window, grid_i)`` on the
``img_size`` grid, so the weights have the official shapes); at run time a stage grid smaller than its window is
padded up to one window. The smallest accepted image gives a stem grid of at least one stage-0 window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attention import Attention
from ..config import CATConfig
from .windows import (
    FastLinear,
    KeyMap,
    Mlp,
    WindowGrid,
    apply_key_map,
    read_state_dict,
    relative_position_index,
    stage_grid_sizes,
)

__all__ = [
    "CATEncoder",
    "CATStage",
    "CPSABlock",
    "IPSABlock",
    "PatchEmbed",
    "PatchMerging",
    "WindowAttention",
    "set_inference_chunk_tokens",
]


class PatchEmbed(nn.Module):
    """Stem: ``proj`` -> LayerNorm. Pads the image right/bottom to a multiple of the patch.

    ``stem="patch"`` (official): ``proj`` is one Conv2d with kernel = stride = patch.
    ``stem="conv"`` (ours, opt-in; no preset uses it, configs/shapes.yaml does): a convolutional stem after Xiao et
    al. 2021 ("Early convolutions help transformers see better"): log2(patch) 3x3 stride-2 convs (widths C/2^k ... C),
    one 3x3 stride-1 conv, each followed by ReLU, then a 1x1 conv. Its receptive field (15 px at patch 4) spans a small
    object, which the 4x4 patchify stem does not; see :func:`conv_stem` and ``benchmarks/shape_learnability.py``.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stem: str = "patch") -> None:
        super().__init__()
        self.patch_size = patch_size
        if stem == "conv":
            self.proj = conv_stem(patch_size, in_chans, embed_dim)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, h, w, C)
        ps = self.patch_size
        pad_h, pad_w = -x.shape[2] % ps, -x.shape[3] % ps
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)  # (B, C, h, w)
        B, C, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).view(B, h, w, C)


def conv_stem(patch_size: int, in_chans: int, embed_dim: int) -> nn.Sequential:
    """The ``stem="conv"`` projection: (B, in_chans, H, W) -> (B, embed_dim, H/patch, W/patch), H a multiple of
    the patch (a power of two). Widths double up to ``embed_dim``; no normalisation inside (the stem's LayerNorm
    follows), so it behaves the same in training and evaluation and under any batch split."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"conv_stem: patch_size must be a power of two >= 2, got {patch_size}")
    widths = [max(8, embed_dim // 2 ** (n - 1 - k)) for k in range(n)]  # ..., C/2, C
    layers: list[nn.Module] = []
    cin = in_chans
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        cin = w
    layers += [nn.Conv2d(cin, embed_dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(embed_dim, embed_dim, 1)]
    return nn.Sequential(*layers)


class WindowAttention(Attention):
    """IPSA's attention: :class:`Attention` plus Swin's relative position bias ``(nh, p*p, p*p)``.

    The bias is gathered from the table once per call while it can receive gradients, and cached otherwise
    (eval / no-grad), keyed on the table's storage and version so loading or optimiser steps invalidate it.
    """

    def __init__(self, dim: int, num_heads: int, window: int, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        _fast_projections(self)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=True)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._bias: Tensor | None = None
        self._bias_key: tuple | None = None
        self._bias_source: tuple[Tensor, Tensor] | None = None  # what _bias was gathered from, held

    def _gather_bias(self) -> Tensor:
        N = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, nh)
        return bias.view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)  # (1, nh, N, N)

    def relative_position_bias(self) -> Tensor:
        table, index = self.relative_position_bias_table, self.relative_position_index
        # Under torch.compile the gather is part of the graph (cheap, fused); the Python-side cache would be guarded
        # on: its key changes between calls, so every call recompiled (22 s per CAT-T call until dynamo gave up).
        # A model built under torch.inference_mode() has inference tensors, which carry no version counter: no cache.
        # While a CUDA graph is captured the gather is recorded in it: a cached bias would be read at its address on
        # every replay, stale after an in-place weight load (which keeps the graph) and freed once the cache moves on.
        if (
            (torch.is_grad_enabled() and table.requires_grad)
            or torch.compiler.is_compiling()
            or table.is_inference()
            or index.is_inference()
            or (table.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return self._gather_bias()
        key = (table.data_ptr(), table._version, table.dtype, table.device, index.data_ptr(), index._version)
        if key != self._bias_key:  # the storages are held: their addresses cannot be reused (see windows.py)
            self._bias, self._bias_key = self._gather_bias(), key
            self._bias_source = (table.detach(), index)
        return self._bias

    def forward(self, x: Tensor) -> Tensor:  # (B*nW, N, C) -> (B*nW, N, C)
        return super().forward(x, attn_bias=self.relative_position_bias())


# Inference at high resolution (no autograd, eval mode): a block's attention and MLP run over slices of at most
# this many tokens (IPSA: whole windows; CPSA: whole (image, channel) rows; MLP: tokens), adding into the stream in
# place, so the large intermediates (qkv, the MLP's 4x hidden layer) exist one slice at a time. The result is the
# same computation; only streams longer than this are sliced (CAT-T at 224 px never is; at 896 px its first two
# stages are). A stream wider than 64 channels slices proportionally fewer tokens (the same bytes a slice): at 896
# px batch 1 that took CAT-T's peak from 84 to 72 MB at the same speed (twenty-fifth session).
# CPU only: on a GPU each slice is a round of small kernel launches (on an H200 CAT-T's bf16 eval forward at batch
# 32 took longer than its training step while it sliced), and GPU memory is the caching allocator's to reuse.
_INFER_CHUNK_TOKENS = 8192


def set_inference_chunk_tokens(n: int) -> int:
    """Set the slice size (tokens; of a 64-channel stream, fewer for wider ones) of memory-saving no-grad inference
    on the CPU; streams of more tokens are sliced; 0 turns slicing off. Returns the old value."""
    global _INFER_CHUNK_TOKENS
    if n < 0:
        raise ValueError(f"inference chunk size must be >= 0 tokens, got {n}")
    old, _INFER_CHUNK_TOKENS = _INFER_CHUNK_TOKENS, int(n)
    return old


def _sliced(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` (a block on a ``(B, L, C)`` stream or patch merging on a ``(B, H, W, C)`` grid) runs
    sliced: CPU no-grad inference on more than ``_INFER_CHUNK_TOKENS`` tokens, and no attention being recorded."""
    attn = getattr(module, "attn", None)
    return (
        0 < _INFER_CHUNK_TOKENS < x[..., 0].numel()
        and x.device.type == "cpu"
        and not module.training
        and not torch.is_grad_enabled()
        and (attn is None or attn._recorder is None)  # capture_attention records one map per call: never slice then
    )


def _even_step(total: int, step: int) -> int:
    """A slice size for ``total`` items of at most ``step``: the largest divisor of ``total`` from ``step // 2`` up,
    so that every slice has one shape (oneDNN compiles and keeps kernels per shape: a remainder slice costs a second
    set, ~0.6 MB per linear layer), else ``step``."""
    if step >= total:
        return total
    for d in range(step, max(1, step // 2) - 1, -1):
        if total % d == 0:
            return d
    return step


class _PreNormBlock(nn.Module):
    """``x = x + DropPath(mix(LN1(x)))``, ``x = x + DropPath(MLP(LN2(x)))`` on a stream in window order.

    ``x`` is ``(B, nW * N, C)``; subclasses define ``mix`` (the attention with its window reshapes) and
    ``add_mix_sliced`` (the same added into ``x``, a slice at a time, for no-grad inference on long streams).
    """

    def __init__(self, dim: int, attn: Attention, mlp_ratio: float, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def mix(self, y: Tensor, grid: WindowGrid) -> Tensor:
        raise NotImplementedError

    def add_mix_sliced(self, x: Tensor, grid: WindowGrid, valid: Tensor | None, rows: int) -> None:
        """``x += mix(LN1(x))`` (padding tokens of LN1's output zeroed) in place, a slice of about ``rows`` tokens
        at a time, LN1 included (no-grad inference only)."""
        raise NotImplementedError

    def forward(self, x: Tensor, grid: WindowGrid, valid: Tensor | None = None) -> Tensor:
        if _sliced(self, x):
            # the same bytes a slice whatever the width: wider stages slice fewer tokens
            return self._forward_sliced(x, grid, valid, max(1, _INFER_CHUNK_TOKENS * 64 // max(64, x.shape[-1])))
        y = self.norm1(x)
        if valid is not None:
            y = y.masked_fill(~valid, 0.0)  # the official model zero-pads the LN1 output, not the stream
        x = _residual_add(x, self.mix(y, grid))
        return _residual_add(x, self.drop_path(self.mlp.forward_normed(x, self.norm2)))

    def _forward_sliced(self, x: Tensor, grid: WindowGrid, valid: Tensor | None, rows: int) -> Tensor:
        # Eval, no autograd: dropout and drop-path are identities and x is this stage's own stream (CATStage),
        # so both residual branches add into it in place, and LN1 is applied a slice at a time too: nothing but
        # the stream is held at full size.
        self.add_mix_sliced(x, grid, valid, rows)
        flat = x.view(-1, x.shape[-1])
        for part in flat.split(_even_step(flat.shape[0], rows)):  # views of x
            part.add_(self.mlp(self.norm2(part)))
        return x


class IPSABlock(_PreNormBlock):
    """Inner-patch self-attention: multi-head attention among the p*p tokens of each window."""

    def __init__(self, dim: int, num_heads: int, window: int, *, qkv_bias: bool, attn_drop: float, **kw) -> None:
        attn = WindowAttention(
            dim, num_heads, window, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=kw.get("drop", 0.0)
        )
        super().__init__(dim, attn, **kw)

    def mix(self, y: Tensor, grid: WindowGrid) -> Tensor:
        B, L, C = y.shape
        y = self.attn(y.view(B * grid.num_windows, grid.tokens, C))  # (B*nW, N, C), windows are contiguous
        return self.drop_path(y.view(B, L, C))

    def add_mix_sliced(self, x: Tensor, grid: WindowGrid, valid: Tensor | None, rows: int) -> None:
        B, L, C = x.shape
        nW, N = grid.num_windows, grid.tokens
        xw = x.view(B * nW, N, C)
        # window j of the batch is window j % nW of its image; LN1 works per token, so a slice of whole windows
        # needs only its own tokens, and adding into them leaves every later slice's tokens as they were
        vw = None if valid is None else valid.view(nW, N, 1).repeat(B, 1, 1)
        step = _even_step(B * nW, max(1, rows // N))  # whole windows per slice
        for i in range(0, B * nW, step):
            y = self.norm1(xw[i : i + step])
            if vw is not None:
                y.masked_fill_(~vw[i : i + step], 0.0)
            xw[i : i + step].add_(self.attn(y))


class CPSABlock(_PreNormBlock):
    """Cross-patch self-attention: per (image, channel), one token per window with the window's p*p values as
    features; one head of width p*p shared by all channels, no position bias."""

    def __init__(self, dim: int, window: int, *, qkv_bias: bool, attn_drop: float, **kw) -> None:
        n = window * window
        attn = Attention(n, num_heads=1, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=kw.get("drop", 0.0))
        super().__init__(dim, _fast_projections(attn), **kw)

    def mix(self, y: Tensor, grid: WindowGrid) -> Tensor:
        B, L, C = y.shape
        nW, N = grid.num_windows, grid.tokens
        y = y.view(B, nW, N, C).permute(0, 3, 1, 2).reshape(B * C, nW, N)  # one copy: (B*C, nW, N)
        y = self.drop_path(self.attn(y).view(B, C, nW, N))  # per-image drop-path works in this layout too
        return y.permute(0, 2, 3, 1)  # (B, nW, N, C) view in window order; the residual add does the copy

    def add_mix_sliced(self, x: Tensor, grid: WindowGrid, valid: Tensor | None, rows: int) -> None:
        B, L, C = x.shape
        nW, N = grid.num_windows, grid.tokens
        # CPSA slices channels, and LN1 normalises over channels: its statistics come first, from the whole stream
        # (two numbers a token), then each slice normalises its own channels. Adding into a slice's channels
        # leaves the others' inputs as they were, so no full-size LN1 output is needed.
        # Statistics in fp32 at least, a slice of tokens at a time, by LayerNorm's own kernel (unit affine; its
        # output slice is dropped): the mean and 1/std F.layer_norm itself would use
        dt = torch.promote_types(x.dtype, torch.float32)
        mean_l, rstd_l = [], []
        for t in x.view(-1, C).split(_even_step(B * L, rows)):
            _, m, r = torch.native_layer_norm(t.to(dt), (C,), None, None, self.norm1.eps)
            mean_l.append(m)
            rstd_l.append(r)
        mean = torch.cat(mean_l).view(B, nW, N, 1)
        rstd = torch.cat(rstd_l).view(B, nW, N, 1)
        del mean_l, rstd_l
        w, bias = self.norm1.weight, self.norm1.bias
        keep = None if valid is None else valid.view(nW, N)
        xv = x.view(B, nW, N, C)
        # whole channels of one image (about rows*C values): CPSA spans all windows
        step = _even_step(C, max(1, rows * C // L))
        for b in range(B):
            for c in range(0, C, step):
                # normalised in token order (nW, N, channels), then one copy into the attention's (channels, nW, N)
                y = (xv[b, :, :, c : c + step] - mean[b]).mul_(rstd[b])
                if w is not None:
                    y.mul_(w[c : c + step])
                if bias is not None:
                    y.add_(bias[c : c + step])
                part = y.permute(2, 0, 1).contiguous()
                del y
                if keep is not None:
                    part.masked_fill_(~keep, 0.0)
                xv[b, :, :, c : c + step].add_(self.attn(part.to(x.dtype)).permute(1, 2, 0))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> channels (official order) -> LayerNorm(4C) -> Linear(4C, 2C). Odd grids are padded."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = FastLinear(4 * dim, 2 * dim, bias=False)  # registered first: the official key order
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        if _sliced(self, x):  # bands of output rows: the 4C-wide concatenation and its LayerNorm a band at a time
            B, H2, W2 = x.shape[0], x.shape[1] // 2, x.shape[2] // 2
            out = x.new_empty(B, H2, W2, self.reduction.out_features)
            band = _even_step(H2, max(1, _INFER_CHUNK_TOKENS // (B * W2)))
            for r in range(0, H2, band):
                out[:, r : r + band] = self._merge(x[:, 2 * r : 2 * (r + band)])
            return out
        return self._merge(x)

    def _merge(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class CATStage(nn.Module):
    """``depth`` CABs (IPSA -> CPSA -> IPSA) at one resolution, then (except the last stage) patch merging.

    :meth:`forward` returns the stage's tokens before merging; the encoder calls :attr:`downsample` itself.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        drop_path: list[float],
        downsample: bool,
        *,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
    ) -> None:
        super().__init__()
        self.window = window
        self.grad_checkpointing = False
        kw = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop)
        # One drop-path rate per CAB, shared by its three blocks (official).
        self.pre_ipsa_blocks = nn.ModuleList(IPSABlock(dim, num_heads, window, drop_path=r, **kw) for r in drop_path)
        self.cpsa_blocks = nn.ModuleList(CPSABlock(dim, window, drop_path=r, **kw) for r in drop_path)
        self.post_ipsa_blocks = nn.ModuleList(IPSABlock(dim, num_heads, window, drop_path=r, **kw) for r in drop_path)
        self.downsample = PatchMerging(dim) if downsample else None

    def _run(self, block: nn.Module, x: Tensor, grid: WindowGrid, valid: Tensor | None) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, grid, valid, use_reentrant=False)
        return block(x, grid, valid)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C)
        grid = WindowGrid(x.shape[1], x.shape[2], self.window)
        stream = grid.partition(x)  # (B, nW*N, C) for the whole stage
        # inference adds in place: never into the caller's tensor. Under torch.compile always copy (the compiler
        # removes needless copies; a data-pointer comparison would break the graph there)
        if not torch.is_grad_enabled() and (torch.compiler.is_compiling() or stream.data_ptr() == x.data_ptr()):
            stream = stream.clone()
        return self._run_stream(stream, grid)

    def forward_owned(self, box: list[Tensor]) -> Tensor:
        """``forward(box.pop())`` for a caller that hands over its only reference to the input (no-grad
        inference): the input is freed once partitioned, or, when the partition is a view of it, the stream adds
        into it in place. :meth:`CATEncoder.forward_features` uses it so that a high-resolution stage does not hold
        its input beside its stream; hooks on the stage are not called (it uses ``forward`` when a stage has any)."""
        x = box.pop()
        grid = WindowGrid(x.shape[1], x.shape[2], self.window)
        stream = grid.partition(x)
        del x
        return self._run_stream(stream, grid)

    def _run_stream(self, x: Tensor, grid: WindowGrid) -> Tensor:
        valid = grid.valid(x.device)
        for pre, cpsa, post in zip(self.pre_ipsa_blocks, self.cpsa_blocks, self.post_ipsa_blocks):
            for block in (pre, cpsa, post):
                x = self._run(block, x, grid, valid)
        return grid.reverse(x)


class CATEncoder(nn.Module):
    """The CAT image encoder with an optional classification head (LayerNorm -> mean over tokens -> Linear).

    ``forward_features(x)`` gives each stage's tokens ``(B, h_i * w_i, C_i)`` (row-major over the grid of
    :meth:`grid_sizes`), ``forward(x)`` the logits (``num_classes > 0``) or the pooled last-stage features.
    """

    # The normalisation the official ImageNet weights were trained with (the data transforms read it).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __init__(self, cfg: CATConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.patch_grid = cfg.img_size // cfg.patch_size  # ape grid side (img_size is a multiple of the patch)
        # Official rule, applied on the img_size grid: a stage no larger than the window uses its whole grid.
        sizes = stage_grid_sizes(cfg.img_size, cfg.img_size, cfg.patch_size, cfg.num_stages)
        self.windows = tuple(min(cfg.window, h, w) for h, w in sizes)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, C, cfg.stem)
        if cfg.ape:
            self.ape = nn.Parameter(torch.zeros(1, self.patch_grid**2, C))  # (1, L, C)
            trunc_normal_(self.ape, std=0.02)
        else:
            self.register_parameter("ape", None)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()  # one per CAB
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            start = sum(cfg.depths[:i])
            stage = CATStage(
                cfg.stage_dims[i],
                depth,
                heads,
                self.windows[i],
                rates[start : start + depth],
                downsample=i < cfg.num_stages - 1,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate,
            )
            self.layers.append(stage)
        self.norm = nn.LayerNorm(self.stage_dims[-1])
        self.head = FastLinear(self.stage_dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        for i in cfg.checkpoint_stages:
            self.layers[i].grad_checkpointing = True

    # ---- description -------------------------------------------------------------------------------------
    @property
    def stage_dims(self) -> tuple[int, ...]:
        return self.cfg.stage_dims

    @property
    def num_stages(self) -> int:
        return self.cfg.num_stages

    @property
    def num_features(self) -> int:  # width of the pooled features (timm's name)
        return self.stage_dims[-1]

    def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid ``(h_i, w_i)`` of every stage for a ``height x width`` image."""
        return stage_grid_sizes(height, width, self.cfg.patch_size, self.num_stages)

    def min_input_size(self) -> int:
        """Smallest accepted height/width in pixels: a stem grid of at least one stage-0 window."""
        return self.cfg.patch_size * (self.windows[0] - 1) + 1

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (the optimiser also skips every 1-D parameter)."""
        names = {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return names | ({"ape"} if self.ape is not None else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block of every stage in the backward pass (non-reentrant) to save activation memory;
        ``False`` turns it off in every stage, ``cfg.checkpoint_stages`` included."""
        for stage in self.layers:
            stage.grad_checkpointing = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether every stage recomputes its blocks in backward."""
        return all(stage.grad_checkpointing for stage in self.layers)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names (as in ``named_parameters()``) grouped from input to output, for layer-wise LR decay
        and partial freezing (:func:`~mmxattn.vision.adapters.layer_decay_scales`, ``freeze_layer_groups``).

        ``groups[0]`` is the stem (``patch_embed.*``, ``ape``), then one group per CAB (its IPSA, CPSA and IPSA
        blocks) in forward order; a stage's patch merging joins the group of that stage's last CAB, and the final
        ``norm`` / ``head`` join the last group. Every parameter is in exactly one group.
        """
        starts = [1 + sum(self.cfg.depths[:s]) for s in range(self.num_stages)]  # group of each stage's first CAB
        n_groups = 1 + sum(self.cfg.depths)
        groups: list[list[str]] = [[] for _ in range(n_groups)]
        block = re.compile(r"layers\.(\d+)\.(?:pre_ipsa|cpsa|post_ipsa)_blocks\.(\d+)\.")
        merge = re.compile(r"layers\.(\d+)\.downsample\.")
        for name, _ in self.named_parameters():
            if name == "ape" or name.startswith("patch_embed."):
                g = 0
            elif m := block.match(name):
                g = starts[int(m[1])] + int(m[2])
            elif m := merge.match(name):
                g = starts[int(m[1])] + self.cfg.depths[int(m[1])] - 1
            elif name.startswith(("norm.", "head.")):
                g = n_groups - 1
            else:  # a parameter this grouping does not know would silently escape decay and freezing
                raise RuntimeError(f"CATEncoder.layer_groups: no group for parameter {name!r}")
            groups[g].append(name)
        return groups

    # ---- forward -----------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"CATEncoder: expected images of shape (B, {self.cfg.in_chans}, H, W), got {shape}")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"CATEncoder: expected {self.cfg.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        m = self.min_input_size()
        if min(x.shape[2:]) < m:
            raise ValueError(
                f"CATEncoder: image {tuple(x.shape[2:])} is too small; height and width must be >= {m} px "
                f"(a {self.cfg.patch_size}x stem grid of at least one {self.windows[0]}x{self.windows[0]} window)"
            )

    def _resolve_stages(self, stages: Iterable[int] | None) -> list[int]:
        n = self.num_stages
        if stages is None:
            return list(range(n))
        wanted = [int(s) for s in stages]
        bad = [s for s in wanted if not -n <= s < n]
        if not wanted or bad:
            raise ValueError(f"CATEncoder: stages must be indices in [-{n}, {n}), got {list(wanted)}")
        resolved = [s % n for s in wanted]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"CATEncoder: stages {wanted} name a stage twice")
        return resolved

    def position_embedding(self, h: int, w: int) -> Tensor:
        """``ape`` for an ``h x w`` stem grid, ``(1, h, w, C)``; resized bicubically when the grid differs."""
        g, C = self.patch_grid, self.ape.shape[-1]
        return _resize_grid(self.ape.view(1, g, g, C), h, w)

    def forward_features(self, x: Tensor, stages: Iterable[int] | None = None) -> list[Tensor]:
        """Tokens of each requested stage (default: all), ``(B, h_i * w_i, C_i)``, after its last CAB and before
        patch merging, in the order requested. Stops after the last requested stage."""
        self._check_input(x)
        wanted = self._resolve_stages(stages)
        last = max(wanted)
        x = self.patch_embed(x)  # (B, h, w, C), a fresh tensor
        inference = not torch.is_grad_enabled() and not self.training
        if self.ape is not None:
            pe = self.position_embedding(x.shape[1], x.shape[2])
            x = x.add_(pe) if inference else x + pe
            del pe
        x = self.pos_drop(x)
        outs: dict[int, Tensor] = {}
        for i in range(last + 1):
            stage = self.layers[i]
            if inference and x.device.type == "cpu" and not torch.compiler.is_compiling() and not _has_hooks(stage):
                box = [x]  # x is this method's own tensor (the stem's or the last merging's output): hand it over
                del x
                x = stage.forward_owned(box)
            else:
                x = stage(x)  # (B, h_i, w_i, C_i)
            if i in wanted:
                outs[i] = x.flatten(1, 2)
            if i < last:
                x = stage.downsample(x)
        return [outs[i] for i in wanted]

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Last-stage tokens ``(B, L, C)`` -> LayerNorm -> mean -> logits ``(B, classes)`` (or pooled ``(B, C)``)."""
        pooled = self.norm(tokens).mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x, stages=[-1])[0])

    # ---- checkpoints -------------------------------------------------------------------------------------
    def load_pretrained(
        self,
        path_or_state_dict: str | Path | Mapping[str, Tensor],
        key_map: KeyMap | None = None,
        strict: bool = True,
    ) -> nn.modules.module._IncompatibleKeys:
        """Load an official (or this project's) CAT checkpoint.

        Accepts a ``.safetensors`` file, a ``.pth``/``.pt``/``.bin`` file (read with ``weights_only=True``) or a
        state dict. A top-level ``"model"``/``"state_dict"`` entry is unwrapped; if keys start with ``"model."``,
        only those are kept, without the prefix (other entries, e.g. fixtures' inputs, are ignored). ``key_map``
        renames keys of older releases: a dict of ``old prefix -> new prefix`` (``None`` drops the key) or a
        callable ``key -> new key`` (``None`` drops it). With ``num_classes=0`` a checkpoint's ``head.*`` is
        dropped silently. ``relative_position_index`` buffers missing from the file are kept (they are constants).
        Weights trained at another image size load: their absolute position embedding is resized bicubically to
        this encoder's grid, as the forward pass resizes it for other input sizes.

        Raises ``ValueError`` listing missing / unexpected keys (when ``strict``) and shape mismatches (always),
        with expected vs given shapes.
        """
        sd = read_state_dict(path_or_state_dict)
        if key_map is not None:
            sd = apply_key_map(sd, key_map)
        if self.cfg.num_classes == 0:
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        own = self.state_dict()
        if "ape" in own and "ape" in sd and sd["ape"].shape != own["ape"].shape:
            sd["ape"] = _resized_ape(sd["ape"], own["ape"])
        for k in own:
            if k.endswith("relative_position_index") and k not in sd:
                sd[k] = own[k]
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        mismatched = [
            (k, tuple(own[k].shape), tuple(sd[k].shape)) for k in own if k in sd and own[k].shape != sd[k].shape
        ]
        problems = []
        if mismatched:
            shown = ", ".join(f"{k}: expected {e}, given {g}" for k, e, g in mismatched[:5])
            problems.append(
                f"{len(mismatched)} with mismatched shapes ({shown}{', ...' if len(mismatched) > 5 else ''})"
            )
        if strict and missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if strict and unexpected:
            problems.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})"
            )
        if problems:
            hint = " (pass key_map= to rename keys of other releases)" if missing or unexpected else ""
            raise ValueError(
                f"CATEncoder.load_pretrained: checkpoint keys do not fit this model: {'; '.join(problems)}{hint}"
            )
        return self.load_state_dict(sd, strict=strict)


def _resize_grid(pe: Tensor, h: int, w: int) -> Tensor:
    """A ``(1, g, g, C)`` position grid resized bicubically to ``(1, h, w, C)`` (unchanged when it fits)."""
    if pe.shape[1:3] == (h, w):
        return pe
    pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
    return pe.permute(0, 2, 3, 1)


def _resized_ape(given: Tensor, own: Tensor) -> Tensor:
    """A checkpoint's absolute position embedding ``(1, g*g, C)`` trained at another image size, resized to this
    encoder's grid the way :meth:`CATEncoder.position_embedding` resizes it for other input sizes: loading 224 px
    weights into a 448 px encoder gives the outputs of the 224 px model run on 448 px images. Returned unchanged
    (and reported as a shape mismatch) when it is not a square grid of the same width."""
    if given.dim() != 3 or given.shape[0] != 1 or given.shape[2] != own.shape[2]:
        return given
    g, n = math.isqrt(given.shape[1]), math.isqrt(own.shape[1])
    if g * g != given.shape[1]:
        return given
    pe = _resize_grid(given.float().reshape(1, g, g, -1), n, n)
    return pe.reshape(1, n * n, -1).to(own.dtype)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any forward (pre-)hook of its own or a global one."""
    from torch.nn.modules import module as nn_module

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
    )


def _fast_projections(attn: Attention) -> Attention:
    # Attention builds plain nn.Linear projections; FastLinear is a subclass with the same parameters (and keys)
    # that takes the oneDNN path in CPU inference.
    for name in ("qkv", "proj"):
        if type(getattr(attn, name, None)) is nn.Linear:
            getattr(attn, name).__class__ = FastLinear
    return attn


def _residual_add(x: Tensor, update: Tensor) -> Tensor:
    """``x + update`` for the stream ``x`` (B, L, C); ``update`` may be a strided (B, nW, N, C) view in the same
    token order (CPSA), so the add doubles as its layout copy. Without autograd the add is in place (no new
    buffer per block: large fresh CPU allocations cost page faults)."""
    x4 = x.view(update.shape)
    if torch.is_grad_enabled():
        return (x4 + update).view(x.shape)
    return x4.add_(update).view(x.shape)


def _init_weights(m: nn.Module) -> None:
    # Official init: Linear trunc-normal(0.02) / zero bias, LayerNorm 1 / 0; the stem conv keeps PyTorch's default.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
