"""Text side of MMXAttn: the causal text encoder (CLS-pooled), the multimodal decoder whose cross-attention reads
every image token, the 1-query attentional pooler, and the image-token projector.

All attention goes through :class:`mmxattn.attention.Attention`, so :func:`mmxattn.capture_attention` sees it.
Shapes: B batch, T text positions, L image tokens, W text width, D = W (image tokens are projected to the text
width), E retrieval embedding size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attention import Attention, KVCache, StaticKVCache, uniform_repeats
from ..config import TextConfig

__all__ = [
    "AttentionalPooler",
    "DecoderBlock",
    "DecodingCache",
    "ImageTokenProjector",
    "MultimodalDecoder",
    "TextBlock",
    "TextEncoder",
    "sincos_2d",
]


def _mlp(width: int, ratio: float, drop: float) -> Mlp:
    return Mlp(width, int(width * ratio), act_layer=nn.GELU, drop=drop)


class TextBlock(nn.Module):
    """Pre-norm causal self-attention block: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, attn_drop=dropout, proj_drop=dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _mlp(width, mlp_ratio, dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask=key_padding_mask, is_causal=True, cache=cache)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """Causal self-attention -> cross-attention (text queries over ALL image tokens) -> MLP, all pre-norm."""

    def __init__(self, width: int, heads: int, ctx_width: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, attn_drop=dropout, proj_drop=dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads, kv_dim=ctx_width, attn_drop=dropout, proj_drop=dropout)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = _mlp(width, mlp_ratio, dropout)

    def forward(
        self,
        x: Tensor,
        image_tokens: Tensor | None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        image_index: Tensor | int | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.ln_1(x), is_causal=True, cache=self_cache)
        x = x + self.cross_attn(self.ln_2(x), image_tokens, cache=cross_cache, context_index=image_index)
        return x + self.mlp(self.ln_3(x))


@dataclass
class DecodingCache:
    """Every layer's keys/values during generation: the text encoder's and decoder's self-attention (growing, or
    fixed-size buffers for a static cache) and the decoder's cross-attention over the image (computed once per
    image).

    A static cache (:meth:`static`) keeps the self-attention keys/values in :class:`StaticKVCache` buffers of
    ``capacity`` positions written at the device position ``pos``, so that every step has the same shapes and
    addresses (what a CUDA graph needs); ``steps`` counts the positions on the host."""

    text: list[KVCache | StaticKVCache] = field(default_factory=list)
    dec_self: list[KVCache | StaticKVCache] = field(default_factory=list)
    dec_cross: list[KVCache] = field(default_factory=list)
    pos: Tensor | None = None
    capacity: int = 0
    steps: int = 0

    @classmethod
    def empty(cls, text_layers: int, decoder_layers: int) -> DecodingCache:
        return cls(
            [KVCache() for _ in range(text_layers)],
            [KVCache() for _ in range(decoder_layers)],
            [KVCache() for _ in range(decoder_layers)],
        )

    @classmethod
    def static(
        cls, text_layers: int, decoder_layers: int, capacity: int, device: torch.device | str | None = None
    ) -> DecodingCache:
        pos = torch.zeros(1, dtype=torch.long, device=device)
        return cls(
            [StaticKVCache(pos, capacity) for _ in range(text_layers)],
            [StaticKVCache(pos, capacity) for _ in range(decoder_layers)],
            [KVCache() for _ in range(decoder_layers)],
            pos=pos,
            capacity=capacity,
        )

    @property
    def is_static(self) -> bool:
        return self.pos is not None

    @property
    def length(self) -> int:
        if self.is_static:
            return self.steps
        return self.text[0].length if self.text else 0

    def reserve(self, t: int) -> None:
        """Host-side bookkeeping before a static step of ``t`` positions (the device position moves in the step)."""
        if self.steps + t > self.capacity:
            raise ValueError(f"generation would exceed the static cache's {self.capacity} positions")
        self.steps += t

    def reset(self) -> None:
        """Empty a static cache for the next sequence (buffers zeroed, position 0); cross-attention is kept."""
        if not self.is_static:
            raise ValueError("reset empties a static cache; a growing cache is made anew for each sequence")
        for c in (*self.text, *self.dec_self):
            c.reset()
        self.pos.zero_()
        self.steps = 0

    def reorder(self, index: Tensor, same_image: bool = True) -> None:
        """Select batch rows (beam search); ``index`` is (B',) into the current batch.

        Beam search only ever moves a row to another beam of the SAME image, whose cross-attention keys/values
        are identical, so those are left in place unless ``same_image=False``."""
        caches = (*self.text, *self.dec_self) if same_image else (*self.text, *self.dec_self, *self.dec_cross)
        for c in caches:
            c.reorder(index)


