"""Tokenizers: one small protocol, open_clip's BPE for real captions, a word-level one for small vocabularies.

Every tokenizer lays out ids the same way, fixed length ``context_length``::

    [bos, tok_1, ..., tok_n, eos, pad, pad, ...]

* Over-long texts keep ``bos``, are cut after ``context_length - 2`` tokens and still end with ``eos``; the first
  truncation of each tokenizer instance emits one ``UserWarning`` (later ones are silent, a training run must
  not flood its log).
* The empty string encodes as ``[bos, eos, pad, ...]``.
* ``pad_id`` differs from every real token, so the caption loss may ignore it without ignoring a word.
* Text never produces a special id: a caption that spells out a special token (``"<end_of_text>"``, ``"<pad>"``)
  is encoded as the ordinary text it is.
* ``decode`` stops at the first ``eos`` and drops ``bos``/``pad``; out-of-vocabulary ids raise ``ValueError``.

Serialisation is plain JSON (``to_dict`` / ``tokenizer_from_dict``, ``save`` / ``load_tokenizer`` writing
``tokenizer.json``): loading never executes code, and a loaded tokenizer encodes and decodes exactly as the saved one.
"""

from __future__ import annotations

import hashlib
import json
import string
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the model, data pipeline and metrics rely on."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    context_length: int

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str: ...

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...

    def save(self, directory: str | Path) -> Path: ...


class _TokenizerBase:
    """Shared layout, truncation, decoding and serialisation; subclasses map text <-> content ids."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    context_length: int
    _drop_ids: frozenset[int]  # specials that decode() drops silently

    def __init__(self, context_length: int) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for bos and eos), got {context_length!r}")
        self.context_length = context_length
        self._warned_truncation = False

    # --- subclass hooks
    def _encode_text(self, text: str) -> list[int]:  # content ids only, no specials
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:  # content ids only
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- encoding
    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Encode to a LongTensor (B, T) with T = ``context_length`` (default: the tokenizer's)."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r:.80}")
        length = self.context_length if context_length is None else context_length
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for bos and eos), got {length!r}")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)  # (B, T)
        n_truncated, first_drop = 0, 0
        for i, text in enumerate(texts):
            ids = self._encode_text(text)
            room = length - 2
            if len(ids) > room:
                n_truncated += 1
                first_drop = first_drop or len(ids) - room
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        if n_truncated and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"{type(self).__name__}: {n_truncated} text(s) longer than context_length={length} were truncated "
                f"(the first one lost {first_drop} token(s)); further truncations by this tokenizer are not reported",
                UserWarning,
                stacklevel=2,
            )
        return out

    def unknown_words(self, texts: str | Sequence[str]) -> list[list[str]]:
        """Per text, its whitespace words (as written) that this tokenizer reads as ``<unk>``, in order; empty lists
        for a tokenizer without an ``<unk>`` token (byte-level BPE reads any text)."""
        return [[] for _ in ([texts] if isinstance(texts, str) else texts)]

    # --- decoding
    def _check_ids(self, ids: torch.Tensor | Sequence[int], name: str) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"{name} must be 1-D (one sequence), got shape {tuple(ids.shape)}; use batch_decode")
            if ids.is_floating_point() or ids.is_complex():
                raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"{name} must be a 1-D tensor or a sequence of ints, got {type(ids).__name__}")
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{name} must hold ints, got {type(t).__name__} ({t!r})")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} in {name} is outside the vocabulary [0, {self.vocab_size})")
            out.append(t)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one sequence: stops at the first eos, drops bos/pad (and other silent specials)."""
        ids = self._check_ids(ids, "ids")
        content = []
        for t in ids:
            if t == self.eos_id:
                break
            if t not in self._drop_ids:
                content.append(t)
        return self._decode_ids(content)

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Texts of a batch: a (B, T) tensor or a list of 1-D sequences (lengths may differ)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"batch_decode expects a 2-D (B, T) tensor, got shape {tuple(ids.shape)}")
            rows: Sequence = list(ids)
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"batch_decode expects a (B, T) tensor or a list of sequences, got {type(ids).__name__}")
        else:
            rows = ids
        return [self._decode_row(r, i) for i, r in enumerate(rows)]

    def _decode_row(self, row: torch.Tensor | Sequence[int], index: int) -> str:
        try:
            return self.decode(row)
        except (TypeError, ValueError) as e:
            raise type(e)(f"row {index}: {e}") from None

    # --- serialisation
    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json``; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    def __reduce__(self):  # pickling (DataLoader workers) ships the settings, not the tables
        return tokenizer_from_dict, (self.to_dict(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length})"


