"""Captions of a shapes scene, each with a structured meaning and word-level grounding.

A caption's :class:`Meaning` is what it asserts, so :func:`caption_fits` can decide whether it is true of ANY
scene; the data set's retrieval ceilings count, for every caption, the images it fits. The generator only emits
captions whose meaning is true of their own scene (checked by tests), and meanings are deliberately partial
("a red circle" fits every image that has one), so captions are ambiguous the way real ones are.

Semantics (shared by generation and by :func:`caption_fits`, so "fits" = "could have generated"):
  * an object spec matches an object when every attribute it names (shape, colour, size, grid row/column of the
    box centre in thirds of the image) is equal;
  * the specs of one caption are matched by DISTINCT objects ("a circle and a circle" needs two circles);
  * counts are exact ("two triangles" is false of an image with three);
  * ``a left_of b``: b's centre is more than REL_MARGIN * img_size to the right of a's (same for above/below).

Templates (word lists below; captions are lowercase words joined by single spaces, no punctuation):
  single    [there is | a picture of] NP                                   "a small red circle"
  region    [there is] NP REGION                                            "a star in the top right"
  relation  [there is] NP REL NP                                            "a red circle left of a blue square"
  pair      [there is | a picture of] NP and NP                             "a circle and a large green cross"
  count     [there are | a picture of] N [size] [colour] NOUN(s)           "there are two red triangles"
  full      N shapes NP NP and NP (every object, N = total)                 "two shapes a red star and a cross"
with NP = a|an [size] [colour] NOUN, NOUN = the shape name or "shape"/"object"; attributes included at random.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .shapes_render import COLOURS, SHAPE_PLURALS, SHAPES, SIZES, Scene, grid_cell

__all__ = [
    "ObjectSpec",
    "CountSpec",
    "Meaning",
    "Caption",
    "RELATIONS",
    "REL_MARGIN",
    "make_captions",
    "caption_fits",
    "referents",
    "fit_matrix",
    "vocabulary",
    "MAX_CAPTION_WORDS",
    "ParsedCaption",
    "CaptionCheck",
    "parse_caption",
    "check_caption",
]

RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
REL_MARGIN = 0.1  # fraction of the image side a relation needs between the two centres
REL_PHRASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "left_of": (("left", "of"), ("to", "the", "left", "of")),
    "right_of": (("right", "of"), ("to", "the", "right", "of")),
    "above": (("above",),),
    "below": (("below",), ("under",)),
}
# (words, (row, col)); None = any row/column. Rows/columns are thirds of the image (grid_cell).
REGION_PHRASES: tuple[tuple[tuple[str, ...], tuple[int | None, int | None]], ...] = (
    (("in", "the", "top", "left"), (0, 0)),
    (("in", "the", "top", "right"), (0, 2)),
    (("in", "the", "bottom", "left"), (2, 0)),
    (("in", "the", "bottom", "right"), (2, 2)),
    (("at", "the", "top"), (0, None)),
    (("at", "the", "bottom"), (2, None)),
    (("on", "the", "left"), (None, 0)),
    (("on", "the", "right"), (None, 2)),
    (("in", "the", "middle"), (1, 1)),
    (("in", "the", "center"), (1, 1)),
)
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
TEMPLATES: tuple[str, ...] = ("single", "region", "relation", "pair", "count", "full")
# "four shapes" + 4 x "a small red circle" + "and" = 19; the longest caption any template can produce.
MAX_CAPTION_WORDS = 19


@dataclass(frozen=True)
class ObjectSpec:
    """Attribute constraints on one object; None = unconstrained. row/col: grid thirds of the box centre."""

    shape: int | None = None
    colour: int | None = None
    size: int | None = None
    row: int | None = None
    col: int | None = None

    def matches(self, scene: Scene, k: int) -> bool:
        s = scene.img_size
        return (
            (self.shape is None or scene.shape[k] == self.shape)
            and (self.colour is None or scene.colour[k] == self.colour)
            and (self.size is None or scene.size[k] == self.size)
            and (self.row is None or grid_cell(scene.cy[k], s) == self.row)
            and (self.col is None or grid_cell(scene.cx[k], s) == self.col)
        )


@dataclass(frozen=True)
class CountSpec:
    """Exactly ``n`` objects have the named attributes (all None: exactly n objects in total)."""

    n: int
    shape: int | None = None
    colour: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class Meaning:
    """What a caption asserts: distinct objects matching ``objects``, exact ``counts``, and optionally
    ``relation = (i, name, j)``: objects[i] <name> objects[j]. Hashable, so identical meanings dedupe."""

    objects: tuple[ObjectSpec, ...] = ()
    counts: tuple[CountSpec, ...] = ()
    relation: tuple[int, str, int] | None = None


@dataclass(frozen=True)
class Caption:
    """``groundings``: (word positions in text.split(), object index) pairs. A phrase gets one pair per object it
    can name: every object a plural noun counts ("two circles"), and for a noun phrase every object that fills
    its role in some reading that makes the caption true ("a blue cross" with two blue crosses in view names
    both); the object the caption was generated from is always among them. Only attribute words (size,
    colour, shape noun) are grounded; articles, generic nouns ("shape", "object"), counts and relation words
    are not."""

    text: str
    meaning: Meaning
    groundings: tuple[tuple[tuple[int, ...], int], ...]
    template: str


def relation_holds(name: str, scene: Scene, a: int, b: int) -> bool:
    m = REL_MARGIN * scene.img_size
    if name == "left_of":
        return scene.cx[b] - scene.cx[a] > m
    if name == "right_of":
        return scene.cx[a] - scene.cx[b] > m
    if name == "above":
        return scene.cy[b] - scene.cy[a] > m
    if name == "below":
        return scene.cy[a] - scene.cy[b] > m
    raise ValueError(f"relation must be one of {RELATIONS}, got {name!r}")


def caption_fits(meaning: Meaning, scene: Scene) -> bool:
    """Is the caption's meaning true of ``scene``? A plain loop over object assignments: the readable
    reference that :func:`fit_matrix` vectorises."""
    for c in meaning.counts:
        spec = ObjectSpec(c.shape, c.colour, c.size)
        if sum(spec.matches(scene, k) for k in range(scene.n)) != c.n:
            return False
    for assign in itertools.permutations(range(scene.n), len(meaning.objects)):
        if not all(spec.matches(scene, k) for spec, k in zip(meaning.objects, assign)):
            continue
        if meaning.relation is not None:
            i, name, j = meaning.relation
            if not relation_holds(name, scene, assign[i], assign[j]):
                continue
        return True
    return False


# ----------------------------------------------------------------------------------------------- generation


class _Words:
    """Collects caption words and the positions of the attribute words of each object spec / counted object."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.ground: list[tuple[tuple[int, ...], int]] = []  # (positions, object): counted objects
        self.spec_pos: list[tuple[int, ...]] = []  # positions per ObjectSpec, in Meaning.objects order

    def add(self, *words: str) -> None:
        self.words.extend(w for phrase in words for w in phrase.split())

    def grounded(self, words: Sequence[str], objects: Sequence[int] | None = None) -> None:
        """Append words that name each object in ``objects`` (None: the next ObjectSpec's referents)."""
        pos = tuple(range(len(self.words), len(self.words) + len(words)))
        self.words.extend(words)
        if objects is None:
            self.spec_pos.append(pos)
        else:
            self.ground.extend((pos, k) for k in objects)

    def caption(self, meaning: Meaning, scene: Scene, template: str) -> Caption:
        ground = list(self.ground)
        for pos, objs in zip(self.spec_pos, referents(meaning, scene)):
            ground.extend((pos, k) for k in sorted(objs) if pos)
        return Caption(" ".join(self.words), meaning, tuple(ground), template)


