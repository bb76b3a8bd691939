"""Helpers of CAT's blocks: window bookkeeping, the CPU fast path of its linear layers, checkpoint reading.

Windows: Swin-style p x p window partition of a (zero-padded) token grid.

CAT's blocks all work on windows: IPSA attends inside each window, CPSA treats each window of one channel as a
token. Every other op of a block (LayerNorm, MLP, residual adds, drop-path per image) is per token, so a stage keeps
its residual stream in *window order* ``(B, nW * p * p, C)`` from its first block to its last and partitions /
reverses once per stage instead of twice per block. Window order is the official one: windows row-major over the
window grid, tokens row-major inside a window (Swin's ``window_partition``).

Grids that are not multiples of ``p`` follow the official dense-prediction backbone: the LayerNorm output is
zero-padded on the right/bottom before windowing and the attention output is cropped after. In window order the
padded tokens simply stay in the stream; :attr:`WindowGrid.valid` zeroes them at every LayerNorm output, and their
values never reach a real token (attention reads the zeros, everything else is per token), so real tokens see
exactly what the official model computes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "KeyMap",
    "apply_key_map",
    "read_state_dict",
    "FastLinear",
    "InferenceLinear",
    "Mlp",
    "WindowGrid",
    "linear",
    "relative_position_index",
    "set_lean_mlp",
    "set_onednn_linear",
    "set_packed_weights",
    "clear_weight_caches",
    "stage_grid_sizes",
    "use_inference_linears",
]


def stage_grid_sizes(height: int, width: int, patch_size: int, num_stages: int) -> list[tuple[int, int]]:
    """Token grid ``(h_i, w_i)`` of every stage for an input of ``height x width`` pixels.

    The stem pads the image to a multiple of ``patch_size``; patch merging pads odd grids by one row/column.
    """
    h, w = math.ceil(height / patch_size), math.ceil(width / patch_size)
    sizes = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def relative_position_index(window: int) -> Tensor:
    """Swin's relative position index ``(p*p, p*p)``: ``(dr + p - 1) * (2p - 1) + (dc + p - 1)`` with
    ``(dr, dc) = coord(query) - coord(key)`` and coords from an 'ij' meshgrid."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + window - 1) * (2 * window - 1) + (rel[1] + window - 1)