# ----------------------------------------------------------------------------------------------------------------
# open_clip BPE


@lru_cache(maxsize=4)
def _simple_tokenizer(clean: str):
    # Lazy import: open_clip pulls in timm & co (seconds); word-tokenizer users should not pay for it.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(clean=clean)


@lru_cache(maxsize=4)
def _ordinary_pattern(clean: str):
    """open_clip's pre-tokenisation pattern without its special-token alternatives.

    open_clip's pattern starts with ``<start_of_text>|<end_of_text>|`` (case-insensitive), so a caption holding
    that text would encode as the special ids (an eos mid-caption cuts the rest off). Without them the text is
    split like any other ("<", "end", "_", ...)."""
    bpe = _simple_tokenizer(clean)
    specials = "|".join(bpe.decoder[i] for i in bpe.all_special_ids) + "|"
    pattern = bpe.pat.pattern
    if not pattern.startswith(specials):
        raise RuntimeError(
            f"open_clip's tokenizer pattern no longer starts with its special tokens ({specials!r}); "
            "mmxattn.text.tokenizer needs updating for this open_clip version"
        )
    import regex  # open_clip's own regex engine (its pattern uses \p{L} classes)

    return regex.compile(pattern[len(specials) :], bpe.pat.flags)


@lru_cache(maxsize=1)
def _bpe_sha256() -> str:
    from open_clip.tokenizer import default_bpe

    return hashlib.sha256(Path(default_bpe()).read_bytes()).hexdigest()