def referents(meaning: Meaning, scene: Scene) -> list[set[int]]:
    """Per ObjectSpec of ``meaning``, every object it can denote in some assignment that makes the caption
    true ("a blue cross" in an image with two blue crosses names both)."""
    out: list[set[int]] = [set() for _ in meaning.objects]
    for assign in itertools.permutations(range(scene.n), len(meaning.objects)):
        if all(spec.matches(scene, k) for spec, k in zip(meaning.objects, assign)) and (
            meaning.relation is None
            or relation_holds(meaning.relation[1], scene, assign[meaning.relation[0]], assign[meaning.relation[2]])
        ):
            for j, k in enumerate(assign):
                out[j].add(k)
    return out


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(w: _Words, scene: Scene, k: int, rng: random.Random, p_attr: float = 0.75) -> ObjectSpec:
    """Append "a [size] [colour] noun" describing object k with a random subset of its attributes."""
    use_shape = rng.random() < p_attr + 0.1
    use_colour = rng.random() < p_attr
    use_size = rng.random() < p_attr - 0.3
    if not (use_shape or use_colour):
        use_shape = True
    attrs = ([SIZES[scene.size[k]]] if use_size else []) + ([COLOURS[scene.colour[k]]] if use_colour else [])
    noun = SHAPES[scene.shape[k]] if use_shape else rng.choice(["shape", "object"])
    w.add(_article((attrs + [noun])[0]))
    if use_shape:
        w.grounded(attrs + [noun])
    else:
        w.grounded(attrs)  # may be empty (size-less, colour-less "a shape" never happens: shape or colour is set)
        w.add(noun)
    return ObjectSpec(
        scene.shape[k] if use_shape else None,
        scene.colour[k] if use_colour else None,
        scene.size[k] if use_size else None,
    )


