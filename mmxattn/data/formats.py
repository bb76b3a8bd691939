"""Image-caption data sets in the formats users train on: CSV/TSV, COCO captions JSON, WebDataset tar shards.

Every data set yields the same sample dict::

    {"image": PIL RGB image or transform(image), "caption": str, "captions": list[str],
     "image_id": str | int, "path": str, "key": str}

``mode="train"`` gives one item per (image, caption) pair (``captions`` still lists all captions of the image);
``mode="train_images"`` gives one item per image with one of its captions drawn at random (map-style sets: from
torch's RNG, which the training loader seeds per (seed, epoch, index); WebDataset: from (seed, epoch, sample key)), so
an epoch sees every image once however many captions it has (COCO: 5x fewer image decodes per epoch than pairs);
``mode="eval"`` gives one item per image with all its captions (``caption`` is the first), as retrieval needs.
Broken samples come back as ``BrokenSample`` markers (see robust.py) to be dropped and counted by
``collate_skipping``; a broken *setup* (missing file or column, wrong image root, empty split, unknown JSON) raises at
construction, naming the file and what is missing.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .robust import (
    BadImageError,
    BrokenSample,
    DataSetupError,
    _reason_kind,
    caption_problem,
    check_image_root,
    load_image,
)

__all__ = ["CocoCaptionsDataset", "CsvDataset", "DataFileNotFoundError", "DatasetFormatError", "WebDatasetCaptions"]

Mode = Literal["train", "train_images", "eval"]
MODES = ("train", "train_images", "eval")
Transform = Callable[[Image.Image], Any]


class DatasetFormatError(DataSetupError, ValueError):
    """The data set's files are not in the expected format or cannot be trained on as given (missing column, unknown
    JSON layout, an empty split or one whose every sample is unusable, a training split smaller than one batch)."""


class DataFileNotFoundError(DataSetupError, FileNotFoundError):
    """A data file, shard or image root that does not exist, named with the data module argument that gave it."""


@dataclass
class _Record:
    """One image and its captions; ``origins`` says where each caption came from, for skip messages."""

    path: str
    image_id: str | int
    key: str
    captions: list[Any] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _make_sample(
    img: Image.Image,
    transform: Transform | None,
    caption: str,
    captions: list[str],
    image_id: str | int,
    path: str,
    key: str,
) -> dict[str, Any]:
    image = transform(img) if transform is not None else img
    return {"image": image, "caption": caption, "captions": captions, "image_id": image_id, "path": path, "key": key}


class _MapCaptionDataset(Dataset):
    """Map-style base: indexes records by (image, caption) pair ("train") or by image ("train_images", "eval") and
    decodes images robustly."""

    def __init__(
        self,
        records: list[_Record],
        source: str,
        mode: Mode,
        transform: Transform | None,
        min_size: int,
        max_pixels: int | None,
        image_root: Path | None,
        check_paths: int,
        broken: Sequence[BrokenSample] = (),
    ) -> None:
        _check_mode(mode)
        if not records:
            raise DatasetFormatError(f"{source}: no image-caption rows found (empty data set)")
        check_image_root([r.path for r in records], image_root, source, check_paths)
        self.source, self.mode, self.transform = source, mode, transform
        self.min_size, self.max_pixels = min_size, max_pixels
        self.records = records
        # caption problems are known now; they become BrokenSample entries of the index so the tracker counts them
        self._valid: list[list[str]] = []
        self.caption_issues: list[tuple[str, str]] = []  # (origin, reason) of every unusable caption
        self.index: list[tuple[int, int] | int | BrokenSample] = list(broken)  # rows unusable before any image
        for i, rec in enumerate(records):
            valid = []
            for cap, origin in zip(rec.captions, rec.origins):
                why = caption_problem(cap)
                if why is None:
                    valid.append(cap.strip())
                    if mode == "train":
                        self.index.append((i, len(valid) - 1))
                else:
                    self.caption_issues.append((origin, why))
                    if mode == "train":
                        self.index.append(BrokenSample(origin, why))
            self._valid.append(valid)
            if mode != "train":  # one entry per image (its unusable captions are counted in caption_issues)
                self.index.append(i if valid else BrokenSample(rec.path, "no valid caption"))
        if all(isinstance(e, BrokenSample) for e in self.index):  # nothing to train or evaluate on
            issues = [(b.source, b.reason) for b in broken] + self.caption_issues
            reasons = Counter(_reason_kind(why) for _, why in issues)
            raise DatasetFormatError(
                f"{source}: the split has no usable sample: all {len(issues)} entries are unusable ("
                + ", ".join(f"{n} x {why}" for why, n in reasons.most_common())
                + (f"), e.g. {issues[0][0]}: {issues[0][1]}" if issues else ")")
            )
        if self.caption_issues:
            origin, why = self.caption_issues[0]
            warnings.warn(
                f"{source}: {len(self.caption_issues)} unusable caption(s) will be skipped, e.g. {origin}: {why}",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any] | BrokenSample:
        entry = self.index[idx]
        if isinstance(entry, BrokenSample):
            return entry
        i, j = entry if isinstance(entry, tuple) else (entry, 0)
        rec, captions = self.records[i], self._valid[i]
        if self.mode == "train_images":
            j = int(torch.randint(len(captions), ()))
        try:
            img = load_image(rec.path, min_size=self.min_size, max_pixels=self.max_pixels)
        except BadImageError as e:
            return BrokenSample(e.path, e.reason)
        try:
            return _make_sample(img, self.transform, captions[j], captions, rec.image_id, rec.path, rec.key)
        except Exception as e:  # a transform that cannot handle this image: skip it, the tracker shows the reason
            return BrokenSample(rec.path, f"transform failed ({type(e).__name__}: {e})")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    return p


class CsvDataset(_MapCaptionDataset):
    """Image-caption pairs from a CSV/TSV file with an image-path column and a caption column.

    Column names follow open_clip's ``--csv-img-key filepath --csv-caption-key title`` convention by default. The
    separator is a tab for ``.tsv``/``.tab`` files and a comma otherwise unless ``sep`` is given. Quoting: a CSV
    field may be double-quoted (to hold the separator, a newline, or ``""`` for a quote); a ``.tsv``/``.tab`` file
    has no quoting (the TSV convention, as in CC3M-style files: a ``"`` in a field is a literal character, fields
    hold no tab or newline). A tab-separated file written with CSV quoting (pandas' ``to_csv(sep="\\t")``) is read
    as CSV when it is not named ``.tsv``/``.tab`` and ``sep="\\t"`` is given. A malformed CSV (an unbalanced quote,
    a field over the csv module's size limit) raises ``DatasetFormatError`` naming the file and line; an unbalanced
    quote that a stray quote in a later row closes is valid CSV, and is warned about (naming the line) when the
    merged caption's continued lines start with an image path and the separator. Relative paths
    are resolved against ``image_root`` (default: the CSV's directory); absolute paths are kept. Rows naming the
    same image (after path normalisation: ``a.png`` and ``./a.png`` are one image) are grouped into one image with
    several captions. ``check_paths``: how many leading images to look for on disk at construction (if none exists
    the image root is wrong and we raise; 0 disables).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        *,
        mode: Mode = "train",
        transform: Transform | None = None,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str | None = None,
        min_size: int = 8,
        max_pixels: int | None = None,
        check_paths: int = 32,
    ) -> None:
        p = _existing_file(path, "CSV file")
        tsv = p.suffix.lower() in (".tsv", ".tab")
        if sep is None:
            sep = "\t" if tsv else ","
        root = Path(image_root) if image_root is not None else p.parent
        if not root.is_dir():
            raise FileNotFoundError(f"{p}: image_root {str(root)!r} is not a directory")
        # surrogateescape keeps non-UTF-8 bytes as lone surrogates so one bad caption is skipped, not the whole file
        with open(p, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            # strict: a quote that is never closed (or closed mid-field) raises instead of swallowing the next rows
            reader = csv.reader(f, delimiter=sep, strict=True, quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            rows = _csv_rows(reader, p)
            header = [h.strip() for h in next(rows, (1, []))[1]]
            missing = [(k, role) for k, role in ((img_key, "img_key"), (caption_key, "caption_key")) if k not in header]
            if missing:
                hint = ""
                first = header[0].lstrip() if header else ""
                if p.suffix.lower() == ".json" or first.startswith(("{", "[")):
                    hint = (
                        " It looks like a JSON file: for COCO captions JSON use format coco "
                        "(--data.init_args.format coco)."
                    )
                elif len(header) == 1 and any(s in header[0] for s in ",\t;|" if s != sep):
                    hint = f" Is the separator right? (sep={sep!r})"
                raise DatasetFormatError(
                    f"{p}: missing column(s) "
                    + ", ".join(f"{k!r} ({role})" for k, role in missing)
                    + f"; columns present: {_shorten(repr(header))}.{hint}"
                )
            ci, cc = header.index(img_key), header.index(caption_key)
            by_path: dict[str, _Record] = {}
            broken: list[BrokenSample] = []
            quoted = 0  # TSV captions wrapped in double quotes: kept literally, but likely written with CSV quoting
            merged: list[int] = []  # multi-line captions holding what look like rows of their own
            for line_no, row in rows:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                rel = row[ci].strip() if ci < len(row) else ""
                cap = row[cc] if cc < len(row) else None
                origin = f"{p.name} line {line_no}"
                if not rel:
                    broken.append(BrokenSample(f"{p} line {line_no}", f"empty {img_key!r} (image path)"))
                    continue
                if tsv and cap is not None and len(cap) > 1 and cap[0] == cap[-1] == '"':
                    quoted += 1
                if cap is not None and "\n" in cap and _looks_like_rows(cap, sep):
                    merged.append(line_no)
                # one image however its path is spelled ("a.png", "./a.png", "imgs//a.png", an absolute path)
                full = os.path.normpath(os.path.join(root, rel))
                rec = by_path.get(full)
                if rec is None:
                    rec = by_path[full] = _Record(path=full, image_id=rel, key=rel)
                rec.captions.append(cap)
                rec.origins.append(f"{origin} ({rel})")
        if merged:
            shown = ", ".join(str(n) for n in merged[:5]) + (", ..." if len(merged) > 5 else "")
            warnings.warn(
                f"{p}: {len(merged)} caption(s) span several lines that start with an image path and a {sep!r} "
                f"(record(s) starting on line {shown}): a double quote opened in one row and closed by a stray quote "
                "in a later one merges the rows between into one caption; check those lines' quotes",
                stacklevel=2,
            )
        if quoted:
            warnings.warn(
                f"{p}: {quoted} caption(s) are wrapped in double quotes, kept as part of the caption (a .tsv/.tab file "
                'has no quoting); if the file was written with CSV quoting, name it .csv and pass sep="\\t"',
                stacklevel=2,
            )
        records = list(by_path.values())
        super().__init__(records, str(p), mode, transform, min_size, max_pixels, root, check_paths, broken)


def _shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (a first "row" of a file that is not CSV can be the whole file)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def _looks_like_rows(caption: str, sep: str) -> bool:
    """Whether a line after the first of a multi-line caption starts like a row of the file: an image file name,
    then the separator (``b.png,a dog``). A quoted caption that legitimately spans lines rarely does; rows merged
    by an unbalanced quote that a later stray quote closed always do."""
    for line in caption.split("\n")[1:]:
        head, found, _ = line.partition(sep)
        if found and head.strip().strip('"').lower().endswith(_IMAGE_SUFFIXES):
            return True
    return False


def _csv_rows(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, row) of each record of ``reader`` (a quoted field can span lines, so records are not
    lines); a malformed record raises ``DatasetFormatError`` naming the file and the line it starts on."""
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if reader.line_num > start:  # a quoted field ran on over the following lines
                hint = f"; the record runs on to line {reader.line_num}: an unbalanced double quote?"
            else:
                hint = "; a stray double quote?" if '"' in str(e) else ""
            raise DatasetFormatError(f"{path} line {start}: malformed CSV ({e}){hint}") from None
        yield start, row
        start = reader.line_num + 1


def _coco_format(obj: Any) -> Literal["official", "karpathy"] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        return None
    if isinstance(obj.get("annotations"), list):
        return "official"
    first = obj["images"][0] if obj["images"] else {}
    if isinstance(first, dict) and "sentences" in first:
        return "karpathy"
    return None


class CocoCaptionsDataset(_MapCaptionDataset):
    """COCO-style captions: the official ``captions_*.json`` (``images`` + ``annotations``) or a Karpathy split file
    (``dataset_coco.json``, also ``dataset_flickr30k.json``), detected from the JSON content.

    Official files are one split each (``split`` is not needed). Karpathy files hold all splits: ``split`` picks one
    ("train" includes "restval", as in Karpathy & Fei-Fei 2015 and every COCO retrieval paper since); images are
    ``image_root / filepath / filename``. ``image_root`` defaults to the JSON's directory.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        *,
        split: str | None = None,
        mode: Mode = "train",
        transform: Transform | None = None,
        min_size: int = 8,
        max_pixels: int | None = None,
        check_paths: int = 32,
    ) -> None:
        p = _existing_file(path, "COCO annotation file")
        root = Path(image_root) if image_root is not None else p.parent
        if not root.is_dir():
            raise FileNotFoundError(f"{p}: image_root {str(root)!r} is not a directory")
        try:
            obj = json.loads(p.read_bytes().decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{p}: not valid JSON ({e})") from None
        kind = _coco_format(obj)
        if kind is None:
            keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise DatasetFormatError(
                f"{p}: neither COCO captions format ('images' + 'annotations' lists) nor Karpathy split format "
                f"('images' with 'sentences'); found top-level {keys}"
            )
        self.format = kind
        records = self._official(obj, p, root) if kind == "official" else self._karpathy(obj, p, root, split)
        super().__init__(records, str(p), mode, transform, min_size, max_pixels, root, check_paths)

    @staticmethod
    def _official(obj: dict, p: Path, root: Path) -> list[_Record]:
        by_id: dict[Any, _Record] = {}
        for n, im in enumerate(obj["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise DatasetFormatError(f"{p}: images[{n}] lacks 'id' or 'file_name': {str(im)[:200]}")
            seen = by_id.get(im["id"])
            if seen is not None:
                if os.path.normpath(str(seen.key)) == os.path.normpath(str(im["file_name"])):
                    continue  # the same entry twice: harmless
                raise DatasetFormatError(
                    f"{p}: images[{n}] has id {im['id']!r} of an earlier entry but file_name {im['file_name']!r} "
                    f"(the earlier one is {seen.key!r}); captions refer to images by id, so ids must be unique"
                )
            by_id[im["id"]] = _Record(path=os.path.join(root, im["file_name"]), image_id=im["id"], key=im["file_name"])
        if not obj["annotations"]:
            raise DatasetFormatError(f"{p}: 'annotations' is empty (no captions)")
        orphans = 0
        for n, ann in enumerate(obj["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise DatasetFormatError(f"{p}: annotations[{n}] lacks 'image_id': {str(ann)[:200]}")
            rec = by_id.get(ann["image_id"])
            if rec is None:
                orphans += 1
                continue
            rec.captions.append(ann.get("caption"))
            rec.origins.append(f"{p.name} annotation {ann.get('id', n)} (image {ann['image_id']})")
        if orphans:
            warnings.warn(f"{p}: {orphans} annotation(s) name an image_id not in 'images'; ignored", stacklevel=3)
        records = [r for r in by_id.values() if r.captions]
        if len(records) < len(by_id):
            warnings.warn(f"{p}: {len(by_id) - len(records)} image(s) have no caption; ignored", stacklevel=3)
        if not records:
            raise DatasetFormatError(f"{p}: no annotation refers to an image in 'images'")
        return records

    @staticmethod
    def _karpathy(obj: dict, p: Path, root: Path, split: str | None) -> list[_Record]:
        counts: dict[str, int] = {}
        for n, im in enumerate(obj["images"]):
            if not isinstance(im, dict):
                raise DatasetFormatError(f"{p}: images[{n}] is a {type(im).__name__}, not an object: {str(im)[:200]}")
            s = im.get("split", "?")
            counts[s] = counts.get(s, 0) + 1
        if split is None:
            raise DatasetFormatError(f"{p} is a Karpathy split file: pass split= (splits in the file: {counts})")
        wanted = {"train", "restval"} if split == "train" else {split}
        records = []
        for n, im in enumerate(obj["images"]):
            if im.get("split") not in wanted:
                continue
            if "filename" not in im or not isinstance(im.get("sentences"), list):
                raise DatasetFormatError(f"{p}: images[{n}] lacks 'filename' or 'sentences': {str(im)[:200]}")
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            image_id = im.get("cocoid", im.get("imgid", rel))
            rec = _Record(path=os.path.join(root, rel), image_id=image_id, key=rel)
            for k, sent in enumerate(im["sentences"]):
                rec.captions.append(sent.get("raw") if isinstance(sent, dict) else None)
                rec.origins.append(f"{p.name} images[{n}] sentence {k} ({rel})")
            records.append(rec)
        if not records:
            raise DatasetFormatError(f"{p}: split {split!r} has no images (splits in the file: {counts})")
        return records


# ---------------------------------------------------------------------------------------------------- WebDataset


def _expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(shards, (str, os.PathLike)) and os.path.isdir(shards):
        found = sorted(str(q) for q in Path(shards).iterdir() if q.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not found:
            raise FileNotFoundError(f"shard directory {str(shards)!r} holds no .tar/.tar.gz/.tgz files")
        return found
    if isinstance(shards, (str, os.PathLike)):
        urls = wds.shardlists.expand_urls(str(shards))  # brace notation and "::"-joined lists
    else:
        urls = [u for s in shards for u in wds.shardlists.expand_urls(str(s))]
    if not urls:
        raise DatasetFormatError(f"shard spec {shards!r} names no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[:3]}")
    return urls


def _tar_end_problem(url: str) -> str | None:
    """Why a local uncompressed shard looks truncated, or None. A complete tar ends with two zero 512-byte blocks;
    the tar reader (stream mode) ends without error when a shard is cut between members, so check the tail."""
    if not url.endswith(".tar") or "://" in url or url.startswith("pipe:"):
        return None
    try:
        size = os.path.getsize(url)
        if size == 0:
            return None  # the tar reader reports "empty file" itself
        if size % 512:
            return f"size {size} is not a multiple of 512 bytes"
        with open(url, "rb") as f:
            f.seek(max(size - 1024, 0))
            tail = f.read()
    except OSError:
        return None  # opening fails again in the reader, which reports it
    return None if tail.count(0) == len(tail) else "no end-of-archive blocks"


def _assign(n_shards: int, rank: int, world: int, worker: int, n_workers: int) -> tuple[list[int], int, int]:
    """Which shards one reader opens and which of their samples it keeps (every ``mod``-th, from ``rem``), so that
    each sample goes to exactly one (rank, worker). Shards are split when there are enough for every reader; with
    fewer, readers share shards and split them sample by sample (each sharing reader reads the shard)."""
    g, total = rank * n_workers + worker, world * n_workers
    if n_shards >= total:
        return list(range(g, n_shards, total)), 1, 0
    if n_shards >= world:
        return list(range(rank, n_shards, world)), n_workers, worker
    return list(range(n_shards)), total, g


class WebDatasetCaptions(IterableDataset):
    """Streams image-caption samples from WebDataset tar shards (``key.jpg`` + ``key.txt`` or ``key.json``).

    ``shards``: brace notation ("shards-{000..003}.tar"), a list, or a directory of .tar files. Samples are split
    across ranks (``rank``/``world_size``, default from torch.distributed at iteration time) and DataLoader workers so
    each sample is yielded exactly once per epoch per data-parallel group. Ranks may then get unequal counts, and DDP
    training would wait at the epoch's end for the rank with fewer batches: ``samples_per_epoch`` fixes the epoch
    length instead (over all ranks and workers: every reader yields ``ceil(samples_per_epoch / (world_size *
    num_workers))`` items, re-reading its shards from the start when they run out, as open_clip's
    ``--train-num-samples`` does), so every rank runs the same number of steps. ``shuffle_shards`` permutes shards
    with ``seed + epoch`` (the same on every rank, so the split stays exact); ``shuffle_buffer`` > 0 shuffles samples
    within a reader.
    A shard that fails to open or is truncated yields one ``BrokenSample(shard, reason)``; samples read before the
    damage are kept. ``path`` is the shard, ``key`` and ``image_id`` the sample key.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        mode: Mode = "train",
        transform: Transform | None = None,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        text_key: str = "txt",
        json_key: str = "json",
        json_caption_fields: Sequence[str] = ("caption", "text"),
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        min_size: int = 8,
        max_pixels: int | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        _check_mode(mode)
        if samples_per_epoch is not None and (
            isinstance(samples_per_epoch, bool) or not isinstance(samples_per_epoch, int) or samples_per_epoch < 1
        ):
            raise ValueError(f"samples_per_epoch must be a positive integer or None, got {samples_per_epoch!r}")
        self.samples_per_epoch = samples_per_epoch
        if (rank is None) != (world_size is None):
            raise ValueError(f"pass both rank and world_size or neither, got rank={rank}, world_size={world_size}")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shards = _expand_shards(shards)
        self.mode, self.transform = mode, transform
        self.image_keys = tuple(k.lower().lstrip(".") for k in image_keys)
        self.text_key, self.json_key, self.json_caption_fields = text_key, json_key, tuple(json_caption_fields)
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards, self.shuffle_buffer, self.seed = shuffle_shards, shuffle_buffer, seed
        self.min_size, self.max_pixels = min_size, max_pixels
        self._epoch = 0
        self._iterations = 0  # counts epochs inside persistent workers, where set_epoch from the main process is unseen
        self.n_caption_issues = 0  # unusable captions dropped outside mode "train" (by this reader: see _drop_captions)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` and the following ones ``epoch + 1``, ...: a persistent worker keeps
        the copy of this data set it got when the loader first iterated and counts its passes from that copy's
        epoch, so set the first epoch (e.g. a resumed run's) before the loader starts."""
        self._epoch = int(epoch)
        self._iterations = 0

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[dict[str, Any] | BrokenSample]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        epoch = self._epoch + self._iterations
        self._iterations += 1
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed + epoch).shuffle(order)  # same permutation on every reader
        picked, mod, rem = _assign(len(order), rank, world, worker, n_workers)
        urls = [order[i] for i in picked]

        current: dict[str, str] = {}
        failed: list[str] = []
        pending: list[BrokenSample] = []

        def handler(exn: Exception) -> bool:  # webdataset calls this for open/read/tar errors; we continue and count
            url = current.get("url", "?")
            if url not in failed:  # a truncated shard can raise more than once; count it once
                failed.append(url)
                if rem == 0:  # readers sharing a shard would all see its failure: only one reports it
                    msg = exn.args[0] if exn.args else ""
                    pending.append(BrokenSample(url, f"unreadable/truncated shard ({type(exn).__name__}: {msg})"))
            return True

        def raw() -> Iterator[dict[str, Any] | BrokenSample]:
            n = 0  # sample index over this reader's shards, the same on every reader sharing them
            for url in urls:
                current["url"] = url
                problem = _tar_end_problem(url)
                if problem is not None:  # tarfile stops silently when a shard is cut at a member boundary
                    handler(EOFError(problem))
                # one tarfile_samples per shard: after an error webdataset would otherwise carry the damaged shard's
                # last partial sample into the next shard and merge it with a sample of the same key
                for sample in wds.tarfile_samples([{"url": url}], handler=handler):
                    yield from pending
                    pending.clear()
                    if n % mod == rem:
                        yield sample
                    n += 1
                yield from pending
                pending.clear()

        def one_pass(n_pass: int) -> Iterator[dict[str, Any] | BrokenSample]:
            failed.clear()
            stream: Iterator = raw()
            if self.shuffle_buffer > 0:
                stream = wds.shuffle(
                    self.shuffle_buffer,
                    initial=self.shuffle_buffer // 2,
                    seed=self.seed + epoch * 9973 + rank * n_workers + worker + n_pass * 7919,
                )(stream)
            for item in stream:
                if isinstance(item, BrokenSample):
                    yield item
                else:
                    yield from self._decode(item, epoch)

        if self.samples_per_epoch is None:
            yield from one_pass(0)
            return
        quota = -(-self.samples_per_epoch // (world * n_workers))  # the same on every reader
        n, n_pass = 0, 0
        while True:
            usable = False
            for item in one_pass(n_pass):
                usable = usable or not isinstance(item, BrokenSample)
                yield item
                n += 1
                if n == quota:
                    return
            if not usable:
                raise RuntimeError(
                    f"WebDatasetCaptions: a full pass over this reader's shards {urls} gave no usable sample, so its "
                    f"samples_per_epoch share ({quota}) cannot be filled"
                )
            n_pass += 1

    def _captions(self, sample: dict[str, Any]) -> list[Any] | str:
        """The sample's captions, or a reason string when it has none we can read."""
        if self.text_key in sample:
            try:
                return [sample[self.text_key].decode("utf-8-sig")]  # -sig: drop a byte-order mark if present
            except UnicodeDecodeError:
                return "caption not valid UTF-8"
        if self.json_key in sample:
            try:
                meta = json.loads(sample[self.json_key])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return f"invalid .{self.json_key} ({e})"
            for f in self.json_caption_fields:
                if isinstance(meta, dict) and f in meta:
                    value = meta[f]
                    return list(value) if isinstance(value, list) else [value]
            return f"no caption field {list(self.json_caption_fields)} in .{self.json_key}"
        return f"no caption (expected .{self.text_key} or .{self.json_key})"

    def _drop_captions(self, source: str, reasons: list[str]) -> None:
        """Unusable captions of a sample that has usable ones, in modes "train_images" and "eval" (where the sample
        is one image, not one pair, so they are not skipped samples; mode "train" yields a ``BrokenSample`` for
        each): counted in ``n_caption_issues`` and warned about at the first one, once per reader (a DataLoader
        worker counts in its own copy), as the map-style data sets warn at construction."""
        if not reasons:
            return
        if self.n_caption_issues == 0:
            warnings.warn(
                f"WebDatasetCaptions (mode {self.mode!r}): unusable captions are dropped, e.g. {source}: {reasons[0]} "
                "(further ones read by this reader are counted in its n_caption_issues, not reported)",
                stacklevel=2,
            )
        self.n_caption_issues += len(reasons)

    def _decode(self, sample: dict[str, Any], epoch: int = 0) -> Iterator[dict[str, Any] | BrokenSample]:
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        source = f"{url}:{key}"
        ext = next((k for k in self.image_keys if k in sample), None)
        if ext is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            yield BrokenSample(source, f"no image (expected one of {list(self.image_keys)}, found {found})")
            return
        caps = self._captions(sample)
        if isinstance(caps, str):
            yield BrokenSample(source, caps)
            return
        problems = [caption_problem(c) for c in caps]
        valid = [c.strip() for c, why in zip(caps, problems) if why is None]
        if not valid:
            yield BrokenSample(source, problems[0] if problems else "no caption")
            return
        try:
            img = load_image(sample[ext], min_size=self.min_size, max_pixels=self.max_pixels, name=f"{source}.{ext}")
        except BadImageError as e:
            yield BrokenSample(e.path, e.reason)
            return
        if self.mode == "train":
            for why in problems:
                if why is not None:
                    yield BrokenSample(source, why)
        else:
            self._drop_captions(source, [why for why in problems if why is not None])
        if self.mode == "train":
            chosen = valid
        elif self.mode == "train_images":  # a function of (seed, epoch, key), whichever reader decodes the sample
            chosen = [valid[random.Random(f"{self.seed}/{epoch}/{key}").randrange(len(valid))]]
        else:
            chosen = valid[:1]
        for cap in chosen:
            try:
                # image id: the key with its shard (keys such as 000000 repeat across shards; evaluation tells
                # images apart by id)
                yield _make_sample(img, self.transform, cap, valid, source, url, key)
            except Exception as e:
                yield BrokenSample(source, f"transform failed ({type(e).__name__}: {e})")
                return