@dataclass(frozen=True)
class WindowGrid:
    """How one stage's ``height x width`` token grid is cut into ``window x window`` windows."""

    height: int
    width: int
    window: int

    @property
    def rows(self) -> int:  # windows per column of the padded grid
        return -(-self.height // self.window)

    @property
    def cols(self) -> int:
        return -(-self.width // self.window)

    @property
    def num_windows(self) -> int:
        return self.rows * self.cols

    @property
    def tokens(self) -> int:  # tokens per window, N = p * p
        return self.window * self.window

    @property
    def padded(self) -> bool:
        return self.rows * self.window != self.height or self.cols * self.window != self.width

    def partition(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> window order ``(B, nW * N, C)`` (zero-padded right/bottom when needed)."""
        B, H, W, C = x.shape
        p = self.window
        if self.padded:
            x = F.pad(x, (0, 0, 0, self.cols * p - W, 0, self.rows * p - H))
        x = x.view(B, self.rows, p, self.cols, p, C).transpose(2, 3)  # (B, rows, cols, p, p, C)
        return x.reshape(B, self.num_windows * self.tokens, C)

    def reverse(self, x: Tensor) -> Tensor:
        """Window order ``(B, nW * N, C)`` -> ``(B, H, W, C)``, padding cropped."""
        B, _, C = x.shape
        p = self.window
        x = x.view(B, self.rows, self.cols, p, p, C).transpose(2, 3)  # (B, rows, p, cols, p, C)
        x = x.reshape(B, self.rows * p, self.cols * p, C)
        if self.padded:
            x = x[:, : self.height, : self.width].contiguous()
        return x

    def valid(self, device: torch.device) -> Tensor | None:
        """Bool ``(1, nW * N, 1)``, ``False`` on padding tokens; ``None`` when the grid needs no padding."""
        if not self.padded:
            return None
        ones = torch.ones(1, self.height, self.width, 1, device=device)
        return self.partition(ones) > 0


# ---- CPU fast path for CAT's linear layers -------------------------------------------------------------------------
# CAT's early stages are GEMMs with small K (64-256 channels over 25k+ tokens). On CPUs where PyTorch's BLAS (MKL)
# is slow for such shapes (AMD EPYC here: 2-3x) oneDNN's matmul is much faster and gives the same fp32 results. In
# inference the bias and the exact (erf) GELU are fused into it; with autograd, _OneDNNLinear runs the forward and
# the input gradient through oneDNN and the weight gradient g^T @ x (a long reduction over tokens, where oneDNN
# would first copy both transposed operands) through torch.mm: 2-4x faster than oneDNN there on this CPU.
# Off on other devices/dtypes; MMXATTN_CAT_ONEDNN=0 turns it off everywhere.
_ONEDNN_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_ONEDNN = os.environ.get("MMXATTN_CAT_ONEDNN", "1").lower() not in ("0", "false", "no") and _ONEDNN_OP is not None
_ONEDNN = _ONEDNN and torch.backends.mkldnn.is_available()


def set_onednn_linear(enabled: bool) -> None:
    """Use oneDNN for CAT's CPU fp32 linear layers (the default where available) or plain ``F.linear``."""
    global _ONEDNN
    _ONEDNN = bool(enabled) and _ONEDNN_OP is not None and torch.backends.mkldnn.is_available()


def _mm(a: Tensor, b_t: Tensor) -> Tensor:  # a @ b_t.T through oneDNN; a (M, K), b_t (N, K)
    return _ONEDNN_OP(a, b_t, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_OP(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g, weight.t().contiguous()).view(x.shape)  # (M, K) = g @ W
        if ctx.needs_input_grad[1]:
            gw = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))  # (N, K) = g^T @ x, torch.mm: see the note above
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


# Without autograd, oneDNN re-orders a plain weight into its blocked layout on every call. So no-grad calls use a
# copy of the weight packed once, cached per Parameter (weakly: the module, its state dict, deepcopy and pickling
# never see it) and keyed on the weight's storage and version (see _after_optimizer_step), so loading, optimiser
# steps, in-place edits and conversions re-pack it (in-place edits through ``param.data`` bypass the version
# counter: clear_weight_caches() after those). Packed for the first call's row count, the layout is the one oneDNN
# picks for that call itself, so those calls give bit-identical results (other row counts: equal to rounding).
# Paired A/B, CAT-T eval at 224 px (twenty-second session): 0.93 of the time at batch 1, 0.98-0.99 at batch 8
# (twenty-fifth session, another CPU: 1.05 / 1.00, and 0.96 at 896 px). Costs one packed copy of each weight kept;
# since the twenty-fifth session only small calls keep one (_PACK_KEEP_MAX_ROWS below).
# MMXATTN_CAT_PACKED_WEIGHTS=0 or set_packed_weights(False) turns it off.
_PACKED = os.environ.get("MMXATTN_CAT_PACKED_WEIGHTS", "1").lower() not in ("0", "false", "no")
_PACKED_OP = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
_PACKED_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()

# The caches' keys are a weight's address, version, shape and dtype. Two ways around them are closed here:
# - fused optimisers (AdamW(fused=True), the training module's default on CUDA) write the weights in place without
#   bumping their version counters: a global optimiser step hook bumps those of the parameters a fused step wrote
#   (what torch.autograd.graph.increment_version is for), so loading, optimiser steps of every kind and in-place
#   edits all re-pack;
# - conversions (``model.half().float()``, ``param.data = ...``, ``torch.func.functional_call`` with new tensors)
#   give the weight new storage with its old version, and the allocator often hands it the old storage's freed
#   address: each cache entry holds the storage it was made from, so that address cannot be reused while it lives.


def _after_optimizer_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    stepped = [
        p for g in optimizer.param_groups if g.get("fused") for p in g["params"] if p.grad is not None
    ]  # the others bump the versions of what they write
    if stepped:
        increment_version(stepped)


register_optimizer_step_post_hook(_after_optimizer_step)


def set_packed_weights(enabled: bool) -> bool:
    """Let the no-grad CPU linears of CAT and of :class:`InferenceLinear` use weights packed once (the default; the
    same results to rounding, faster) or re-pack them on every call. Turning it off drops the packed copies. Returns
    the previous setting."""
    global _PACKED
    old, _PACKED = _PACKED, bool(enabled)
    if not _PACKED:
        _PACKED_CACHE.clear()
    return old


def clear_weight_caches(module: nn.Module | None = None) -> None:
    """Drop the copies no-grad inference keeps of ``module``'s weights (every module's when ``None``): packed
    linear weights and CAT's gathered relative position bias. They follow every change made through the parameters
    themselves (loading, optimiser steps, fused ones too, in-place edits, dtype conversions, new tensors swapped in),
    but an in-place edit through ``param.data`` bypasses the version counter they check: call this after one (e.g.
    after swapping in EMA weights with ``p.data.copy_(...)``)."""
    if module is None:
        _PACKED_CACHE.clear()
        return
    for m in module.modules():
        for p in m.parameters(recurse=False):
            _PACKED_CACHE.pop(p, None)
        if hasattr(m, "_bias_key"):
            m._bias, m._bias_key, m._bias_source = None, None, None


def _packed_weight(
    weight: Tensor,
    rows: int,
    per_rows: bool = False,
    mkl: bool = False,
    dtype: torch.dtype | None = None,
    keep: str = "cache",
) -> Tensor:
    """``weight`` in oneDNN's packed layout, packed on first use (for ``rows`` input rows: the layout oneDNN picks
    for that call, which any row count can use) and again after any change to the weight; with ``per_rows`` also
    whenever the row count changes. ``mkl``: MKL's packed layout for ``torch.ops.mkl._mkl_linear`` instead.
    ``dtype``: a copy cast to it first (bf16 under CPU autocast); when packing is off, the plain cast copy.
    ``keep``: ``"cache"`` keeps the packed copy for later calls; ``"call"`` packs for this call only unless a kept
    copy is current; ``"reuse"`` takes a kept current copy or else the plain weight (or its cast copy)."""
    pack = _MKL_PACK_OP if mkl else _PACKED_OP
    if not _PACKED or pack is None or weight.is_inference():  # inference tensors carry no version counter
        return weight if dtype is None else weight.detach().to(dtype)
    key = (
        weight.data_ptr(),
        weight._version,
        tuple(weight.shape),
        tuple(weight.stride()),
        rows if per_rows else 0,
        mkl,
        dtype,
    )
    hit = _PACKED_CACHE.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    plain = weight.detach() if dtype is None else weight.detach().to(dtype)
    if keep == "reuse":
        return plain
    packed = pack(plain, rows)
    if keep == "cache":  # the source storage is held: see _after_optimizer_step
        _PACKED_CACHE[weight] = (key, packed, weight.detach())
    return packed


# Which of CAT's no-grad linears keep a packed copy of their weight. Per layer the packed weight runs 0.90-0.95 of
# the plain one's time at every row count (CAT-T's shapes, twenty-fifth session), while packing costs ~0.1 ms plus
# ~0.3 ms per million weights. Kept copies cost memory (CAT-T: 65 MB, as much as its 896 px batch-1 activations),
# and pay most where calls are small, so only calls of at most _PACK_KEEP_MAX_ROWS rows keep one (CAT-T at 224 px:
# stages 3-4 at batch 1, stage 4 at batch 8). Large calls pack for the call alone, where that costs under ~5% of
# the call (pack + call 0.93-0.98 of the plain call from 3136 rows and 2^28 multiply-adds); the rest take the plain
# weight (oneDNN re-orders it inside the call). A kept current copy is always used.
_PACK_KEEP_MAX_ROWS = 512
_PACK_PER_CALL_MIN_ROWS = 3072
_PACK_PER_CALL_MIN_MACS = 1 << 28


def _cat_weight(weight: Tensor, rows: int, dtype: torch.dtype | None = None) -> Tensor:
    """The weight a no-grad CAT linear over ``rows`` rows runs with (see ``_PACK_KEEP_MAX_ROWS``)."""
    if rows <= _PACK_KEEP_MAX_ROWS:
        keep = "cache"
    elif rows >= _PACK_PER_CALL_MIN_ROWS and rows * weight.numel() >= _PACK_PER_CALL_MIN_MACS:
        keep = "call"
    else:
        keep = "reuse"
    return _packed_weight(weight, rows, dtype=dtype, keep=keep)


def _onednn_ok(x: Tensor, weight: Tensor) -> bool:
    # torch.compile cannot trace the private oneDNN op with a trainable weight: compiled code takes F.linear
    if torch.compiler.is_compiling():
        return False
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32


# CPU autocast to bfloat16: F.linear would cast input, weight and bias to bf16 and run MKL-DNN's bf16 matmul on the
# plain weight. Without autograd linear() and InferenceLinear do the same through oneDNN with a bf16 copy of the
# weight packed once (and GELU fused): CAT-T's layer shapes 1.4-1.9x faster than the fp32 packed path, the 49409 x
# 256 LM head 1.5-2.5x faster than F.linear under autocast (one thread, twenty-third session). With autograd under
# CPU autocast the layers are F.linear, which autocast runs in bf16. Only where oneDNN has bf16 kernels
# (AVX512-BF16, AMX, or AVX512 emulation); elsewhere autocast's own F.linear.
_BF16_OK = bool(
    getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None) is not None
    and torch.backends.mkldnn.is_available()
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


def _cpu_bf16_autocast(x: Tensor, weight: Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` would run in bf16 under the current CPU autocast and oneDNN can do it."""
    if not (_ONEDNN and _BF16_OK) or x.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling():
        return False
    _, on, dtype = _autocast_state("cpu")
    return on and dtype == torch.bfloat16


def _bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool, packed: bool, per_rows: bool) -> Tensor:
    """No-grad ``linear`` under CPU bf16 autocast: bf16 in, bf16 weight (packed once unless ``packed=False``), bf16
    out, as autocast's F.linear."""
    rows = x.numel() // x.shape[-1]
    if not packed:
        w = weight.to(torch.bfloat16)
    elif per_rows:
        w = _packed_weight(weight, rows, per_rows=True, dtype=torch.bfloat16)
    else:
        w = _cat_weight(weight, rows, dtype=torch.bfloat16)
    b = None if bias is None else bias.to(torch.bfloat16)
    return _ONEDNN_OP(x.to(torch.bfloat16), w, b, "gelu" if gelu else "none", [], "none" if gelu else "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False, packed: bool = True) -> Tensor:
    """``F.linear`` (then exact GELU if ``gelu``), through oneDNN on CPU fp32; without autograd with the weight
    packed once (``packed=False``: not cached, for weights that change every step). Under CPU autocast to bf16 it
    runs in bf16 as ``F.linear`` would (without autograd through oneDNN, with a packed bf16 weight)."""
    if _cpu_bf16_autocast(x, weight):
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return _bf16_linear(x, weight, bias, gelu, packed, per_rows=False)
        y = F.linear(x, weight, bias)
    elif _onednn_ok(x, weight):
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            w = _cat_weight(weight, x.numel() // x.shape[-1]) if packed else weight
            return _ONEDNN_OP(x, w, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        y = _OneDNNLinear.apply(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class FastLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) that takes the oneDNN path on CPU fp32."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# MKL's packed GEMM (what inductor uses for frozen fp32 linears) beats oneDNN's at one row: the 49409 x 256 head
# took 1.9 ms against 4.8 on one thread (2.1 vs 2.4 on two), but lost from two rows on (3.8 vs 2.8). So one-row
# calls (greedy decoding of one image) take it where this torch has MKL.
_MKL_LINEAR_OP = getattr(getattr(torch.ops, "mkl", None), "_mkl_linear", None)
_MKL_PACK_OP = getattr(getattr(torch.ops, "mkl", None), "_mkl_reorder_linear_weight", None)
_MKL_ONE_ROW = _MKL_LINEAR_OP is not None and _MKL_PACK_OP is not None and torch.backends.mkl.is_available()

# Below this many multiply-adds a call (rows x weight elements) oneDNN's fixed cost per call (~10 us here) outweighs
# what packing gains: a 256 x 256 layer at 8 rows took 19 us through F.linear and 25 us packed, 256 -> 768 56 vs 48.
_INFERENCE_LINEAR_MIN_MACS = 1 << 20


class InferenceLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose no-grad CPU fp32 calls go through oneDNN with the
    weight packed for the call's row count (under CPU autocast to bf16: a packed bf16 copy, bf16 out, as autocast's
    ``F.linear``); with autograd, under torch.compile, on other devices or dtypes and for tiny calls it is
    ``nn.Linear``. For the text side's layers, whose weights are read far
    more often than they change when decoding, above all the language-model head over a large vocabulary: open_clip's
    49409 x 256 head at 8 rows took 11.5 ms through ``F.linear`` and 3.9 ms packed (one thread; 9.6 vs 1.8 ms on
    two), and it is read once per decoding step. One-row calls take MKL's packed GEMM instead (1.9 ms for that
    head). The packed copy is re-made when the row count changes (oneDNN's layout for 8 rows is not its layout for
    1)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        big = rows * self.weight.numel() >= _INFERENCE_LINEAR_MIN_MACS
        no_grad = not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        if big and no_grad and _cpu_bf16_autocast(x, self.weight):
            return _bf16_linear(x, self.weight, self.bias, False, True, per_rows=True)
        if big and no_grad and _onednn_ok(x, self.weight) and not _autocast_state("cpu")[1]:
            if rows == 1 and _MKL_ONE_ROW:
                w = _packed_weight(self.weight, 1, per_rows=True, mkl=True)
                if w is not self.weight:  # packed (not turned off)
                    y = _MKL_LINEAR_OP(x.reshape(1, -1).contiguous(), w, self.weight, self.bias, 1)
                    return y.view(*x.shape[:-1], -1)
            return _ONEDNN_OP(x, _packed_weight(self.weight, rows, per_rows=True), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_inference_linears(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` into an :class:`InferenceLinear` (same parameters and keys;
    training is unchanged). Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = InferenceLinear
    return module


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear (timm's ``Mlp`` keys ``fc1``/``fc2``), with GELU fused into fc1 on the fast
    path."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = FastLinear(dim, hidden)
        self.fc2 = FastLinear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(linear(x, self.fc1.weight, self.fc1.bias, gelu=True))
        return self.drop(self.fc2(x))

    def forward_normed(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        """``self(norm(x))``; in training it keeps only ``x`` and the fc1 output for backward (see
        :class:`_LeanLnMlp`), the result and the gradients being the same."""
        if _lean_ok(x, norm, self):
            return _LeanLnMlp.apply(
                x, norm.weight, norm.bias, norm.eps, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
            )
        return self(norm(x))


# ---- training memory: LayerNorm -> MLP that saves 5 of the 10 values per token and channel it would keep ---------
# Autograd keeps, per token and channel C, for LN2 -> fc1 -> GELU -> fc2: LN2's input (1), fc1's input (1), GELU's
# input (4) and fc2's input (4). The LayerNorm output and the GELU output are cheap elementwise functions of the
# other two, so _LeanLnMlp saves only the block's stream x and the fc1 output h and recomputes LN2(x) and GELU(h) in
# backward: half the MLP's activation memory (a third of a CAT block's) for two elementwise passes. Results and
# gradients are those of the plain modules (fp32: to rounding; under autocast the matmuls run in the autocast dtype
# as they would in F.linear). MMXATTN_CAT_LEAN_MLP=0 or set_lean_mlp(False) turns it off.
_LEAN_MLP = os.environ.get("MMXATTN_CAT_LEAN_MLP", "1").lower() not in ("0", "false", "no")


def set_lean_mlp(enabled: bool) -> None:
    """Use the memory-lean LayerNorm -> MLP autograd function in CAT training (the default) or the plain modules."""
    global _LEAN_MLP
    _LEAN_MLP = bool(enabled)


def _lean_ok(x: Tensor, norm: nn.Module, mlp: Mlp) -> bool:
    if not (_LEAN_MLP and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return False
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None or mlp.fc1.bias is None:
        return False
    if not isinstance(mlp.drop, nn.Identity) or mlp.fc2.bias is None:
        return False
    return x.requires_grad or any(p.requires_grad for p in (norm.weight, mlp.fc1.weight, mlp.fc2.weight))


def _mm_any(a: Tensor, b_t: Tensor) -> Tensor:  # a @ b_t.T, through oneDNN where linear() would use it
    return _mm(a, b_t) if _onednn_ok(a, b_t) else a @ b_t.t()


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """(device type, autocast enabled, autocast dtype) of the current thread for ``device_type``."""
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return device_type, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class _LeanLnMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2):  # noqa: ANN001, ANN205
        # backward recomputes the LayerNorm under the autocast state forward saw (autograd runs backward without
        # it): under CUDA autocast the stream may be bf16 with fp32 LN weights, which only autocast's fp32 cast
        # of layer_norm makes valid (CUDA's kernel wants one dtype; the CPU kernel accepts the mix)
        ctx.autocast = _autocast_state(x.device.type)
        y = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
        # autocast (if active) applies to these as it would outside; a training step's weights are new every step,
        # so packing them for the cache would only hold a stale copy
        h = linear(y, w1, b1, packed=False)
        del y
        out = linear(F.gelu(h), w2, b2, packed=False)
        ctx.save_for_backward(x, ln_w, ln_b, w1, w2, h)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        x, ln_w, ln_b, w1, w2, h = ctx.saved_tensors
        need_x, need_lw, need_lb, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dt = h.dtype  # the matmuls' dtype in forward (the autocast dtype under autocast)
        C = x.shape[-1]
        g = grad.reshape(-1, grad.shape[-1]).to(dt)  # (M, C)
        hh = h.reshape(-1, h.shape[-1])  # (M, 4C)
        gw2 = gb2 = gw1 = gb1 = gx = glw = glb = None
        if need_w2:
            gw2 = torch.mm(g.t(), F.gelu(hh)).to(w2.dtype)  # (C, 4C) = g^T GELU(h)
        if need_b2:
            gb2 = g.sum(0).to(w2.dtype)
        gh = torch.ops.aten.gelu_backward(_mm_any(g, w2.to(dt).t().contiguous()), hh)  # (M, 4C)
        del g
        if need_b1:
            gb1 = gh.sum(0).to(w1.dtype)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            xd = x.detach().requires_grad_(need_x)
            lw = ln_w.detach().requires_grad_(need_lw)
            lb = ln_b.detach().requires_grad_(need_lb)
            y = F.layer_norm(xd, (C,), lw, lb, ctx.eps)
        if need_w1:
            gw1 = torch.mm(gh.t(), y.detach().reshape(-1, C).to(dt)).to(w1.dtype)  # (4C, C) = gh^T y
        if need_x or need_lw or need_lb:
            gy = _mm_any(gh, w1.to(dt).t().contiguous()).view(y.shape).to(y.dtype)  # (.., C) = gh @ W1
            del gh
            wrt = [t for t, need in ((xd, need_x), (lw, need_lw), (lb, need_lb)) if need]
            got = iter(torch.autograd.grad(y, wrt, gy))
            gx = next(got) if need_x else None
            glw = next(got) if need_lw else None
            glb = next(got) if need_lb else None
        return gx, glw, glb, None, gw1, gb1, gw2, gb2


# ---- checkpoint files ------------------------------------------------------------------------------------------------
KeyMap = Mapping[str, str | None] | Callable[[str], str | None]


def read_state_dict(src: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (safetensors, or torch with ``weights_only=True``) or state dict, unwrapped."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"CATEncoder.load_pretrained: no checkpoint file at {path}")
        try:
            if path.stat().st_size == 0:
                raise ValueError("an empty file")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj: object = load_file(str(path), device="cpu")
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged, foreign, or a pickle the weights-only loader refuses (never executed)
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ValueError(f"CATEncoder.load_pretrained: cannot read {path}: {first}") from e
    else:
        obj = src
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"CATEncoder.load_pretrained: expected a state dict (str -> Tensor), got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def apply_key_map(sd: dict[str, Tensor], key_map: KeyMap) -> dict[str, Tensor]:
    if callable(key_map):
        rename = key_map
    else:
        prefixes = sorted(key_map.items(), key=lambda kv: -len(kv[0]))  # longest prefix wins

        def rename(key: str) -> str | None:
            for old, new in prefixes:
                if key.startswith(old):
                    return None if new is None else new + key[len(old) :]
            return key

    out = {}
    for k, v in sd.items():
        new = rename(k)
        if new is not None:
            out[new] = v
    return out