def _single(scene: Scene, rng: random.Random) -> Caption:
    w = _Words()
    w.add(rng.choice(["", "there is", "a picture of"]))
    spec = _noun_phrase(w, scene, rng.randrange(scene.n), rng)
    return w.caption(Meaning((spec,)), scene, "single")


def _region(scene: Scene, rng: random.Random) -> Caption:
    w = _Words()
    k = rng.randrange(scene.n)
    row, col = grid_cell(scene.cy[k], scene.img_size), grid_cell(scene.cx[k], scene.img_size)
    options = [(p, rc) for p, rc in REGION_PHRASES if rc[0] in (None, row) and rc[1] in (None, col)]
    phrase, (r, c) = rng.choice(options)
    w.add(rng.choice(["", "there is"]))
    spec = _noun_phrase(w, scene, k, rng)
    w.add(*phrase)
    return w.caption(Meaning((ObjectSpec(spec.shape, spec.colour, spec.size, r, c),)), scene, "region")


def _relation_candidates(scene: Scene) -> list[tuple[int, str, int]]:
    return [
        (a, name, b)
        for a, b in itertools.permutations(range(scene.n), 2)
        for name in RELATIONS
        if relation_holds(name, scene, a, b)
    ]


def _relation(scene: Scene, rng: random.Random) -> Caption | None:
    cands = _relation_candidates(scene)
    if not cands:
        return None
    a, name, b = rng.choice(cands)
    w = _Words()
    w.add(rng.choice(["", "there is"]))
    sa = _noun_phrase(w, scene, a, rng)
    phrases = REL_PHRASES[name]
    w.add(*rng.choice(phrases))
    sb = _noun_phrase(w, scene, b, rng)
    return w.caption(Meaning((sa, sb), relation=(0, name, 1)), scene, "relation")


def _pair(scene: Scene, rng: random.Random) -> Caption | None:
    if scene.n < 2:
        return None
    a, b = rng.sample(range(scene.n), 2)
    w = _Words()
    w.add(rng.choice(["", "there is", "a picture of"]))
    sa = _noun_phrase(w, scene, a, rng)
    w.add("and")
    sb = _noun_phrase(w, scene, b, rng)
    return w.caption(Meaning((sa, sb)), scene, "pair")


def _count_words(n: int, rng: random.Random) -> list[str]:
    return ["a", "single"] if n == 1 and rng.random() < 0.5 else [NUMBERS[n]]


def _count(scene: Scene, rng: random.Random) -> Caption:
    k = rng.randrange(scene.n)  # the counted attributes are those of a random object
    kind = rng.choice(["total", "shape", "colour", "colour_shape", "size_shape"])
    shape = scene.shape[k] if "shape" in kind else None
    colour = scene.colour[k] if "colour" in kind else None
    size = scene.size[k] if "size" in kind else None
    spec = ObjectSpec(shape, colour, size)
    objs = [j for j in range(scene.n) if spec.matches(scene, j)]
    n = len(objs)
    w = _Words()
    w.add(rng.choice(["", "there is" if n == 1 else "there are", "a picture of"]))
    w.add(*_count_words(n, rng))
    attrs = ([SIZES[size]] if size is not None else []) + ([COLOURS[colour]] if colour is not None else [])
    if shape is not None:
        w.grounded(attrs + [SHAPES[shape] if n == 1 else SHAPE_PLURALS[shape]], objs)
    else:
        if attrs:
            w.grounded(attrs, objs)
        noun = rng.choice(["shape", "object"])
        w.add(noun if n == 1 else noun + "s")
    return w.caption(Meaning(counts=(CountSpec(n, shape, colour, size),)), scene, "count")


