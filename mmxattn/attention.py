"""The one attention primitive of mmxattn: multi-head self- and cross-attention.

Every attention in the project (CAT's IPSA and CPSA, the text encoder, the decoder's causal self-attention and its
text-to-image cross-attention, the attentional pooler) is an :class:`Attention`. Two numerically equivalent paths:

* fused: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the device has them);
* eager: the readable reference ``softmax(q k^T * scale + bias + mask) @ v``, which is also the only path that can
  hand out the post-softmax weights (see :mod:`mmxattn.capture`).

Calls on the CPU over few keys (CAT's windows, short text batches, the decoder reading an image's tokens), with or
without autograd, take the eager path even when fusion is on: SDPA's CPU kernel is slower for such small problems
(:func:`set_small_cpu_eager`).

The eager path is used when :func:`set_fused_attention` turned fusion off, when the environment variable
``MMXATTN_EAGER_ATTENTION=1`` is set at import, inside :func:`eager_attention`, or while a module is being captured.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "KVCache",
    "StaticKVCache",
    "uniform_repeats",
    "eager_attention",
    "fused_attention_enabled",
    "set_fused_attention",
    "set_small_cpu_eager",
]

_FUSED = os.environ.get("MMXATTN_EAGER_ATTENTION", "0").lower() not in ("1", "true", "yes")


def set_fused_attention(enabled: bool) -> None:
    """Globally choose the fused (SDPA) path (``True``, the default) or the eager reference path."""
    global _FUSED
    _FUSED = bool(enabled)


def fused_attention_enabled() -> bool:
    return _FUSED


@contextlib.contextmanager
def eager_attention() -> Iterator[None]:
    """Run every :class:`Attention` on the eager reference path inside the block."""
    previous = _FUSED
    set_fused_attention(False)
    try:
        yield
    finally:
        set_fused_attention(previous)


@dataclass
class KVCache:
    """Keys and values of one attention layer kept between decoding steps.

    Self-attention appends the new step's keys/values; cross-attention computes them from the context once and
    reuses them. ``k``/``v`` are ``(B, nh, S, hd)``.
    """

    k: Tensor | None = None
    v: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch rows in place (beam search)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class StaticKVCache:
    """Self-attention keys/values in buffers of fixed size ``(B, nh, capacity, hd)``, written at a position held in
    a device tensor.

    Every decoding step then has the same shapes and the same memory addresses, so one step can be captured in a CUDA
    graph and replayed (see :mod:`mmxattn.generation`). ``pos`` is a long tensor of shape (1,), shared by every
    layer of a model and advanced by the caller after each step; keys beyond ``pos + i`` are masked for query ``i``,
    so the unwritten part of the buffers never contributes.
    """

    def __init__(self, pos: Tensor, capacity: int) -> None:
        self.pos = pos
        self.capacity = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store ``k``/``v`` (B, nh, L, hd) at positions ``pos .. pos + L - 1``; returns the whole buffers and the
        (L, capacity) mask that is True where query ``i`` must not see the key."""
        if self.k is None:  # allocated at the first write, in the dtype the projections produce (autocast)
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        elif self.k.shape[0] != k.shape[0] or self.k.dtype != k.dtype:
            raise ValueError(
                f"static cache holds batch {self.k.shape[0]} ({self.k.dtype}); got keys of batch {k.shape[0]} ({k.dtype})"
            )
        idx = self.pos + torch.arange(k.shape[2], device=k.device)  # (L,)
        self.k.index_copy_(2, idx, k)
        self.v.index_copy_(2, idx, v)
        blocked = torch.arange(self.capacity, device=k.device)[None, :] > idx[:, None]  # (L, S)
        return self.k, self.v, blocked

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch rows in place (beam search); the buffers keep their addresses."""
        if self.k is not None:
            self.k.copy_(self.k.index_select(0, index))
            self.v.copy_(self.v.index_select(0, index))

    def reset(self) -> None:
        """Forget the contents (zero the buffers) for the next sequence; ``pos`` is the caller's to reset."""
        if self.k is not None:
            self.k.zero_()
            self.v.zero_()


