"""Attention overlays as matplotlib figures: the decoder's cross-attention per generated word, CAT's IPSA/CPSA
weights, and retrieval results.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: nothing here opens a
window, touches pyplot's global figure list or changes the backend, so it is safe in training callbacks, on
headless machines and in notebooks (Jupyter displays a returned ``Figure``). Save with :func:`figure_to_png`.

Geometry. Token ``(r, c)`` of CAT stage ``s`` covers pixels ``[r * S, (r + 1) * S) x [c * S, (c + 1) * S)`` with
``S = patch_size * 2**s`` (the stem and patch merging pad right/bottom only), so maps are drawn with an explicit
pixel ``extent`` (or upsampled to the padded size and cropped): row = y downwards, column = x, never transposed.

Encoder layer names (``plot_encoder_attention(layer=...)``) are those of ``CATEncoder.named_modules()``:
``"layers.{stage}.{pre_ipsa_blocks|cpsa_blocks|post_ipsa_blocks}.{index}.attn"``, e.g.
``"layers.0.cpsa_blocks.0.attn"`` (a ``"visual."`` prefix and a missing ``".attn"`` are accepted), or a tuple
``(stage, kind, index)`` with kind ``"ipsa"`` (= ``"pre_ipsa"``), ``"post_ipsa"`` or ``"cpsa"``.
"""

from __future__ import annotations

import contextlib
import math
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from .capture import capture_attention
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .metrics import token_heatmap
from .vision.windows import WindowGrid

__all__ = [
    "CaptionAttention",
    "EncoderAttention",
    "caption_attention",
    "encoder_attention",
    "figure_to_png",
    "plot_caption_attention",
    "plot_encoder_attention",
    "plot_retrieval",
    "resolve_encoder_layer",
]