def _full(scene: Scene, rng: random.Random) -> Caption:
    w = _Words()
    w.add(NUMBERS[scene.n], "shape" if scene.n == 1 else "shapes")
    specs = []
    for i, k in enumerate(rng.sample(range(scene.n), scene.n)):
        if i == scene.n - 1 and scene.n > 1:
            w.add("and")
        specs.append(_noun_phrase(w, scene, k, rng, p_attr=0.85))
    return w.caption(Meaning(tuple(specs), counts=(CountSpec(scene.n),)), scene, "full")


_MAKERS = {"single": _single, "region": _region, "relation": _relation, "pair": _pair, "count": _count, "full": _full}


def make_captions(scene: Scene, rng: random.Random, k: int = 5) -> list[Caption]:
    """``k`` distinct captions of ``scene``. Templates are visited in a random per-image order and cycled, so an
    image's captions mix templates (a 1-object image has 4 applicable ones: single, region, count, full)."""
    if k < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {k}")
    order = rng.sample(TEMPLATES, len(TEMPLATES))
    out: list[Caption] = []
    seen: set[str] = set()
    for attempt in range(100 * k):
        cap = _MAKERS[order[attempt % len(order)]](scene, rng)
        if cap is not None and cap.text not in seen:
            seen.add(cap.text)
            out.append(cap)
            if len(out) == k:
                return out
    raise RuntimeError(f"make_captions: found only {len(out)} distinct captions of {scene}, asked for {k}")


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (for a word-level tokenizer)."""
    words = {"a", "an", "single", "and", "there", "is", "are", "picture", "of", "shape", "shapes", "object"}
    words |= {"objects", *SHAPES, *SHAPE_PLURALS, *COLOURS, *SIZES, *NUMBERS[1:]}
    words |= {w for phrases in REL_PHRASES.values() for p in phrases for w in p}
    words |= {w for p, _ in REGION_PHRASES for w in p}
    return sorted(words)


# ----------------------------------------------------------------------------------------- vectorised fit


@dataclass
class _Packed:
    """Scenes as padded (N, M) arrays; -1 marks empty slots (which match no spec)."""

    attrs: dict[str, np.ndarray]  # shape, colour, size, row, col: (N, M) int
    valid: np.ndarray  # (N, M) bool
    cx: np.ndarray  # (N, M) float
    cy: np.ndarray
    margin: np.ndarray  # (N, 1) REL_MARGIN * img_size


def _pack(scenes: Sequence[Scene]) -> _Packed:
    n, m = len(scenes), max((s.n for s in scenes), default=1)
    a = {k: np.full((n, m), -1, np.int64) for k in ("shape", "colour", "size", "row", "col")}
    cx, cy = np.zeros((n, m)), np.zeros((n, m))
    for i, s in enumerate(scenes):
        j = slice(0, s.n)
        a["shape"][i, j], a["colour"][i, j], a["size"][i, j] = s.shape, s.colour, s.size
        a["row"][i, j] = [grid_cell(y, s.img_size) for y in s.cy]
        a["col"][i, j] = [grid_cell(x, s.img_size) for x in s.cx]
        cx[i, j], cy[i, j] = s.cx, s.cy
    margin = np.array([[REL_MARGIN * s.img_size] for s in scenes]).reshape(n, 1)
    return _Packed(a, a["shape"] >= 0, cx, cy, margin)


def fit_matrix(meanings: Sequence[Meaning], scenes: Sequence[Scene]) -> np.ndarray:
    """(len(meanings), len(scenes)) bool: ``caption_fits`` for every pair, vectorised over scenes.

    Per meaning: each spec becomes an (N, M) match mask; the distinct-object assignment is checked over all
    ordered slot tuples at once, (N, P) for the P = M!/(M-k)! tuples of k slots."""
    p = _pack(scenes)
    n, m = p.valid.shape
    masks: dict[tuple, np.ndarray] = {}

    def mask(shape, colour, size, row=None, col=None) -> np.ndarray:
        key = (shape, colour, size, row, col)
        if key not in masks:
            out = p.valid.copy()
            for name, v in zip(("shape", "colour", "size", "row", "col"), key):
                if v is not None:
                    out &= p.attrs[name] == v
            masks[key] = out
        return masks[key]

    perms = {
        k: np.array(list(itertools.permutations(range(m), k)), dtype=np.intp).reshape(-1, k) for k in range(1, m + 1)
    }
    out = np.zeros((len(meanings), n), bool)
    for u, mean in enumerate(meanings):
        ok = np.ones(n, bool)
        for c in mean.counts:
            ok &= mask(c.shape, c.colour, c.size).sum(1) == c.n
        k = len(mean.objects)
        if k > m:
            ok[:] = False
        elif k:
            slots = perms[k]  # (P, k)
            hit = np.ones((n, len(slots)), bool)
            for j, s in enumerate(mean.objects):
                hit &= mask(s.shape, s.colour, s.size, s.row, s.col)[:, slots[:, j]]
            if mean.relation is not None:
                i, name, j = mean.relation
                a, b = slots[:, i], slots[:, j]
                if name == "left_of":
                    hit &= p.cx[:, b] - p.cx[:, a] > p.margin
                elif name == "right_of":
                    hit &= p.cx[:, a] - p.cx[:, b] > p.margin
                elif name == "above":
                    hit &= p.cy[:, b] - p.cy[:, a] > p.margin
                elif name == "below":
                    hit &= p.cy[:, a] - p.cy[:, b] > p.margin
                else:
                    raise ValueError(f"relation must be one of {RELATIONS}, got {name!r}")
            ok &= hit.any(1)
        out[u] = ok
    return out


# ------------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class ParsedCaption:
    """A caption read back into its :class:`Meaning`. ``spec_words``: per ObjectSpec of the meaning, the positions
    (in text.split()) of its attribute words; ``count_words``: those of the counted phrase (empty without one).
    Which words are attribute words follows :class:`Caption`'s groundings."""

    meaning: Meaning
    spec_words: tuple[tuple[int, ...], ...]
    count_words: tuple[int, ...]
    template: str