class Attention(nn.Module):
    """Multi-head attention for self-attention (``context=None``) and cross-attention.

    Args:
        dim: width of the queries (and of the output unless ``out_dim`` is set).
        num_heads: number of heads; ``head_dim`` defaults to ``dim // num_heads``.
        kv_dim: width of the context for cross-attention. Setting it (or ``cross=True``) makes the module a
            cross-attention: ``q = Linear(dim, inner)``, ``kv = Linear(kv_dim, 2 * inner)``. Otherwise a fused
            ``qkv = Linear(dim, 3 * inner)`` laid out ``[q | k | v]`` with contiguous head chunks (the layout of
            timm, Swin and CAT, so their state dicts load as they are).
        qkv_bias / proj_bias: biases of the input and output projections.
        attn_drop / proj_drop: dropout on the attention weights and on the output.
        scale: softmax temperature; ``head_dim ** -0.5`` by default.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        kv_dim: int | None = None,
        cross: bool = False,
        head_dim: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.is_cross = cross or kv_dim is not None
        inner = num_heads * head_dim
        if self.is_cross:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim if kv_dim is not None else dim, 2 * inner, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, out_dim or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set by mmxattn.capture while a capture context is active; never touched otherwise.
        self._recorder: Callable[[Tensor], None] | None = None

    def _split_heads(self, x: Tensor, n: int) -> Tensor:
        # (B, L, n * nh * hd) -> n tensors (B, nh, L, hd)
        B, L, _ = x.shape
        return x.view(B, L, n, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of a cross-attention context, ``(B, nh, S, hd)`` each (cacheable per image)."""
        k, v = self._split_heads(self.kv(context), 2)
        return k, v

    def _grouped_cross(
        self,
        x: Tensor,
        context: Tensor | None,
        attn_bias: Tensor | None,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        cache: KVCache | None,
        repeats: int,
    ) -> Tensor | None:
        """Cross-attention where query rows ``r*j .. r*j + r - 1`` read context row ``j``: the ``r`` rows' queries
        are one block of ``r * L`` queries over that row's keys. None when the general path must run (masks, bias,
        a cache, the eager switch). Under :func:`mmxattn.capture.capture_attention` the block runs the eager math and
        the recorder gets the weights per query row, ``(B, nh, L, S)``, as the general path gives them."""
        B, L, _ = x.shape
        if repeats < 1 or B % repeats or (context is not None and context.shape[0] * repeats != B):
            raise ValueError(
                f"context_index={repeats} (each context row read by {repeats} query rows) does not fit {B} query "
                f"rows and {None if context is None else context.shape[0]} context rows"
            )
        recorder = self._recorder
        if context is None or cache is not None or (recorder is None and not _FUSED):
            return None
        if attn_bias is not None or key_padding_mask is not None or attn_mask is not None:
            return None
        N = context.shape[0]
        (q,) = self._split_heads(self.q(x).reshape(N, repeats * L, -1), 1)  # (N, nh, r*L, hd)
        k, v = self.project_kv(context)
        dropout_p = self.attn_drop if self.training else 0.0
        if recorder is not None:
            out, weights = _eager(q, k, v, self.scale, None, None, dropout_p)
            S = k.shape[2]  # (N, nh, r*L, S) -> (B, nh, L, S): row r*j + i is caption i of context row j
            recorder(weights.view(N, self.num_heads, repeats, L, S).transpose(1, 2).reshape(B, self.num_heads, L, S))
        elif _small_cpu_problem(q, k.shape[2], dropout_p):
            out, _ = _eager(q, k, v, self.scale, None, None, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (N, r*L, nh, hd) -> (B, L, nh * hd)
        return self.proj_drop(self.proj(out))

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        attn_bias: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        context_index: Tensor | int | None = None,
    ) -> Tensor:
        """Attend.

        Args:
            x: queries ``(B, L, dim)``.
            context: keys/values source ``(B, S, kv_dim)`` for cross-attention (may be omitted when ``cache``
                already holds them).
            attn_bias: additive float bias broadcastable to ``(B, nh, L, S)`` (e.g. relative position bias).
            key_padding_mask: bool ``(B, S)``, ``True`` where the key is padding and must be ignored
                (``torch.nn.MultiheadAttention``'s convention).
            attn_mask: bool broadcastable to ``(B, nh, L, S)``, ``True`` where attention is NOT allowed.
            is_causal: query ``i`` sees keys ``<= i`` (offset by the cached length when decoding).
            cache: a :class:`KVCache` to extend (self-attention) or to fill once and reuse (cross-attention), or a
                :class:`StaticKVCache` (self-attention) to write at its position.
            context_index: cross-attention only: long ``(B,)``, query row ``i`` attends to context row
                ``context_index[i]``. Keys/values are projected once per context row and then gathered, so a context
                shared by several query rows (one image, several captions) is projected once, not once per row.
                An int ``r`` means query rows ``r*j .. r*j + r - 1`` attend to context row ``j`` (what
                :func:`uniform_repeats` finds): those rows' queries then attend as one longer query block, with
                neither the gather nor, in backward, its scatter (same result; softmax is per query).
        Returns:
            ``(B, L, out_dim)``.
        """
        if x.dim() != 3:
            raise ValueError(f"Attention expects queries of shape (B, L, C), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if self.is_cross:
            if isinstance(context_index, int) and not isinstance(context_index, bool):
                grouped = self._grouped_cross(x, context, attn_bias, key_padding_mask, attn_mask, cache, context_index)
                if grouped is not None:
                    return grouped
                n_ctx = B // context_index if context is None else context.shape[0]
                context_index = torch.arange(n_ctx, device=x.device).repeat_interleave(context_index)
            (q,) = self._split_heads(self.q(x), 1)
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                if context is None:
                    raise ValueError("cross-attention needs a context (or a filled cache)")
                k, v = self.project_kv(context)
                if context_index is not None:
                    if context_index.shape != (B,):
                        raise ValueError(
                            f"context_index must be ({B},) (one context row per query row), got "
                            f"{tuple(context_index.shape)}"
                        )
                    k, v = k[context_index], v[context_index]
                if cache is not None:
                    cache.k, cache.v = k, v
            past = 0
        else:
            if context is not None or context_index is not None:
                raise ValueError("this Attention is a self-attention (built without kv_dim); got a context")
            q, k, v = self._split_heads(self.qkv(x), 3)
            past = 0
            if isinstance(cache, StaticKVCache):
                if not is_causal or key_padding_mask is not None:
                    raise ValueError("a StaticKVCache serves causal self-attention without a key padding mask")
                k, v, static_blocked = cache.write(k, v)
                attn_mask = static_blocked if attn_mask is None else (attn_mask | static_blocked)
                is_causal = False  # the write mask is the causal mask at the cached offset
            elif cache is not None:
                past = cache.length
                if past:
                    k = torch.cat([cache.k, k], dim=2)
                    v = torch.cat([cache.v, v], dim=2)
                cache.k, cache.v = k, v
        S = k.shape[2]

        # Merge every boolean "not allowed" mask into one (broadcastable to (B, nh, L, S)).
        blocked = attn_mask
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise ValueError(f"key_padding_mask must be (B, S)=({B}, {S}), got {tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.to(torch.bool)[:, None, None, :]
            blocked = kpm if blocked is None else (blocked | kpm)
        causal_flag = False
        if is_causal:
            if blocked is None and attn_bias is None and past == 0 and L == S:
                causal_flag = True  # lets SDPA use its causal kernels
            elif L > 1:
                # query i (absolute position past + i) may see keys j <= past + i
                qi = torch.arange(L, device=x.device)[:, None] + past
                kj = torch.arange(S, device=x.device)[None, :]
                causal = kj > qi
                blocked = causal if blocked is None else (blocked | causal)

        dropout_p = self.attn_drop if self.training else 0.0
        if self._recorder is None and _FUSED and not _small_cpu_problem(q, S, dropout_p):
            mask = None
            if blocked is not None or attn_bias is not None:
                mask = _additive_mask(blocked, attn_bias, q.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal_flag, scale=self.scale
            )
        else:
            if causal_flag:
                blocked = torch.ones(L, S, dtype=torch.bool, device=x.device).triu(1)
            out, weights = _eager(q, k, v, self.scale, blocked, attn_bias, dropout_p)
            if self._recorder is not None:
                self._recorder(weights)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, nh * hd)
        return self.proj_drop(self.proj(out))


def uniform_repeats(index: Tensor | None, n: int) -> Tensor | int | None:
    """``r`` when ``index`` is ``arange(n).repeat_interleave(r)`` (every one of ``n`` context rows read by ``r``
    consecutive query rows, as a batch of several captions per image is laid out), else ``index`` unchanged. The
    int form lets :class:`Attention` skip the gather (its ``context_index``). One comparison on the host, so not
    under ``torch.compile`` (a data-dependent branch would break the graph): compiled code keeps the gather."""
    if torch.compiler.is_compiling():
        return index
    if index is None or index.dim() != 1 or n < 1 or index.numel() % n or index.is_floating_point():
        return index
    r = index.numel() // n
    if torch.equal(index, torch.arange(n, device=index.device).repeat_interleave(r)):
        return r
    return index


# Attention on the CPU over few keys: the eager path (two matmuls, in-place updates) beats SDPA's CPU flash kernel
# there, whose blocking overhead dominates small problems.
# * No grad (measured on 2 cores, time / SDPA's, two runs): CAT-T's IPSA windows 0.71-0.92 (49 tokens, 1.2-2.5M
#   scores), its CPSA rows 0.75-0.94, 24-token causal text batches 0.53-0.6 (1-2.3M scores), 24x80 cross-attention
#   0.67-0.84 (3.8M); CAT-T's eval forward at 224 px 1-4% faster in all. At 9.8M scores (IPSA, batch 32) the score
#   tensor leaves the cache: SDPA won there in two runs of four (eager 1.09-1.5x) and lost in the others (0.79-0.81),
#   and at 19.6M it won (1.43), so the bound stays below 9.8M; at 4.2-4.9M (CAT-T's stage 0 at batch 16) the eager
#   math took 0.71-0.73 of SDPA's time (benchmarks/attention_paths.py, twentieth session). Over 256 keys it lost
#   even at 4.2M scores (CAT-T's CPSA rows at 448 px, batch 1: 1.8-2.6x SDPA's time), hence the key bound below.
# * Training (forward + backward, twentieth session, median of 15): CAT-T's IPSA windows at batch 16 0.62 (stage 0)
#   to 0.88, its CPSA rows 0.42-0.84, the shapes job's windows 0.62-0.93, its 23-token causal text 0.46 and its
#   69x80 grouped cross-attention 0.56; 128 keys 0.75-0.92. From ~200 keys on SDPA wins (197-token ViT-S 1.12, 245
#   keys 1.12, causal 256 1.12, 1024 2.5), so the rule is on the key count (both modes); eager also keeps the
#   post-softmax weights for backward (4 bytes a score), hence the bound on scores.
# One-query decoding steps stay on SDPA; GPUs are unaffected. set_small_cpu_eager(False) (or
# MMXATTN_SMALL_CPU_EAGER=0) sends every fused call to SDPA.
_SMALL_CPU_SCORES = 8_000_000
_SMALL_CPU_KEYS = 128
_SMALL_CPU_TRAIN_SCORES = 16_000_000
_SMALL_CPU_EAGER = os.environ.get("MMXATTN_SMALL_CPU_EAGER", "1").lower() not in ("0", "false", "no")


def set_small_cpu_eager(enabled: bool) -> bool:
    """Let small CPU attention problems take the eager math instead of SDPA (the default; faster there, same result
    to rounding) or send every fused call to SDPA. Returns the previous setting."""
    global _SMALL_CPU_EAGER
    old, _SMALL_CPU_EAGER = _SMALL_CPU_EAGER, bool(enabled)
    return old


def _small_cpu_problem(q: Tensor, S: int, dropout_p: float) -> bool:
    B, nh, L, _ = q.shape
    if not (_SMALL_CPU_EAGER and q.device.type == "cpu" and dropout_p == 0.0 and L > 1 and S <= _SMALL_CPU_KEYS):
        return False
    return B * nh * L * S <= (_SMALL_CPU_TRAIN_SCORES if torch.is_grad_enabled() else _SMALL_CPU_SCORES)


def _additive_mask(blocked: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    # A finite large negative instead of -inf keeps fully-masked rows finite (uniform weights) on both paths.
    neg = torch.finfo(dtype).min
    if blocked is None:
        return bias.to(dtype)
    m = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, neg)
    if bias is not None:
        m = m + bias.to(dtype)
        m = m.clamp_min(neg)
    return m


def _eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    blocked: Tensor | None,
    bias: Tensor | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Reference attention. Returns the output ``(B, nh, L, hd)`` and the post-softmax weights ``(B, nh, L, S)``."""
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, nh, L, S)
    # in place: the matmul's backward needs its inputs, not its output, and the score tensor is the largest one
    if bias is not None:
        scores.add_(bias.to(scores.dtype))
    if blocked is not None:
        scores.masked_fill_(blocked, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights
