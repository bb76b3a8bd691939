"""Zero-shot image classification from class names, as CLIP (Radford et al. 2021) and CoCa (Yu et al. 2022)
evaluate it: every class is the text embedding of its name put into prompt templates ("a photo of a {}."),
averaged over the templates and re-normalised (CLIP's prompt ensembling, open_clip's
``build_zero_shot_classifier``), and an image's logits are ``logit_scale * image_embedding @ classifier``.

Only the contrastive side is used, as in CoCa's zero-shot results; the decoder's caption likelihood can re-score
candidates through :meth:`mmxattn.model.MMXAttn.retrieve` (``rerank=...``).

    W = zero_shot_classifier(model, ["red", "green", "blue"], ["a {} shape", "there is a {} object"])  # (E, 3)
    r = classify(model, ["a.png", "b.png"], W, class_names=["red", "green", "blue"])
    r.probs  # (2, 3); r.indices (2, 3) best first; r.labels ["red", "blue"]
"""

from __future__ import annotations

import numbers
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_TEMPLATES", "ZeroShotResult", "classify", "zero_shot_classifier"]

# Generic prompts. Each "{}" is replaced by the class name. With a word-level vocabulary (the shapes models) a
# default template whose own words the vocabulary does not know ("photo") is left out: it would only add <unk>.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "{}")

Template = str | Callable[[str], str]


@dataclass
class ZeroShotResult:
    """Zero-shot scores of N images over C classes (CPU float32 tensors)."""

    probs: Tensor  # (N, C) softmax of the logits over the classes
    logits: Tensor  # (N, C) logit_scale * cosine(image embedding, class embedding)
    indices: Tensor  # (N, k) class indices, most probable first
    class_names: list[str] | None = None  # C names, when the classes were given by name (or class_names=)

    @property
    def labels(self) -> list[str]:
        """The most probable class's name for every image."""
        if self.class_names is None:
            raise ValueError("this result has no class names: pass class_names= to classify() with a classifier tensor")
        return [self.class_names[i] for i in self.indices[:, 0].tolist()]


def _check_batch_size(fn: str, batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be an int >= 1, got {batch_size!r}")
    return int(batch_size)


def _check_class_names(fn: str, class_names: Any, stacklevel: int = 4) -> list[str]:
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Iterable):
        got = f"the str {class_names!r}" if isinstance(class_names, str) else type(class_names).__name__
        raise TypeError(f"{fn}: class_names must be a list of str, got {got}")
    class_names = list(class_names)  # any iterable of names (a tuple, a numpy array of str, a generator)
    if not class_names:
        raise ValueError(f"{fn}: class_names is empty; give at least one class name")
    for i, name in enumerate(class_names):
        if not isinstance(name, str):
            raise TypeError(f"{fn}: class_names[{i}] must be a str, got {type(name).__name__}: {name!r:.80}")
        if not name.strip():
            raise ValueError(f"{fn}: class_names[{i}] is an empty name ({name!r})")
    dups = {n: c for n, c in Counter(class_names).items() if c > 1}
    if dups:
        # kept (the columns stay aligned with the caller's label ids, as ImageNet's two "crane"s need), but such
        # classes are identical columns: they split their probability and argmax picks the first
        warnings.warn(
            f"{fn}: class_names has duplicates {dict(list(dups.items())[:5])} (name: count); their classifier columns "
            "are identical, so they share their probability and the first of them wins; give distinct names",
            stacklevel=stacklevel,  # the caller of the public function
        )
    return class_names


def _check_templates(fn: str, templates: Any) -> list[Template]:
    if isinstance(templates, str) or callable(templates):
        templates = [templates]
    if not isinstance(templates, Sequence):
        raise TypeError(
            f"{fn}: templates must be a list of str with '{{}}' or of callables, got {type(templates).__name__}"
        )
    if not templates:
        raise ValueError(f"{fn}: templates is empty; give at least one (e.g. '{{}}'), or None for the defaults")
    for i, t in enumerate(templates):
        if isinstance(t, str):
            if "{}" not in t:
                raise ValueError(f"{fn}: templates[{i}] {t!r} has no '{{}}' where the class name goes")
        elif not callable(t):
            raise TypeError(f"{fn}: templates[{i}] must be a str with '{{}}' or a callable str -> str, got {t!r:.80}")
    return list(templates)


def _fill(template: Template, name: str, i: int, fn: str) -> str:
    if isinstance(template, str):
        return template.replace("{}", name)
    text = template(name)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{fn}: templates[{i}]({name!r}) returned {text!r}, not a non-empty str")
    return text