@dataclass(frozen=True)
class CaptionCheck:
    """A caption checked against a scene. ``fits``: its meaning is true of the scene. ``groundings``: (word
    positions, object) pairs as in :class:`Caption`: when the caption fits, every object a phrase can name in a
    reading that makes it true (exactly the generator's groundings); when it does not, every object that matches
    the phrase on its own (relations and distinctness ignored). ``n_phrases``: phrases with attribute words;
    ``n_unnamed``: those that match no object of the scene (a hallucinated object has nothing to ground to)."""

    fits: bool
    groundings: tuple[tuple[tuple[int, ...], int], ...]
    n_phrases: int
    n_unnamed: int


_PREFIXES: tuple[tuple[str, ...], ...] = (("there", "is"), ("there", "are"), ("a", "picture", "of"))
_GENERIC = ("shape", "object")


class _Reader:
    """Cursor over a caption's words for :func:`parse_caption`; every method returns None on a mismatch."""

    def __init__(self, words: list[str]) -> None:
        self.w, self.i = words, 0

    def at_end(self) -> bool:
        return self.i == len(self.w)

    def take(self, phrase: Sequence[str]) -> bool:
        if tuple(self.w[self.i : self.i + len(phrase)]) == tuple(phrase):
            self.i += len(phrase)
            return True
        return False

    def attributes(self) -> tuple[int | None, int | None, list[int]]:
        """[size] [colour] -> (size, colour, their positions)."""
        size = colour = None
        pos: list[int] = []
        if self.i < len(self.w) and self.w[self.i] in SIZES:
            size = SIZES.index(self.w[self.i])
            pos.append(self.i)
            self.i += 1
        if self.i < len(self.w) and self.w[self.i] in COLOURS:
            colour = COLOURS.index(self.w[self.i])
            pos.append(self.i)
            self.i += 1
        return size, colour, pos

    def noun_phrase(self) -> tuple[ObjectSpec, tuple[int, ...]] | None:
        """a|an [size] [colour] (shape name | shape | object)."""
        if not (self.take(("a",)) or self.take(("an",))):
            return None
        size, colour, pos = self.attributes()
        if self.i >= len(self.w):
            return None
        word = self.w[self.i]
        self.i += 1
        if word in SHAPES:
            return ObjectSpec(SHAPES.index(word), colour, size), (*pos, self.i - 1)
        if word in _GENERIC:
            return ObjectSpec(None, colour, size), tuple(pos)
        return None

    def count(self) -> int | None:
        if self.take(("a", "single")):
            return 1
        if self.i < len(self.w) and self.w[self.i] in NUMBERS:
            self.i += 1
            return NUMBERS.index(self.w[self.i - 1])
        return None