class OpenCLIPTokenizer(_TokenizerBase):
    """CLIP's byte-level BPE (``open_clip.tokenizer.SimpleTokenizer``; the merges file ships with open_clip).

    Ids: BPE tokens 0..49405, ``bos`` = 49406 (<start_of_text>), ``eos`` = 49407 (<end_of_text>) as in CLIP, and
    ``pad`` = 49408, an id of our own: open_clip pads with 0, which is also the real token "!" (it appears e.g. in
    "!~"), so a loss ignoring pad=0 would ignore that word too. Hence ``vocab_size`` = 49409 (one more row in the
    embedding and LM head than CLIP's 49408).

    ``clean`` is open_clip's text cleaning: "lower" (ftfy, whitespace collapse, lowercase; CLIP's default),
    "whitespace" (no lowercasing) or "canonicalize" (also strips punctuation). Decoding joins BPE words with single
    spaces, so punctuation comes back space-separated ("a cat!" -> "a cat !"); re-encoding that gives the same ids.
    """

    TYPE = "open_clip_bpe"
    CLEAN_CHOICES = ("lower", "whitespace", "canonicalize")

    def __init__(self, context_length: int = 77, clean: str = "lower") -> None:
        super().__init__(context_length)
        if clean not in self.CLEAN_CHOICES:
            raise ValueError(f"clean must be one of {self.CLEAN_CHOICES}, got {clean!r}")
        self.clean = clean
        self._bpe = _simple_tokenizer(clean)
        self._pattern = _ordinary_pattern(clean)
        n_bpe = self._bpe.vocab_size  # 49408 = 49406 BPE tokens + sot + eot
        self.bos_id = self._bpe.sot_token_id
        self.eos_id = self._bpe.eot_token_id
        self.pad_id = n_bpe
        self.vocab_size = n_bpe + 1
        self._drop_ids = frozenset({self.bos_id, self.pad_id})

    def _encode_text(self, text: str) -> list[int]:
        # SimpleTokenizer.encode with the special tokens taken out of its pattern: user text never yields bos/eos
        bpe = self._bpe
        ids: list[int] = []
        for token in self._pattern.findall(bpe.clean_fn(text)):
            token = "".join(bpe.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(bpe.encoder[t] for t in bpe.bpe(token).split(" "))
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        return " ".join(self._bpe.decode(ids).split())  # "</w>" became spaces: collapse, strip the trailing one

    def to_dict(self) -> dict[str, Any]:
        import open_clip

        return {
            "type": self.TYPE,
            "context_length": self.context_length,
            "clean": self.clean,
            "open_clip_version": open_clip.__version__,
            "bpe_sha256": _bpe_sha256(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenCLIPTokenizer:
        clean = d.get("clean", "lower")
        if not isinstance(clean, str):
            raise TypeError(f"{cls.__name__}: field 'clean' must be a str, got {type(clean).__name__} {clean!r:.80}")
        tok = cls(context_length=_context_length_field(cls, d), clean=clean)
        saved = d.get("bpe_sha256")
        if saved is not None and saved != _bpe_sha256():
            import open_clip

            warnings.warn(
                f"OpenCLIPTokenizer was saved with open_clip {d.get('open_clip_version')} whose BPE vocabulary "
                f"differs from the installed open_clip {open_clip.__version__}: token ids may not match the model",
                UserWarning,
                stacklevel=2,
            )
        return tok


# ----------------------------------------------------------------------------------------------------------------
# word level


class WordTokenizer(_TokenizerBase):
    """Word-level tokenizer for small vocabularies (synthetic data, grounding experiments).

    Specials: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the words.

    Normalisation: split on whitespace; each word is Unicode-normalised (NFC: "café" typed precomposed or
    decomposed is one word), lowercased and has leading/trailing punctuation stripped
    ("Square." -> "square", "don't" stays); a word made only of punctuation is kept as is ("!" -> "!"). Nothing is
    ever split or dropped, so ONE whitespace word is ONE token: word i of ``text.split()`` sits at token position
    ``i + 1`` (after bos) -- the grounding metric relies on this (``word_token_positions``). Unknown words map to
    ``<unk>``, which ``decode`` prints as "<unk>". Decoding returns the normalised words joined by single spaces.
    """

    TYPE = "word"
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, vocab: Sequence[str], context_length: int = 32) -> None:
        super().__init__(context_length)
        vocab = list(vocab)
        if tuple(vocab[:4]) != self.SPECIALS:
            raise ValueError(f"vocab must start with the specials {list(self.SPECIALS)}, got {vocab[:4]}")
        for i, w in enumerate(vocab):
            if not isinstance(w, str) or not w or any(c.isspace() for c in w):
                raise ValueError(f"vocab[{i}] must be a non-empty str without whitespace, got {w!r}")
        if len(set(vocab)) != len(vocab):
            dup = next(w for w, c in Counter(vocab).items() if c > 1)
            raise ValueError(f"vocab has duplicate entries, e.g. {dup!r}")
        self.vocab = vocab
        self._index = {w: i for i, w in enumerate(vocab)}
        # Vocabularies saved before words were NFC-normalised may hold other forms; encoding normalises, so the
        # entry is also found under its NFC form (unless that form is an entry of its own).
        for i, w in enumerate(vocab):
            self._index.setdefault(unicodedata.normalize("NFC", w), i)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(vocab)
        self._drop_ids = frozenset({self.pad_id, self.bos_id})

    @staticmethod
    def normalize_word(word: str) -> str:
        w = unicodedata.normalize("NFC", word).lower()
        return w.strip(string.punctuation) or w

    @classmethod
    def words(cls, text: str) -> list[str]:
        """Normalised words of ``text``, one per entry of ``text.split()``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [cls.normalize_word(w) for w in text.split()]

    @classmethod
    def build(
        cls, corpus: Iterable[str], min_freq: int = 1, max_size: int | None = None, context_length: int = 32
    ) -> WordTokenizer:
        """Vocabulary of the words of ``corpus`` seen at least ``min_freq`` times, most frequent first (ties
        alphabetical, so the result is deterministic); ``max_size`` caps the number of words (specials excluded)."""
        if isinstance(corpus, str):
            raise TypeError("corpus must be an iterable of str (e.g. a list of captions), got a single str")
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
        counts: Counter[str] = Counter()
        for i, text in enumerate(corpus):
            if not isinstance(text, str):
                raise TypeError(f"corpus item {i} must be a str, got {type(text).__name__}")
            counts.update(cls.words(text))
        words = sorted(
            (w for w, c in counts.items() if c >= min_freq and w not in cls.SPECIALS), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            words = words[:max_size]
        return cls([*cls.SPECIALS, *words], context_length=context_length)

    def _encode_text(self, text: str) -> list[int]:
        return [self._index.get(w, self.unk_id) for w in self.words(text)]

    def _decode_ids(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def unknown_words(self, texts: str | Sequence[str]) -> list[list[str]]:
        """Per text, its whitespace words (as written, e.g. "Hexagon.") that encode to ``<unk>``, in order
        (repeats kept)."""
        out = []
        for text in [texts] if isinstance(texts, str) else texts:
            normalised = self.words(text)  # (a TypeError naming a non-str)
            unk = [w for w, n in zip(text.split(), normalised) if self._index.get(n, self.unk_id) == self.unk_id]
            out.append(unk)
        return out

    def word_token_positions(self, text: str, context_length: int | None = None) -> list[int]:
        """Token position of each word of ``text.split()`` in ``self(text)[0]``: word i -> i + 1, or -1 where the
        word was cut off by truncation."""
        n_words = len(self.words(text))
        room = (self.context_length if context_length is None else context_length) - 2
        return [i + 1 if i < room else -1 for i in range(n_words)]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "context_length": self.context_length, "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        vocab = _required_field(cls, d, "vocab")
        if not isinstance(vocab, (list, tuple)):
            raise TypeError(f"{cls.__name__}: field 'vocab' must be a list of str, got {type(vocab).__name__}")
        return cls(vocab=vocab, context_length=_context_length_field(cls, d))


# ----------------------------------------------------------------------------------------------------------------
# loading

_TYPES: dict[str, type] = {OpenCLIPTokenizer.TYPE: OpenCLIPTokenizer, WordTokenizer.TYPE: WordTokenizer}


def _required_field(cls: type, d: dict[str, Any], name: str) -> Any:
    """``d[name]``, or a ``ValueError`` naming the missing field (not a bare ``KeyError``)."""
    if name not in d:
        raise ValueError(
            f"{cls.__name__}: the tokenizer dict (type {d.get('type')!r}) has no {name!r} field; "
            f"its fields: {sorted(map(str, d))}"
        )
    return d[name]


def _context_length_field(cls: type, d: dict[str, Any]) -> int:
    v = _required_field(cls, d, "context_length")
    if isinstance(v, bool) or not isinstance(v, int):  # a float would be truncated silently
        raise TypeError(f"{cls.__name__}: field 'context_length' must be an int, got {type(v).__name__} {v!r:.80}")
    return v


def unknown_words(tokenizer: Any, texts: Sequence[str]) -> list[list[str]]:
    """Per text, its whitespace words that ``tokenizer`` reads as ``<unk>``: the tokenizer's own ``unknown_words``
    where it has one (ours), else, for any tokenizer with an ``unk_id``, the words that encode to it one by one;
    empty lists for a tokenizer without an ``<unk>`` token (byte-level BPE reads any text)."""
    own = getattr(tokenizer, "unknown_words", None)
    if callable(own):
        return own(list(texts))
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None:
        return [[] for _ in texts]
    words = [t.split() for t in texts]
    flat = sorted({w for ws in words for w in ws})
    if not flat:
        return [[] for _ in texts]
    unknown = {w for w, row in zip(flat, tokenizer(flat)) if bool((row == unk).any())}
    return [[w for w in ws if w in unknown] for ws in words]


def tokenizer_from_dict(d: dict[str, Any]) -> OpenCLIPTokenizer | WordTokenizer:
    """Inverse of ``to_dict``; dispatches on ``d["type"]``. A missing or invalid field is a ``ValueError`` or
    ``TypeError`` naming it."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"tokenizer dict must be a dict with a 'type' key, got {type(d).__name__}: {d!r:.120}")
    cls = _TYPES.get(d["type"]) if isinstance(d["type"], str) else None
    if cls is None:
        raise ValueError(f"unknown tokenizer type {d['type']!r:.80}; known: {sorted(_TYPES)}")
    return cls.from_dict(d)


def load_tokenizer(path: str | Path) -> OpenCLIPTokenizer | WordTokenizer:
    """Load from a directory holding ``tokenizer.json`` (or the JSON file itself). JSON only: no code runs.
    A file that is not JSON, or whose fields are missing or invalid, is an error naming the file and the field."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer file at {file} (expected a directory with {TOKENIZER_FILE})")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a tokenizer file, not readable JSON ({type(e).__name__}: {e})") from e
    try:
        return tokenizer_from_dict(d)
    except (TypeError, ValueError) as e:
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"{file}: invalid tokenizer file: {e}") from e
