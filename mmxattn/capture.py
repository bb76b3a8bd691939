"""Opt-in recording of post-softmax attention weights.

``with capture_attention(model) as maps: model(...)`` switches the selected :class:`~mmxattn.attention.Attention`
modules to the eager path for the duration of the block and records their weights under the module's name. Outside
the block nothing is stored and the fused path is untouched: the only trace a capture leaves on a module is an
attribute set back to ``None`` on exit.

Weights are ``(B, nh, L, S)`` as the module saw them: CAT's IPSA gives ``(B * windows, heads, p*p, p*p)``, CPSA
``(B * C, 1, windows, windows)``, the decoder's cross-attention ``(B, heads, T, image tokens)``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn

from .attention import Attention

__all__ = ["AttentionMaps", "capture_attention", "attention_layer_names"]


class AttentionMaps(dict):
    """``{layer name: weights of its last call}``; :attr:`calls` keeps every call in order (e.g. per decoding
    step), and :meth:`stacked` concatenates them along the query axis."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[Tensor]] = {}

    def _record(self, name: str, weights: Tensor, to_cpu: bool, keep_grad: bool = False) -> None:
        w = weights if keep_grad else weights.detach()
        if to_cpu:
            w = w.cpu()
        self[name] = w
        self.calls.setdefault(name, []).append(w)

    def stacked(self, name: str) -> Tensor:
        """All calls of one layer concatenated along the query axis (dim 2), e.g. one row per generated word.

        Raises ``ValueError`` if the calls cannot be concatenated (different key lengths, as in cached
        self-attention)."""
        import torch

        calls = self.calls[name]
        shapes = {(c.shape[0], c.shape[1], c.shape[3]) for c in calls}
        if len(shapes) != 1:
            raise ValueError(f"calls of {name!r} have different batch/head/key sizes {sorted(shapes)}; cannot stack")
        return torch.cat(calls, dim=2)


def attention_layer_names(model: nn.Module) -> list[str]:
    """Names of every :class:`Attention` inside ``model`` (what ``which`` selects from)."""
    return [name for name, m in model.named_modules() if isinstance(m, Attention)]


def _selector(which: str | Iterable[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if which is None:
        return lambda name: True
    if callable(which):
        return which
    patterns = [which] if isinstance(which, str) else list(which)
    # a pattern matches by glob ("decoder.blocks.*.cross_attn") or as a plain substring ("cross_attn")
    return lambda name: any(fnmatch.fnmatchcase(name, p) or (p in name) for p in patterns)


@contextlib.contextmanager
def capture_attention(
    model: nn.Module,
    which: str | Iterable[str] | Callable[[str], bool] | None = None,
    *,
    to_cpu: bool = False,
    keep_grad: bool = False,
) -> Iterator[AttentionMaps]:
    """Record the post-softmax weights of the attention layers of ``model`` selected by ``which``.

    Args:
        model: any module containing :class:`Attention` layers.
        which: ``None`` for all; a glob or substring of layer names, a list of them, or a predicate on the name.
        to_cpu: move recorded weights to the CPU as they are recorded (saves accelerator memory).
        keep_grad: record the weights still attached to the autograd graph, for a loss on the attention itself
            (:class:`~mmxattn.losses.AttentionEntropyLoss`); by default they are detached.
    Raises:
        ValueError: ``which`` selects no attention layer (the error lists the available names).
        RuntimeError: on exit, if the selected layers recorded nothing (the model never ran them).
    """
    if keep_grad and to_cpu:
        raise ValueError("capture_attention: keep_grad=True records the weights where they are; drop to_cpu=True")
    select = _selector(which)
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and select(n)]
    if not chosen:
        names = attention_layer_names(model)
        raise ValueError(
            f"capture_attention: which={which!r} selects no attention layer of {type(model).__name__}; "
            f"available ({len(names)}): {names[:12]}{' ...' if len(names) > 12 else ''}"
        )
    busy = [n for n, m in chosen if m._recorder is not None]
    if busy:  # checked before any layer is touched: the outer capture keeps all of its layers
        raise RuntimeError(
            f"capture_attention: {len(busy)} selected layer(s) are already being captured (nested capture), "
            f"e.g. {busy[0]!r}; select other layers with `which` or capture once outside"
        )
    maps = AttentionMaps()
    for name, module in chosen:
        module._recorder = lambda w, _n=name: maps._record(_n, w, to_cpu, keep_grad)
    ok = False
    try:
        yield maps
        ok = True
    finally:
        for _, module in chosen:
            module._recorder = None
    if ok and not maps:
        raise RuntimeError(
            f"capture_attention: none of the {len(chosen)} selected attention layers ran inside the block "
            f"(selected: {[n for n, _ in chosen][:6]}...); call the model inside the `with` block"
        )