def _usable_templates(
    fn: str, model: Any, templates: list[Template], names: list[str], default: bool
) -> list[Template]:
    """Leave out the default templates the tokenizer cannot read; warn about user templates and class names with
    words it reads as ``<unk>`` (classes that differ only there cannot be told apart)."""
    from .text.tokenizer import unknown_words

    tok = model.tokenizer
    unknown_names = {n: u for n, u in zip(names, unknown_words(tok, names)) if u}
    if unknown_names:
        warnings.warn(
            f"{fn}: {len(unknown_names)} class name(s) have words the tokenizer does not know, e.g. "
            + "; ".join(f"{n!r} ({', '.join(u)})" for n, u in list(unknown_names.items())[:5])
            + ": they read as <unk>, so classes that differ only there are not told apart",
            stacklevel=4,  # _usable_templates -> _build_classifier -> the public function -> its caller
        )
    # a template's own words: those without the "{}" (a callable's cannot be told from the name's)
    fixed = [" ".join(w for w in t.split() if "{}" not in w) if isinstance(t, str) else "" for t in templates]
    bad = {i: u for i, u in enumerate(unknown_words(tok, fixed)) if u}
    if default:
        kept = [t for i, t in enumerate(templates) if i not in bad]
        return kept or templates
    for i, unknown in bad.items():
        warnings.warn(
            f"{fn}: templates[{i}] {templates[i]!r} has words the tokenizer does not know ({', '.join(unknown)}): "
            "they read as <unk>",
            stacklevel=4,
        )
    return templates


def _warn_same_tokens(fn: str, names: list[str], ids: Tensor, context_length: int) -> None:
    """Warn where distinct class names give the same token ids in every template (``ids``: (C, T_ * L)): cut at
    the context length (the tokenizer says so once per session only) or differing only in ``<unk>`` words, their
    classifier columns are identical, as duplicate names' are."""
    _, group = torch.unique(ids, dim=0, return_inverse=True)  # (C,) one id per distinct token sequence
    if int(group.max()) + 1 == len(names):
        return
    same: dict[int, list[str]] = {}
    for name, g in zip(names, group.tolist()):
        if name not in same.setdefault(g, []):  # duplicate names are warned about by _check_class_names
            same[g].append(name)
    clashes = [ns for ns in same.values() if len(ns) > 1]
    if clashes:
        warnings.warn(
            f"{fn}: {len(clashes)} group(s) of distinct class names read as the same tokens in every template, e.g. "
            + "; ".join(" = ".join(repr(n) for n in ns[:3]) for ns in clashes[:3])
            + f" (cut at context_length={context_length}, or words read as <unk>): their classifier columns are "
            "identical, so they share their probability and the first of them wins; give shorter or distinct names",
            stacklevel=4,  # _warn_same_tokens -> _build_classifier -> the public function -> its caller
        )


def zero_shot_classifier(
    model: Any,
    class_names: Iterable[str],
    templates: Sequence[Template] | Template | None = None,
    batch_size: int = 256,
) -> Tensor:
    """The zero-shot classifier (E, C) of ``class_names``: column c is the mean over ``templates`` of the
    L2-normalised text embeddings of class c's prompts, L2-normalised again. A float32 tensor on the model's device.

    ``templates``: strings in which every ``"{}"`` is replaced by the class name, or callables ``name -> prompt``
    (e.g. to choose "a"/"an"); one template alone may be given as is. ``None``: :data:`DEFAULT_TEMPLATES` (those
    the model's vocabulary can read). Texts go through ``model.encode_text`` (needs ``model.tokenizer``;
    ``mmxattn.load`` attaches it) ``batch_size`` at a time, without gradients and in eval mode (the model's mode
    is restored). Duplicate class names warn (their columns are identical), as do distinct names that read as the
    same tokens (cut at the context length); names or user templates with words a word-level vocabulary does not
    know warn (they read as ``<unk>``).
    """
    return _build_classifier("zero_shot_classifier", model, class_names, templates, batch_size)[0]


