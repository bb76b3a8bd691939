"""The embedded shapes data set: procedural, grounded image-caption pairs generated on the fly (or cached), and
the retrieval/captioning ceilings its generator implies.

Every item is a pure function of ``(seed, split, index)``: the scene and captions come from ``random.Random``
streams keyed by that triple and the pixels from a numpy stream keyed by it, so any index can be generated in
any order, by any worker, after any resume, and comes out identical. Splits use disjoint streams (the split
name is part of the key), so train/val/test never share an image by construction.

World and captions: :mod:`mmxattn.data.shapes_render`, :mod:`mmxattn.data.shapes_captions`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..runtime import remove_orphaned_files
from .shapes_captions import Caption, Meaning, caption_fits, fit_matrix, make_captions, vocabulary
from .shapes_render import COLOURS, SHAPES, Scene, render_scene, sample_scene

__all__ = [
    "ShapesDataset",
    "Annotation",
    "retrieval_ceilings",
    "caption_fit_table",
    "reference_captions",
    "most_frequent_caption",
    "caption_fits",
    "vocabulary",
]

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES: dict[str, int] = {"train": 20000, "val": 1000, "test": 1000}
GENERATOR_VERSION = 1  # bump whenever generation changes: it is part of every seed and of the cache key


@dataclass(frozen=True)
class Annotation:
    scene: Scene
    captions: tuple[Caption, ...]


def _parse_holdout(holdout: Iterable[Sequence[str]]) -> frozenset[tuple[int, int]]:
    out = set()
    for pair in holdout:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"holdout: expected (colour, shape) pairs like ('red', 'circle'), got {pair!r}")
        colour, shape = pair
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"holdout: {pair!r} is not a (colour, shape) pair; colours {COLOURS}, shapes {SHAPES}")
        out.add((COLOURS.index(colour), SHAPES.index(shape)))
    for s in range(len(SHAPES)):
        if all((c, s) in out for c in range(len(COLOURS))):
            raise ValueError(f"holdout: every colour of {SHAPES[s]!r} is held out; keep at least one")
    return frozenset(out)


class ShapesDataset(Dataset):
    """Images of 1-4 coloured shapes on a textured background, each with ``captions_per_image`` distinct captions,
    boxes and word-level grounding.

    ``__getitem__(i)`` returns a dict:
      image        (H, W, 3) uint8 numpy array (or whatever ``transform`` makes of it, e.g. a (3, H, W) float tensor)
      captions     list[str], all captions of the image
      caption      one of them: ``captions[caption_index]``
      caption_index  fixed per (seed, index, epoch); ``epoch`` is 0 unless :meth:`set_epoch` changes it
      boxes        (N, 4) float32 numpy, (x0, y0, x1, y1) in pixels of the generated image
      labels       (N, 3) int64 numpy, rows (shape, colour, size) indexing SHAPES, COLOURS, SIZES
      groundings   per caption, a list of (word positions in caption.split(), object index)
      grounding    ``groundings[caption_index]``
      image_id     int, the index within this split
      scene        the :class:`~mmxattn.data.shapes_render.Scene` (what a generated caption is checked against)
    N varies per image, so batching needs a collate that keeps boxes/labels/groundings as lists.

    ``transform``: called on the image, or on the whole sample dict when it has ``accepts_sample = True``
    (see :func:`mmxattn.data.transforms.build_transforms`, whose flip also flips boxes and swaps left/right).
    ``holdout``: (colour, shape) name pairs that never appear in the TRAIN split (val/test keep them).
    ``cache_dir``: images (.npy, memory-mapped) and annotations (.json) are generated once into files named by a
    hash of every generation argument; later datasets (and DataLoader workers) read them instead of generating.
    The dataset pickles without its arrays (workers reopen the files), so it is cheap to send to workers.
    """

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        img_size: int = 64,
        seed: int = 0,
        captions_per_image: int = 5,
        holdout: Iterable[Sequence[str]] = (),
        transform: Callable[[Any], Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        min_objects: int = 1,
        max_objects: int = 4,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        size = DEFAULT_SIZES[split] if size is None else int(size)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 32 <= img_size <= 512:
            raise ValueError(f"img_size must be in [32, 512] pixels, got {img_size}")
        if not 1 <= min_objects <= max_objects <= 4:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {min_objects}, {max_objects}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.split, self.size, self.img_size, self.seed = split, size, int(img_size), int(seed)
        self.captions_per_image, self.min_objects, self.max_objects = int(captions_per_image), min_objects, max_objects
        self.holdout = tuple(sorted((COLOURS[c], SHAPES[s]) for c, s in _parse_holdout(holdout)))
        # the compositional split: only training images avoid the held-out pairs
        self._holdout_ids = _parse_holdout(self.holdout) if split == "train" else frozenset()
        self.transform = transform
        self.epoch = 0
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._images: np.ndarray | None = None
        self._records: list[list] | None = None
        if self.cache_dir is not None:
            self._build_cache()

    # ------------------------------------------------------------------------------------------ generation

    def config(self) -> dict[str, Any]:
        """Every argument that changes what is generated (the cache key)."""
        return dict(
            version=GENERATOR_VERSION,
            split=self.split,
            size=self.size,
            img_size=self.img_size,
            seed=self.seed,
            captions_per_image=self.captions_per_image,
            holdout=[list(p) for p in self.holdout],
            min_objects=self.min_objects,
            max_objects=self.max_objects,
        )

    def _rng(self, i: int, stream: str) -> random.Random:
        # str seeds are hashed with SHA-512 by random.Random: stable across runs, processes and platforms
        return random.Random(f"shapes/v{GENERATOR_VERSION}/{self.seed}/{self.split}/{i}/{stream}")

    def _check_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for ShapesDataset({self.split!r}) of size {self.size}")
        return i

    def scene(self, i: int) -> Scene:
        i = self._check_index(i)
        return sample_scene(self._rng(i, "scene"), self.img_size, self.min_objects, self.max_objects, self._holdout_ids)

    def annotation(self, i: int) -> Annotation:
        """Scene and captions (with meanings) of image i, always generated (the cache keeps no meanings)."""
        scene = self.scene(i)
        return Annotation(scene, tuple(make_captions(scene, self._rng(i, "captions"), self.captions_per_image)))

    def render(self, i: int, scene: Scene | None = None) -> np.ndarray:
        i = self._check_index(i)
        pixels = np.random.default_rng([GENERATOR_VERSION, self.seed, SPLITS[self.split], i])
        return render_scene(self.scene(i) if scene is None else scene, pixels)

    def caption_index(self, i: int) -> int:
        """Which caption ``sample['caption']`` is; depends only on (seed, split, i, epoch), so a resumed run that
        restores the epoch sees the same pairs."""
        return self._rng(i, f"pick/{self.epoch}").randrange(self.captions_per_image)

    def set_epoch(self, epoch: int) -> None:
        """Draw a different caption per image each epoch. DataLoader workers hold their own copy: call this
        before the epoch's workers start (persistent_workers=False), or pick from ``captions`` in the collate."""
        self.epoch = int(epoch)

    # --------------------------------------------------------------------------------------------- caching

    def cache_paths(self) -> tuple[Path, Path]:
        if self.cache_dir is None:
            raise ValueError("cache_paths: this dataset has no cache_dir")
        key = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:16]
        stem = self.cache_dir / f"shapes-{self.split}-{self.img_size}px-{key}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def _build_cache(self) -> None:
        img_path, ann_path = self.cache_paths()
        if img_path.exists() and ann_path.exists():
            got = self._read_cache()  # read once: kept for this process's samples
            if not isinstance(got, str):
                self._images, self._records = got
                return
            warnings.warn(f"shapes cache {got}: rebuilding it", stacklevel=2)
        self.cache_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        # builders killed mid-write left their temporary files
        remove_orphaned_files(self.cache_dir, glob.escape(img_path.name) + ".tmp*")  # type: ignore[arg-type]
        remove_orphaned_files(self.cache_dir, glob.escape(ann_path.name) + ".tmp*")  # type: ignore[arg-type]
        tmp = f".tmp{os.getpid()}"  # concurrent builders (several ranks) each write their own, then rename
        s = self.img_size
        images = np.lib.format.open_memmap(str(img_path) + tmp, mode="w+", dtype=np.uint8, shape=(self.size, s, s, 3))
        records = []
        for i in range(self.size):
            ann = self.annotation(i)
            images[i] = self.render(i, ann.scene)
            records.append(_record(ann))
        images.flush()
        del images
        with open(str(ann_path) + tmp, "w") as f:
            json.dump({"config": self.config(), "records": records}, f, separators=(",", ":"))
        os.replace(str(img_path) + tmp, img_path)
        os.replace(str(ann_path) + tmp, ann_path)

    def _read_cache(self) -> tuple[np.ndarray, list[list]] | str:
        """The cached images (memory-mapped) and records, or why they cannot be read back (damaged, cut short,
        another size)."""
        img_path, ann_path = self.cache_paths()
        try:
            images = np.load(img_path, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"{img_path} is damaged ({e})"
        if images.shape != (self.size, self.img_size, self.img_size, 3):
            return f"{img_path} holds {images.shape}, not {(self.size, self.img_size, self.img_size, 3)}"
        try:
            with open(ann_path) as f:
                records = json.load(f)["records"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{ann_path} is damaged ({type(e).__name__}: {e})"
        if not isinstance(records, list) or len(records) != self.size:
            return f"{ann_path} does not hold {self.size} records"
        return images, records

    def _cached(self) -> tuple[np.ndarray, list[list]]:
        if self._images is None or self._records is None:
            got = self._read_cache()
            if isinstance(got, str):
                raise ValueError(f"shapes cache {got}; delete it and it is rebuilt")
            self._images, self._records = got
        return self._images, self._records

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = state["_records"] = None  # reopened lazily in the worker: a tiny pickle
        return state

    # ---------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return self.size

    def _texts(self, i: int) -> tuple[Scene, list[str], list[list[tuple[tuple[int, ...], int]]], np.ndarray | None]:
        if self.cache_dir is None:
            ann = self.annotation(i)
            return ann.scene, [c.text for c in ann.captions], [list(c.groundings) for c in ann.captions], None
        images, records = self._cached()
        scene, texts, grounds = _unrecord(records[i], self.img_size)
        return scene, texts, grounds, np.array(images[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        scene, texts, grounds, image = self._texts(i)
        if image is None:
            image = self.render(i, scene)
        c = self.caption_index(i)
        sample = dict(
            image=image,
            captions=texts,
            caption=texts[c],
            caption_index=c,
            boxes=scene.boxes(),
            labels=scene.labels(),
            groundings=grounds,
            grounding=grounds[c],
            image_id=i,
            scene=scene,
        )
        if self.transform is not None:
            if getattr(self.transform, "accepts_sample", False):
                sample = self.transform(sample)
            else:
                sample["image"] = self.transform(sample["image"])
        return sample

    def reference_captions(self) -> list[list[str]]:
        """Per image, all its captions (references for CIDEr/BLEU)."""
        if self.cache_dir is not None:
            return [list(r[6]) for r in self._cached()[1]]
        return [[c.text for c in self.annotation(i).captions] for i in range(self.size)]

    def images_with(self, colour: str, shape: str) -> list[int]:
        """Indices of images containing a ``colour`` ``shape`` (e.g. the held-out pair in a compositional test)."""
        c, s = next(iter(_parse_holdout([(colour, shape)])))
        return [i for i in range(self.size) if (c, s) in zip((sc := self.scene(i)).colour, sc.shape)]


def _record(ann: Annotation) -> list:
    s = ann.scene
    return [
        s.shape,
        s.colour,
        s.size,
        s.cx,
        s.cy,
        s.r,
        [c.text for c in ann.captions],
        [c.groundings for c in ann.captions],
    ]


def _unrecord(rec: list, img_size: int) -> tuple[Scene, list[str], list[list[tuple[tuple[int, ...], int]]]]:
    scene = Scene(img_size, *(tuple(v) for v in rec[:6]))
    grounds = [[(tuple(pos), int(k)) for pos, k in g] for g in rec[7]]
    return scene, list(rec[6]), grounds


# ----------------------------------------------------------------------------------------------- ceilings


def reference_captions(dataset: ShapesDataset) -> list[list[str]]:
    """Per image, the list of its captions (for the held-out-reference CIDEr/BLEU ceiling)."""
    return dataset.reference_captions()


def most_frequent_caption(dataset: ShapesDataset) -> str:
    """The most frequent caption string of ``dataset`` (pass the train split): the constant-caption baseline.
    Ties go to the alphabetically first caption so the answer is deterministic."""
    counts = Counter(t for caps in dataset.reference_captions() for t in caps)
    best = max(counts.values())
    return min(t for t, n in counts.items() if n == best)


def caption_fit_table(dataset: ShapesDataset) -> tuple[np.ndarray, np.ndarray, list[Meaning]]:
    """``fits`` (U, N) bool over the U distinct meanings of the split's captions and its N images, and
    ``meaning_of`` (N, K) int: the meaning of caption k of image i, as a row of ``fits``."""
    anns = [dataset.annotation(i) for i in range(len(dataset))]
    index: dict[Meaning, int] = {}
    meaning_of = np.array([[index.setdefault(c.meaning, len(index)) for c in a.captions] for a in anns], np.int64)
    meanings = list(index)
    return fit_matrix(meanings, [a.scene for a in anns]), meaning_of, meanings


def retrieval_ceilings(dataset: ShapesDataset, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Best retrieval recall any model can expect on ``dataset`` (the evaluation gallery) if it knows exactly what
    every caption means, but has no other way to tell apart the images a caption is true of.

    Let n(c) = number of gallery images caption c fits (its own image included, so n >= 1).

    Text -> image (one query per caption, the gallery is every image): every fitting image is equally likely
    to be the caption's source, so the best ranking puts the n(c) fitting images first in any order and the
    source is first with probability 1/n(c): ``t2i_r1 = mean_c 1/n(c)``, ``t2i_rK = mean_c min(1, K/n(c))``.

    Image -> text (one query per image, the gallery is every caption of every image; a hit when the top text
    is one of the query image's own captions): a gallery caption c that fits image I is owned by I with
    probability 1/n(c) (uniform over the images it fits; identical strings do not change this: a tie among m
    copies is won with probability 1/m and I owns one of them with probability m/n(c)). The best choice is a
    fitting caption with the smallest n(c), over ALL gallery captions that fit I, not only I's own (the model
    cannot tell which are its own). Two numbers:
      ``i2t_r1``: the expected hit rate of that Bayes rule on THIS gallery (ties broken at random): with T_I the
        gallery captions fitting I of minimal n, hit(I) = |T_I owned by I| / |T_I|; mean over images.
      ``i2t_r1_belief``: the rule's own expectation, mean_I max_{c fits I} 1/n(c); equal to ``i2t_r1`` on
        average over galleries. ("max over I's own captions of 1/n" is not an upper bound: the captions of
        another image J with small n, when they also fit I, are picked by the rule, and J's hits are counted.)
    Both ignore that each image owns exactly K captions (a joint assignment could exploit it) and that the
    generator makes some captions likelier for some images (a model of P(caption | image) could beat 1/n):
    treat them as ceilings of a "perfect meaning" model, not strict bounds.
    """
    fits, meaning_of, _ = caption_fit_table(dataset)  # (U, N), (N, K)
    n_img, k = meaning_of.shape
    n_fit = fits.sum(1)  # (U,) >= 1: every meaning fits its own image
    if (n_fit < 1).any():
        raise RuntimeError("retrieval_ceilings: a caption does not fit its own image (generator bug)")
    per_caption = n_fit[meaning_of]  # (N, K)
    out: dict[str, float] = {f"t2i_r{r}": float(np.minimum(1.0, r / per_caption).mean()) for r in ks}
    # image -> text
    best = np.where(fits, n_fit[:, None], np.iinfo(np.int64).max).min(0)  # (N,) smallest n among fitting meanings
    tied = fits & (n_fit[:, None] == best[None, :])  # (U, N) the meanings the rule chooses among
    copies = np.bincount(meaning_of.ravel(), minlength=len(n_fit))  # (U,) gallery captions per meaning
    owned = np.zeros_like(fits, dtype=np.int64)  # (U, N) captions of image i with meaning u
    np.add.at(owned, (meaning_of, np.arange(n_img)[:, None].repeat(k, 1)), 1)
    hits = (tied * owned).sum(0) / (tied * copies[:, None]).sum(0)
    out["i2t_r1"] = float(hits.mean())
    out["i2t_r1_belief"] = float((1.0 / best).mean())
    out.update(
        n_images=n_img,
        n_captions=int(meaning_of.size),
        n_meanings=len(n_fit),
        median_images_per_caption=float(np.median(per_caption)),
    )
    return out