def parse_caption(text: str) -> ParsedCaption | None:
    """Read a caption of the shapes grammar (the templates in this module's docstring) back into its meaning, or
    None when it is not one (a model's garbled output). The inverse of generation: for every generated caption
    ``parse_caption(c.text).meaning == c.meaning``. Lenient where the meaning does not depend on it: any prefix
    with any template, "a"/"an" and singular/plural nouns are not checked against each other."""
    r = _Reader(text.split())
    for p in _PREFIXES:
        if r.take(p):
            break
    start = r.i
    n = r.count()
    if n is not None:  # count ("two red circles") or full ("two shapes a red circle and a cross")
        size, colour, pos = r.attributes()
        word = r.w[r.i] if r.i < len(r.w) else None
        r.i += 1
        names = {**{s: k for k, s in enumerate(SHAPES)}, **{s: k for k, s in enumerate(SHAPE_PLURALS)}}
        if word in names and r.at_end():
            spec = CountSpec(n, names[word], colour, size)
            return ParsedCaption(Meaning(counts=(spec,)), (), (*pos, r.i - 1), "count")
        if word not in ("shape", "shapes", "object", "objects"):
            return None
        if r.at_end():
            return ParsedCaption(Meaning(counts=(CountSpec(n, None, colour, size),)), (), tuple(pos), "count")
        if pos or word not in ("shape", "shapes"):
            return None
        specs, words = [], []
        while not r.at_end():
            if specs:
                r.take(("and",))
            np_ = r.noun_phrase()
            if np_ is None:
                return None
            specs.append(np_[0])
            words.append(np_[1])
        return ParsedCaption(Meaning(tuple(specs), counts=(CountSpec(n),)), tuple(words), (), "full")
    r.i = start
    first = r.noun_phrase()
    if first is None:
        return None
    if r.at_end():
        return ParsedCaption(Meaning((first[0],)), (first[1],), (), "single")
    mark = r.i
    for phrase, (row, col) in REGION_PHRASES:
        if r.take(phrase) and r.at_end():
            s = first[0]
            spec = ObjectSpec(s.shape, s.colour, s.size, row, col)
            return ParsedCaption(Meaning((spec,)), (first[1],), (), "region")
        r.i = mark
    for name, phrases in REL_PHRASES.items():
        for phrase in phrases:
            if r.take(phrase):
                second = r.noun_phrase()
                if second is not None and r.at_end():
                    meaning = Meaning((first[0], second[0]), relation=(0, name, 1))
                    return ParsedCaption(meaning, (first[1], second[1]), (), "relation")
            r.i = mark
    if r.take(("and",)):
        second = r.noun_phrase()
        if second is not None and r.at_end():
            return ParsedCaption(Meaning((first[0], second[0])), (first[1], second[1]), (), "pair")
    return None


def check_caption(text: str, scene: Scene) -> CaptionCheck | None:
    """Is ``text`` true of ``scene``, and which objects does each of its phrases name? None when the caption
    does not parse (see :func:`parse_caption`). Scores a model's generated captions: the fraction that fit their
    image, and grounding on the words the model chose itself."""
    parsed = parse_caption(text)
    if parsed is None:
        return None
    meaning = parsed.meaning
    fits = caption_fits(meaning, scene)
    if fits:
        named = [sorted(objs) for objs in referents(meaning, scene)]
    else:
        named = [[k for k in range(scene.n) if spec.matches(scene, k)] for spec in meaning.objects]
    phrases = [(pos, objs) for pos, objs in zip(parsed.spec_words, named) if pos]
    if parsed.count_words:
        c = meaning.counts[0]
        spec = ObjectSpec(c.shape, c.colour, c.size)
        phrases.append((parsed.count_words, [k for k in range(scene.n) if spec.matches(scene, k)]))
    ground = tuple((pos, k) for pos, objs in phrases for k in objs)
    return CaptionCheck(fits, ground, len(phrases), sum(not objs for _, objs in phrases))