class TextEncoder(nn.Module):
    """Causal transformer over ``[tokens (T), CLS]``; CLS comes last and always carries the position code of index
    ``context_length`` (the index it has in training, where T = ``context_length``), whatever the ids' width T.

    The padding of every row is masked as keys, so CLS sees exactly the row's real tokens wherever padding
    starts (open_clip builds its CLS mask from the wrong ids in some versions; here the mask is the pad ids
    themselves), and since neither its position code nor its keys depend on the pad columns, a caption embeds the
    same padded to any width (alone, in a batch with longer captions, or as ids cut from ``generate``). Token
    states are causal, hence independent of what follows: the decoder can read them and generation can cache them.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + 1, W))  # +1: CLS
        self.cls_token = nn.Parameter(torch.empty(W))
        self.blocks = nn.ModuleList(TextBlock(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(W)
        self.text_projection = nn.Linear(W, embed_dim, bias=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids (B, T) -> (text embedding (B, E) unnormalised, token states (B, T, W))."""
        B, T = ids.shape
        if T > self.cfg.context_length:
            raise ValueError(f"token ids have {T} positions; this model's context_length is {self.cfg.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:T]  # (B, T, W)
        # CLS at the fixed index context_length, not T: trailing pad columns must not change the embedding
        cls = (self.cls_token + self.positional_embedding[self.cfg.context_length]).expand(B, 1, -1)
        x = torch.cat([x, cls], dim=1)  # (B, T+1, W)
        pad = torch.cat([ids == self.cfg.pad_id, ids.new_zeros(B, 1, dtype=torch.bool)], dim=1)  # (B, T+1)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, pad, use_reentrant=False)
            else:
                x = blk(x, key_padding_mask=pad)
        x = self.ln_final(x)
        # Pad positions' states are never used: the decoder only reads positions whose next token is real.
        return self.text_projection(x[:, -1]), x[:, :-1]

    def step(self, ids: Tensor, caches: Sequence[KVCache | StaticKVCache]) -> Tensor:
        """Incremental token states for generation: ids (B, t) continuing the cached prefix -> (B, t, W)."""
        t = ids.shape[1]
        if isinstance(caches[0], StaticKVCache):  # position from the device: no host value in the step
            if caches[0].capacity > self.cfg.context_length:
                raise ValueError(f"a static cache of {caches[0].capacity} positions exceeds context_length")
            where = caches[0].pos + torch.arange(t, device=ids.device)
            x = self.token_embedding(ids) + self.positional_embedding.index_select(0, where)
        else:
            past = caches[0].length
            if past + t > self.cfg.context_length:
                raise ValueError(f"generation would exceed context_length={self.cfg.context_length}")
            x = self.token_embedding(ids) + self.positional_embedding[past : past + t]
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, cache=cache)
        return self.ln_final(x)


class MultimodalDecoder(nn.Module):
    """``N`` decoder blocks reading image tokens, then a LayerNorm; the LM head lives on the model so that it
    can be tied to the token embedding."""

    def __init__(self, cfg: TextConfig, ctx_width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.width, cfg.heads, ctx_width, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.decoder_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(
        self,
        x: Tensor,
        image_tokens: Tensor | None,
        self_caches: Sequence[KVCache] | None = None,
        cross_caches: Sequence[KVCache] | None = None,
        image_index: Tensor | int | None = None,
    ) -> Tensor:
        """x (B, T, W) text states, image_tokens (B, L, D) -> (B, T, W). With ``image_index`` (B,), image_tokens
        holds fewer rows (N, L, D) and text row ``i`` reads image ``image_index[i]``: every image's keys/values
        are projected once however many captions read it; when the captions of each image are consecutive and
        equally many, each image's caption rows attend as one query block (no gather, see ``Attention``)."""
        if image_index is not None and image_tokens is not None:
            image_index = uniform_repeats(image_index, image_tokens.shape[0])
        for i, blk in enumerate(self.blocks):
            if self_caches is not None:
                x = blk(x, image_tokens, self_caches[i], cross_caches[i], image_index)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, image_tokens, None, None, image_index, use_reentrant=False)
            else:
                x = blk(x, image_tokens, image_index=image_index)
        return self.ln_final(x)