DEFAULT_DPI = 100
CMAP = "jet"  # readable over the shapes' dark textured backgrounds and natural images alike
ALPHA = 0.5


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """eval mode + no_grad, restoring the previous mode (callbacks run this in the middle of training)."""
    from .model import eval_mode

    with eval_mode(model), torch.no_grad():
        yield


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _one_image(model: nn.Module, image: Any, preprocess: Any) -> Tensor:
    """(3,H,W) / (1,3,H,W) normalised float tensor, PIL image or path -> (1, 3, H, W) on the model's device."""
    if isinstance(image, Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[:2] != (1, 3):
            raise ValueError(
                f"image: expected ONE image as a (3, H, W) or (1, 3, H, W) tensor, got {tuple(image.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"image: expected a normalised float tensor, got dtype {x.dtype} (pass a PIL image/path)")
        return x.to(_device(model))
    if isinstance(image, (list, tuple)):
        raise ValueError(f"image: expected ONE image (tensor, PIL image or path), got a {type(image).__name__}")
    return preprocess(image).to(_device(model))


def _norm_stats(model: nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    t = getattr(model, "transform", None)
    return getattr(t, "mean", None) or IMAGENET_MEAN, getattr(t, "std", None) or IMAGENET_STD


def _display(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised (1, 3, H, W) -> (H, W, 3) float in [0, 1] on the CPU."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x[0].detach().float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0)


def _token_stride(visual: nn.Module, stage: int) -> int | None:
    """Pixels per token side of ``stage`` for CAT (None for encoders whose stride is not known here)."""
    cfg = getattr(visual, "cfg", None)
    patch = getattr(cfg, "patch_size", None)
    return None if patch is None else int(patch) * 2**stage


def _label(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"#{token_id}"
    return tokenizer.decode([token_id]).strip() or f"#{token_id}"


def _hide_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------- caption attention
@dataclass
class CaptionAttention:
    """Decoder cross-attention behind one generated caption.

    ``token_maps[i]`` is the attention (mean over heads and decoder layers) of the step that generated word ``i``
    spread over the finest token grid (sums to 1); ``heatmaps[i]`` the same upsampled (bilinear) to the image's
    pixels, value per pixel = the weight of the token cell around it.
    """

    caption: str
    words: list[str]
    token_ids: list[int]
    token_maps: Tensor  # (n_words, Hf, Wf)
    heatmaps: Tensor  # (n_words, H, W)
    image: Tensor  # (H, W, 3) in [0, 1]


def _caption_attention(model: nn.Module, image: Any, **gen_kwargs: Any) -> CaptionAttention:
    if "image_tokens" in gen_kwargs or "images" in gen_kwargs:
        raise ValueError("caption_attention: pass the image as `image`, not images=/image_tokens=")
    n_dec = len(model.decoder.blocks)
    names = [f"decoder.blocks.{i}.cross_attn" for i in range(n_dec)]
    wanted = set(names)
    with _inference(model):
        x = _one_image(model, image, model.preprocess)  # (1, 3, H, W)
        tokens = model.encode_image_tokens(x)  # (1, L, D)
        # The caption is generated as model.caption generates it (fused attention, no capture: the same words, not
        # a near-tie decided otherwise by the eager path), then its attention recomputed teacher-forced in one
        # decoder pass: causal, so row t is what the step that chose token t+1 saw (beam steps also attend for
        # hypotheses that lose, and reorder them: only this recomputation follows the chosen one).
        ids = model.generate(image_tokens=tokens, **gen_kwargs)
        with capture_attention(model, which=lambda n: n in wanted, to_cpu=True) as maps:
            _, states = model.text(ids)
            model.decoder(states[:, :-1], tokens)
        per_layer = [maps[n][0].mean(0) for n in names]  # (T-1, L): query t predicts token t+1
    att = torch.stack(per_layer).mean(0).float()  # (steps, L); row i generated ids[0, i + 1]
    cfg = model.cfg.text
    row = ids[0, 1:].tolist()
    n = 0
    while n < len(row) and row[n] not in (cfg.eos_id, cfg.pad_id):
        n += 1
    token_ids = row[:n]
    H, W = x.shape[-2:]
    all_grids = model.visual.grid_sizes(H, W)
    grids = [all_grids[s] for s in model.stages]
    maps_ = token_heatmap(att[:n], grids)  # (n, Hf, Wf)
    heat = _to_pixels(maps_, model.visual, min(model.stages), (H, W))
    tok = getattr(model, "tokenizer", None)
    words = [_label(tok, t) for t in token_ids]
    caption = tok.decode(ids[0]) if tok is not None else " ".join(words)
    return CaptionAttention(caption, words, token_ids, maps_, heat, _display(x, *_norm_stats(model)))


def _to_pixels(maps: Tensor, visual: nn.Module, finest_stage: int, size: tuple[int, int]) -> Tensor:
    """(n, Hf, Wf) token-grid maps -> (n, H, W) pixels, bilinear, aligned with the padded token grid."""
    n, Hf, Wf = maps.shape
    H, W = size
    stride = _token_stride(visual, finest_stage)
    if stride is None or Hf * stride < H or Wf * stride < W:
        return F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    # the grid covers the image padded right/bottom to (Hf * stride, Wf * stride): upsample that, then crop
    up = F.interpolate(maps[:, None], size=(Hf * stride, Wf * stride), mode="bilinear", align_corners=False)
    return up[:, 0, :H, :W]


def caption_attention(model: nn.Module, image: Any, **gen_kwargs: Any) -> tuple[list[str], Tensor, Tensor]:
    """Caption ONE image and return, per generated word, where the decoder looked when it produced it.

    Args:
        model: an :class:`~mmxattn.model.MMXAttn` (words come from ``model.tokenizer``; ``#id`` without one).
        image: a normalised (3, H, W) / (1, 3, H, W) tensor, a PIL image or an image path (``model.preprocess``).
        gen_kwargs: for ``model.generate`` (greedy by default).
    Returns:
        ``words`` (n), ``heatmaps`` (n, H, W) (cross-attention averaged over heads and decoder layers, mapped to
        the image plane with :func:`mmxattn.metrics.token_heatmap` and upsampled bilinearly; each map's token cells
        sum to 1), ``image`` (H, W, 3) float in [0, 1] (un-normalised with the model's transform mean/std,
        ImageNet's by default).
    """
    r = _caption_attention(model, image, **gen_kwargs)
    return r.words, r.heatmaps, r.image


def plot_caption_attention(
    model: nn.Module,
    image: Any,
    max_words: int = 12,
    ncols: int = 4,
    cmap: str = CMAP,
    alpha: float = ALPHA,
    *,
    attention: CaptionAttention | None = None,
    **gen_kwargs: Any,
) -> Figure:
    """The generated caption as the title and one panel per word (up to ``max_words``): the image with the word's
    cross-attention heatmap overlaid, the word as the panel's title, one colour bar shared by all panels (in units
    of uniform attention: 1 = every token cell equally, 4 = four times its share). ``attention``: an already
    computed result for this image (what the CLI prints the caption of) instead of generating again."""
    if max_words < 1 or ncols < 1:
        raise ValueError(f"max_words and ncols must be >= 1, got {max_words}, {ncols}")
    r = attention if attention is not None else _caption_attention(model, image, **gen_kwargs)
    n = min(len(r.words), max_words)
    H, W = r.image.shape[:2]
    cols = max(1, min(n, ncols))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.3 * cols + 0.8, 2.4 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    title = r.caption if r.caption else "(empty caption)"
    if len(r.words) > n:
        title += f"   [first {n} of {len(r.words)} words shown]"
    fig.suptitle(textwrap.fill(title, width=int(28 * cols)), fontsize=12)
    cells = r.token_maps.shape[-1] * r.token_maps.shape[-2]
    heat = (r.heatmaps[:n] * cells).numpy()  # (n, H, W), 1 = uniform
    # the scale reaches at least 2x uniform, so a flat (untrained) map reads as flat, not as a focus
    vmax = max(float(heat.max()) if n else 0.0, 2.0)
    im = None
    for i, ax in enumerate(axes):
        _hide_ticks(ax)
        if i >= max(n, 1):
            ax.set_visible(False)
            continue
        ax.imshow(r.image.numpy(), extent=(0, W, H, 0), interpolation="nearest")
        if n:
            im = ax.imshow(heat[i], extent=(0, W, H, 0), cmap=cmap, alpha=alpha, vmin=0.0, vmax=vmax)
            ax.set_title(r.words[i], fontsize=13, fontweight="bold")
        else:
            ax.set_title("(no words)", fontsize=11)
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes[:n]), shrink=0.8, pad=0.02)
        cb.set_label("attention / uniform")
    return fig


# ---------------------------------------------------------------------------------------- encoder attention
_BLOCKS = {
    "ipsa": "pre_ipsa_blocks",
    "pre_ipsa": "pre_ipsa_blocks",
    "post_ipsa": "post_ipsa_blocks",
    "cpsa": "cpsa_blocks",
}
_NAME = re.compile(r"^layers\.(\d+)\.(pre_ipsa_blocks|post_ipsa_blocks|cpsa_blocks)\.(\d+)\.attn$")


def _encoder_of(model_or_encoder: nn.Module) -> nn.Module:
    enc = getattr(model_or_encoder, "visual", model_or_encoder)
    if not (hasattr(enc, "layers") and hasattr(enc, "grid_sizes") and hasattr(getattr(enc, "cfg", None), "patch_size")):
        raise TypeError(
            f"plot_encoder_attention needs a CAT encoder (or a model whose .visual is one), got {type(enc).__name__}"
        )
    return enc


def resolve_encoder_layer(encoder: nn.Module, layer: str | tuple[int, str, int]) -> tuple[str, int, str]:
    """A layer given as a name or ``(stage, kind, index)`` -> (module name in the encoder, stage, "ipsa"|"cpsa")."""
    enc = _encoder_of(encoder)
    if isinstance(layer, tuple):
        if len(layer) != 3 or str(layer[1]).lower() not in _BLOCKS:
            raise ValueError(f"layer: expected (stage, kind, index) with kind in {sorted(_BLOCKS)}, got {layer!r}")
        stage, kind, index = layer
        n = len(enc.layers)
        if not -n <= int(stage) < n:
            raise ValueError(
                f"layer: stage {stage} out of range for an encoder with {n} stages (0..{n - 1} or -1..-{n})"
            )
        name = f"layers.{int(stage) % n}.{_BLOCKS[str(kind).lower()]}.{int(index)}.attn"
    elif isinstance(layer, str):
        name = layer.removeprefix("visual.")
        name = name if name.endswith(".attn") else name + ".attn"
    else:
        raise TypeError(f"layer: expected a name or a (stage, kind, index) tuple, got {type(layer).__name__}")
    m = _NAME.match(name)
    modules = dict(enc.named_modules())
    if m is None or name not in modules:
        known = [n for n in modules if _NAME.match(n)]
        raise ValueError(f"layer {layer!r} is not an IPSA/CPSA attention of this encoder; available: {known}")
    return name, int(m.group(1)), "cpsa" if m.group(2) == "cpsa_blocks" else "ipsa"


@dataclass
class EncoderAttention:
    """Post-softmax weights of one CAT attention layer for one image.

    IPSA ``weights`` are ``(nW, heads, N, N)`` (windows row-major over the window grid, ``N = p*p`` tokens
    row-major inside a window); CPSA ``weights`` are ``(nW, nW)``, the window-to-window attention averaged over
    channels (CPSA has one head per channel, shared weights).
    """

    layer: str
    kind: str  # "ipsa" | "cpsa"
    stage: int
    grid: tuple[int, int]  # (h, w) tokens of the stage
    window: int  # p
    windows: tuple[int, int]  # (rows, cols) of the (padded) window grid
    stride: int  # pixels per token side
    weights: Tensor
    image: Tensor  # (H, W, 3) in [0, 1]

    def window_of(self, token: tuple[int, int]) -> int:
        r, c = token
        return (r // self.window) * self.windows[1] + c // self.window

    def centre_token(self) -> tuple[int, int]:
        return self.grid[0] // 2, self.grid[1] // 2

    def _tile(self, per_window: Tensor) -> Tensor:
        """(nW, N) per-window token values -> (rows * p, cols * p) on the padded token grid."""
        (rows, cols), p = self.windows, self.window
        return per_window.reshape(rows, cols, p, p).transpose(1, 2).reshape(rows * p, cols * p)

    def ipsa_query_map(self, query: tuple[int, int]) -> Tensor:
        """(rows*p, cols*p): the query token's attention (mean over heads) inside its window, NaN elsewhere."""
        r, c = query
        p = self.window
        full = torch.full((self.windows[0] * p, self.windows[1] * p), float("nan"))
        wr, wc = r // p, c // p
        row = self.weights[self.window_of(query), :, (r % p) * p + c % p].mean(0)  # (N,)
        full[wr * p : (wr + 1) * p, wc * p : (wc + 1) * p] = row.view(p, p)
        return full

    def ipsa_mean_map(self) -> Tensor:
        """(rows*p, cols*p): attention each token receives, averaged over heads and the real queries of its window."""
        w = self.weights.mean(1)  # (nW, N, N)
        valid = WindowGrid(*self.grid, self.window).valid(torch.device("cpu"))
        q_ok = torch.ones(w.shape[:2]) if valid is None else valid.view(w.shape[0], w.shape[1]).float()  # (nW, N)
        received = (w * q_ok[:, :, None]).sum(1) / q_ok.sum(1, keepdim=True).clamp_min(1)  # (nW, N)
        return self._tile(received)

    def cpsa_query_map(self, window: int) -> Tensor:
        """(rows, cols): how much query window ``window`` attends to every window."""
        return self.weights[window].view(*self.windows)

    def cpsa_mean_map(self) -> Tensor:
        """(rows, cols): attention each window receives, averaged over query windows."""
        return self.weights.mean(0).view(*self.windows)


def encoder_attention(
    model_or_encoder: nn.Module, image: Any, layers: Sequence[str | tuple[int, str, int]]
) -> list[EncoderAttention]:
    """Weights of several CAT attention layers for one image, from ONE encoder pass (up to the deepest stage)."""
    enc = _encoder_of(model_or_encoder)
    resolved = [resolve_encoder_layer(enc, layer) for layer in layers]
    owner = model_or_encoder if hasattr(model_or_encoder, "preprocess") else None

    def preprocess(img: Any) -> Tensor:
        if owner is not None:
            return owner.preprocess(img)
        from PIL import Image

        from .data.formats import load_image
        from .data.robust import to_rgb
        from .data.transforms import build_transforms

        img = img if isinstance(img, Image.Image) else load_image(img, min_size=1)
        # alpha on white, 16-bit and float rescaled: what the model's own preprocess (and training) does
        return build_transforms(enc.cfg.img_size, train=False)(to_rgb(img))[None]

    wanted = {name for name, _, _ in resolved}
    with _inference(enc):
        x = _one_image(enc, image, preprocess)
        with capture_attention(enc, which=lambda n: n in wanted, to_cpu=True) as maps:
            enc.forward_features(x, stages=[max(s for _, s, _ in resolved)])
    H, W = x.shape[-2:]
    shown = _display(x, *_norm_stats(owner if owner is not None else enc))
    out = []
    for name, stage, kind in resolved:
        h, w = enc.grid_sizes(H, W)[stage]
        p = enc.layers[stage].window
        g = WindowGrid(h, w, p)
        weights = maps[name].float()
        if kind == "cpsa":
            weights = weights[:, 0].mean(0)  # (C, 1, nW, nW) -> (nW, nW): B = 1, mean over channels
        out.append(
            EncoderAttention(name, kind, stage, (h, w), p, (g.rows, g.cols), _token_stride(enc, stage), weights, shown)
        )
    return out


def _overlay(ax: Any, ea: EncoderAttention, values: Tensor, cmap: str, alpha: float, fig: Figure) -> None:
    """Draw ``values`` laid over the padded token grid ((rows*p, cols*p) or (rows, cols)) on the image."""
    H, W = ea.image.shape[:2]
    (rows, cols), p, s = ea.windows, ea.window, ea.stride
    ax.imshow(ea.image.numpy(), extent=(0, W, H, 0), interpolation="nearest")
    im = ax.imshow(values.numpy(), extent=(0, cols * p * s, rows * p * s, 0), cmap=cmap, alpha=alpha,
                   interpolation="nearest")  # fmt: skip
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    _hide_ticks(ax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)


def _box(ax: Any, x0: float, y0: float, size: float, colour: str = "white") -> None:
    ax.add_patch(Rectangle((x0, y0), size, size, fill=False, edgecolor=colour, linewidth=1.8))


def _plot_ipsa(sub: Any, ea: EncoderAttention, query: tuple[int, int], cmap: str, alpha: float) -> None:
    axes = sub.subplots(1, 3)
    p, s = ea.window, ea.stride
    r, c = query
    _overlay(axes[0], ea, ea.ipsa_query_map(query), cmap, alpha, sub)
    _box(axes[0], c * s, r * s, s)
    _box(axes[0], (c // p) * p * s, (r // p) * p * s, p * s, "cyan")
    axes[0].set_title(f"query token ({r}, {c}) in its window")
    row = ea.weights[ea.window_of(query), :, (r % p) * p + c % p].mean(0).view(p, p)  # (p, p)
    im = axes[1].imshow(row.numpy(), cmap=cmap, interpolation="nearest")
    axes[1].add_patch(Rectangle((c % p - 0.5, r % p - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.8))
    axes[1].set_title(f"{p}x{p} window weights")
    axes[1].set_xticks(range(p))
    axes[1].set_yticks(range(p))
    axes[1].set_xlabel("key column")
    axes[1].set_ylabel("key row")
    sub.colorbar(im, ax=axes[1], fraction=0.046, pad=0.03)
    _overlay(axes[2], ea, ea.ipsa_mean_map(), cmap, alpha, sub)
    axes[2].set_title("mean attention received")
    heads = ea.weights.shape[1]
    sub.suptitle(f"IPSA {ea.layer}  (stage {ea.stage}, {ea.grid[0]}x{ea.grid[1]} tokens, mean of {heads} heads)")


def _plot_cpsa(sub: Any, ea: EncoderAttention, window: int, cmap: str, alpha: float) -> None:
    axes = sub.subplots(1, 3)
    (rows, cols), p, s = ea.windows, ea.window, ea.stride
    im = axes[0].imshow(ea.weights.numpy(), cmap=cmap, interpolation="nearest")
    axes[0].set_xlabel("key window")
    axes[0].set_ylabel("query window")
    for axis in (axes[0].xaxis, axes[0].yaxis):
        axis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    axes[0].set_title(f"window-to-window ({rows * cols}x{rows * cols})")
    axes[0].axhline(window, color="white", linewidth=0.8)
    sub.colorbar(im, ax=axes[0], fraction=0.046, pad=0.03)
    _overlay(axes[1], ea, ea.cpsa_query_map(window), cmap, alpha, sub)
    wr, wc = divmod(window, cols)
    _box(axes[1], wc * p * s, wr * p * s, p * s)
    axes[1].set_title(f"query window {window} ({wr}, {wc})")
    _overlay(axes[2], ea, ea.cpsa_mean_map(), cmap, alpha, sub)
    axes[2].set_title("mean attention received")
    sub.suptitle(f"CPSA {ea.layer}  (stage {ea.stage}, {p}x{p} windows, mean over channels)")


def plot_encoder_attention(
    model_or_encoder: nn.Module,
    image: Any,
    layer: str | tuple[int, str, int] | Sequence[str | tuple[int, str, int]] = "layers.0.cpsa_blocks.0.attn",
    window: int | tuple[int, int] | None = None,
    query: tuple[int, int] | None = None,
    cmap: str = CMAP,
    alpha: float = ALPHA,
) -> Figure:
    """CAT encoder attention of one image for one layer (or a list of layers, one row each; one encoder pass).

    IPSA rows: the attention of token ``query`` = (row, col) of the stage's token grid (default: the centre token;
    with ``window`` alone, that window's centre) over its p x p window, drawn at the window's place on the image;
    the p x p weights themselves; and the mean attention each token receives from its window (all mean over heads).
    CPSA rows: the nW x nW window-to-window matrix (mean over channels); the row of the query window (``window``,
    an index row-major over the window grid or (window row, window col); default: the window of ``query`` or of
    the centre token) over the image; and the mean attention each window receives.
    See the module docstring for layer names.
    """
    layers = [layer] if isinstance(layer, (str, tuple)) else list(layer)
    if not layers:
        raise ValueError("layer: give at least one layer")
    results = encoder_attention(model_or_encoder, image, layers)
    fig = Figure(figsize=(12.5, 3.9 * len(results)), layout="constrained")
    subs = fig.subfigures(len(results), 1, squeeze=False).ravel()
    for sub, ea in zip(subs, results):
        q, win = _query_and_window(ea, window, query)
        if ea.kind == "ipsa":
            _plot_ipsa(sub, ea, q, cmap, alpha)
        else:
            _plot_cpsa(sub, ea, win, cmap, alpha)
    return fig


def _query_and_window(
    ea: EncoderAttention, window: int | tuple[int, int] | None, query: tuple[int, int] | None
) -> tuple[tuple[int, int], int]:
    rows, cols = ea.windows
    p = ea.window
    if window is not None:
        w = window[0] * cols + window[1] if isinstance(window, tuple) else int(window)
        if not 0 <= w < rows * cols:
            raise ValueError(f"window: {window!r} is outside the {rows}x{cols} window grid of {ea.layer}")
    if query is not None:
        r, c = int(query[0]), int(query[1])
        if not (0 <= r < ea.grid[0] and 0 <= c < ea.grid[1]):
            raise ValueError(f"query: token {query!r} is outside the {ea.grid[0]}x{ea.grid[1]} grid of {ea.layer}")
        if window is not None and ea.window_of((r, c)) != w:
            raise ValueError(f"query: token {query!r} is not in window {window!r} of {ea.layer}")
        return (r, c), ea.window_of((r, c))
    if window is not None:
        wr, wc = divmod(w, cols)
        # centre of the window's real tokens (a padded edge window may be partly outside the grid)
        r = min(wr * p + p // 2, ea.grid[0] - 1)
        c = min(wc * p + p // 2, ea.grid[1] - 1)
        return (r, c), w
    centre = ea.centre_token()
    return centre, ea.window_of(centre)


# ---------------------------------------------------------------------------------------------- retrieval
def _encode_images(model: nn.Module, images: Any, batch_size: int) -> tuple[Tensor, list[Tensor]]:
    """Gallery -> (N, E) embeddings and the (H, W, 3) display images."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"gallery: expected (N, 3, H, W) image tensors, got {tuple(images.shape)}")
        items: list[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise TypeError(f"gallery: expected a tensor (N, 3, H, W) or a list of images, got {type(images).__name__}")
    if not items:
        raise ValueError("gallery: no images")
    stats = _norm_stats(model)
    embeds, shown = [], []
    for i in range(0, len(items), batch_size):
        x = model.preprocess(items[i : i + batch_size]).to(_device(model))  # (b, 3, H, W)
        embeds.append(model.encode_image(x))
        shown += [_display(xi[None], *stats) for xi in x]
    return torch.cat(embeds), shown


def plot_retrieval(
    model: nn.Module,
    query: Any,
    gallery: Any,
    k: int = 5,
    direction: str = "t2i",
    relevant: Sequence[int] | None = None,
    batch_size: int = 64,
) -> Figure:
    """Top-k retrieval by embedding cosine.

    ``direction="t2i"``: ``query`` is a caption, ``gallery`` images (an (N, 3, H, W) tensor or a list of tensors /
    PIL images / paths); one panel per retrieved image titled with its rank, index and score.
    ``direction="i2t"``: ``query`` is one image, ``gallery`` a list of captions; the image and the ranked captions.
    ``relevant``: gallery indices of correct answers, marked green (others red).
    """
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    good = set(relevant or [])
    with _inference(model):
        if direction == "t2i":
            if not isinstance(query, str):
                raise TypeError(f"query: direction 't2i' needs a caption (str), got {type(query).__name__}")
            img_emb, shown = _encode_images(model, gallery, batch_size)
            scores = (img_emb @ model.encode_text([query]).T)[:, 0].float().cpu()  # (N,)
        else:
            if isinstance(gallery, str) or not all(isinstance(t, str) for t in gallery) or not gallery:
                raise TypeError("gallery: direction 'i2t' needs a non-empty list of captions (str)")
            x = _one_image(model, query, model.preprocess)
            txt = torch.cat(
                [model.encode_text(list(gallery[i : i + batch_size])) for i in range(0, len(gallery), batch_size)]
            )
            scores = (model.encode_image(x) @ txt.T)[0].float().cpu()  # (N,)
            shown = [_display(x, *_norm_stats(model))]
    kk = min(k, scores.shape[0])
    top_s, top_i = scores.topk(kk)
    if direction == "t2i":
        fig = Figure(figsize=(2.3 * kk + 0.4, 3.0), layout="constrained")
        axes = fig.subplots(1, kk, squeeze=False).ravel()
        for rank, (ax, i, sc) in enumerate(zip(axes, top_i.tolist(), top_s.tolist()), 1):
            ax.imshow(shown[i].numpy(), interpolation="nearest")
            _hide_ticks(ax)
            ax.set_title(f"#{rank}  [{i}]  {sc:.3f}", fontsize=11)
            if good:
                for spine in ax.spines.values():
                    spine.set_edgecolor("limegreen" if i in good else "red")
                    spine.set_linewidth(3)
        fig.suptitle(textwrap.fill(f'"{query}"  -> top {kk} of {scores.shape[0]} images', 30 * kk), fontsize=12)
        return fig
    fig = Figure(figsize=(9.0, max(2.8, 0.42 * kk + 1.0)), layout="constrained")
    ax_img, ax_txt = fig.subplots(1, 2, width_ratios=[1, 2.6])
    ax_img.imshow(shown[0].numpy(), interpolation="nearest")
    _hide_ticks(ax_img)
    ax_img.set_title("query image")
    ax_txt.axis("off")
    ax_txt.set_title(f"top {kk} of {scores.shape[0]} captions", loc="left")
    for rank, (i, sc) in enumerate(zip(top_i.tolist(), top_s.tolist())):
        colour, mark = (("darkgreen", "\u2713 ") if i in good else ("darkred", "\u2717 ")) if good else ("black", "")
        text = textwrap.shorten(f"{mark}{rank + 1}. {sc:.3f}  {gallery[i]}  [{i}]", 90)
        ax_txt.text(0.0, 1.0 - (rank + 0.5) / max(kk, 5), text, fontsize=11, color=colour, va="center",
                    transform=ax_txt.transAxes)  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------------- saving
def figure_to_png(fig: Figure, path: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as a PNG at a fixed dpi (parents created) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", facecolor="white")
    if getattr(fig.canvas, "manager", None) is not None:  # made through pyplot: release it from pyplot's registry
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