def _build_classifier(
    fn: str, model: Any, class_names: Any, templates: Any, batch_size: Any
) -> tuple[Tensor, list[str]]:
    """(classifier (E, C), the checked class names) for the public function ``fn``."""
    names = _check_class_names(fn, class_names)
    default = templates is None
    temps = _check_templates(fn, DEFAULT_TEMPLATES if default else templates)
    batch_size = _check_batch_size(fn, batch_size)
    if getattr(model, "tokenizer", None) is None:
        raise RuntimeError(
            f"{fn}: model.tokenizer is None, and class prompts are text; attach the model's tokenizer "
            "(mmxattn.load attaches it; model.tokenizer = ...)"
        )
    temps = _usable_templates(fn, model, temps, names, default)
    prompts = [_fill(t, name, i, fn) for name in names for i, t in enumerate(temps)]  # class-major: (C * T_)
    ids = model.tokenizer(prompts, context_length=model.cfg.text.context_length)  # (C * T_, L), as encode_text
    _warn_same_tokens(fn, names, ids.view(len(names), -1), model.cfg.text.context_length)
    from .model import eval_mode  # here: `import mmxattn` stays free of the model's imports (timm)

    with torch.no_grad(), eval_mode(model):
        emb = torch.cat(
            [model.encode_text(ids[s : s + batch_size]).float() for s in range(0, len(prompts), batch_size)]
        )  # (C * T_, E), each row L2-normalised
    emb = emb.view(len(names), len(temps), -1).mean(1)  # (C, E)
    return F.normalize(emb, dim=-1).T.contiguous(), names  # (E, C)


def _image_batches(images: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(index of the first image, a chunk ``model.preprocess`` takes) over ``images``, cut as ``MMXAttn.retrieve``
    cuts its gallery (``batch_size`` images a chunk, a batched tensor split where it straddles two, a generator
    read as the chunks are asked for); nothing for an empty input (classify names it)."""
    from .model import _gallery_parts

    for part, first in _gallery_parts(images, batch_size):
        if isinstance(part, (list, tuple)) and not part:
            return
        yield first, part


def _check_classifier(model: Any, w: Tensor) -> Tensor:
    E = model.cfg.embed_dim
    if w.dim() != 2 or w.shape[0] != E or w.shape[1] < 1 or not w.is_floating_point():
        raise ValueError(
            f"classify: classes as a classifier must be a float tensor (E={E}, C) as zero_shot_classifier returns, "
            f"got {w.dtype} {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("classify: the classifier holds NaN or infinite values")
    return w.to(model.logit_scale.device, torch.float32)


def classify(
    model: Any,
    images: Any,
    classes: Tensor | Iterable[str],
    templates: Sequence[Template] | Template | None = None,
    *,
    class_names: Iterable[str] | None = None,
    k: int = 5,
    batch_size: int = 64,
) -> ZeroShotResult:
    """Zero-shot classification of ``images`` into ``classes``: class names (a classifier is built from them and
    ``templates`` by :func:`zero_shot_classifier`) or a ready classifier (E, C) (with ``class_names=`` its C names,
    for :attr:`ZeroShotResult.labels`). Logits are ``model.get_logit_scale() * encode_image(image) @ classifier``
    and ``probs`` their softmax over the classes; ``indices`` are the top ``min(k, C)`` classes.

    ``images``: anything ``model.preprocess`` takes (paths, PIL images, numpy arrays, uint8 or normalised tensors,
    or a list of them), or any iterable of them (a generator over a folder's files): they are read, preprocessed
    and encoded ``batch_size`` at a time (class prompts too), so a large folder is never in memory at once. The
    model runs without gradients in eval mode (its mode is restored). Results are CPU float32 tensors.
    """
    fn = "classify"
    batch_size = _check_batch_size(fn, batch_size)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{fn}: k must be an int >= 1, got {k!r}")
    if isinstance(classes, Tensor):
        if templates is not None:
            raise ValueError(f"{fn}: templates apply to class names; classes is already a classifier tensor")
        w = _check_classifier(model, classes)
        names = None if class_names is None else _check_class_names(fn, class_names, stacklevel=3)
        if names is not None and len(names) != w.shape[1]:
            raise ValueError(f"{fn}: {len(names)} class_names for a classifier of {w.shape[1]} classes")
    else:
        if class_names is not None:
            raise ValueError(f"{fn}: class_names= goes with a classifier tensor; classes already gives the names")
        w, names = _build_classifier(fn, model, classes, templates, batch_size)
    logits = []
    from .model import eval_mode

    with torch.no_grad(), eval_mode(model):
        scale = model.get_logit_scale().float()
        for start, chunk in _image_batches(images, batch_size):
            emb = model.encode_image(model.preprocess(chunk, index_offset=start)).float()  # (b, E), L2-normalised
            logits.append((scale * emb @ w).cpu())  # (b, C)
    if not logits:
        raise ValueError(f"{fn}: images is empty; give at least one image")
    out = torch.cat(logits)
    return ZeroShotResult(
        probs=out.softmax(-1), logits=out, indices=out.topk(min(int(k), out.shape[1]), dim=1).indices, class_names=names
    )