class AttentionalPooler(nn.Module):
    """One learned query cross-attending to all image tokens -> the retrieval embedding (CoCa's contrastive
    pooler, Yu et al. 2022, with n_queries = 1)."""

    def __init__(self, width: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.ln_q = nn.LayerNorm(width)
        self.attn = Attention(width, heads, kv_dim=width)
        self.ln_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, image_tokens: Tensor) -> Tensor:
        """(B, L, D) -> (B, E), unnormalised."""
        q = self.ln_q(self.query).expand(image_tokens.shape[0], -1, -1)  # (B, 1, D)
        return self.proj(self.ln_out(self.attn(q, image_tokens)[:, 0]))


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position code of a (h, w) grid on normalised coordinates -> (h*w, dim).

    Coordinates are cell centres in [0, 1], so tokens of different stages (different grid sizes) that cover the
    same place of the image get similar codes: the decoder can point at places whatever stage a token came from.
    Half the channels encode rows, half columns; frequencies are geometric from 1 to 64 cycles per image.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    n = dim // 4
    freqs = torch.logspace(0, math.log10(64.0), n, device=device) * (2 * math.pi)  # (n,)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) row-major, like the encoder's tokens
    y = yy.reshape(-1, 1) * freqs  # (h*w, n)
    x = xx.reshape(-1, 1) * freqs
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


class ImageTokenProjector(nn.Module):
    """Per chosen stage: LayerNorm -> Linear(C_s, D), plus the fixed 2-D position code and a learned stage
    embedding; stages are concatenated into one token sequence (B, L, D)."""

    def __init__(self, stage_dims: Sequence[int], width: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in stage_dims)
        self.projs = nn.ModuleList(nn.Linear(c, width) for c in stage_dims)
        self.stage_embed = nn.Parameter(torch.zeros(len(stage_dims), width))
        self.pos_scale = nn.Parameter(torch.full((1,), 0.5))  # (1,), not 0-d: FSDP refuses 0-d parameters
        self.ln_post = nn.LayerNorm(width)
        self.width = width
        self._pos_cache: dict[tuple[int, int, str], Tensor] = {}

    def _pos(self, h: int, w: int, device: torch.device) -> Tensor:
        """The (h*w, D) position code of a grid, built once per (h, w, device) and cached."""
        key = (h, w, str(device))
        pos = self._pos_cache.get(key)
        if pos is None:
            # (is_compiling first: torch.compile cannot trace is_inference_mode_enabled; compiled training runs
            # outside inference mode)
            if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
                # A code built under inference_mode would be an inference tensor, which autograd refuses to save
                # for backward: once cached, every later training step would fail. Build a normal tensor.
                with torch.inference_mode(False):
                    pos = sincos_2d(h, w, self.width, device)
            else:
                pos = sincos_2d(h, w, self.width, device)
            self._pos_cache[key] = pos
        return pos

    def forward(self, stage_tokens: Sequence[Tensor], grids: Sequence[tuple[int, int]]) -> Tensor:
        out = []
        for i, (tok, (h, w)) in enumerate(zip(stage_tokens, grids)):
            if tok.shape[1] != h * w:
                raise ValueError(f"stage token count {tok.shape[1]} does not match its grid {h}x{w}")
            x = self.projs[i](self.norms[i](tok))  # (B, h*w, D)
            out.append(x + self.pos_scale * self._pos(h, w, tok.device).to(x.dtype) + self.stage_embed[i])
        return self.ln_post(torch.cat(out, dim=1))


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)
