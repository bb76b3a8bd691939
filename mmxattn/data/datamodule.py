"""LightningDataModules: the embedded shapes data (default) and real image-caption formats (CSV, COCO, WebDataset).

Both build their tokenizer at construction (LightningCLI links ``data.vocab_size`` & co. into the model before
``fit`` starts) and expose ``tokenizer``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``context_length``.
Batches follow the contract in :mod:`mmxattn.data.batching` (train: one caption per image; val/test: one image
with all its captions).

Broken samples: every batch carries ``batch["skipped"]`` (``[(source, reason), ...]``). The LightningModule reports
each training batch with ``self.trainer.datamodule.skip_tracker.update_from_batch(batch)`` (before returning None
for an all-broken batch, which has no ``images``), and logs ``skip_tracker.end_epoch()`` in
``on_train_epoch_end``; the tracker raises ``BadDataError`` once more than ``max_broken_fraction`` of the epoch
was broken. Under DDP each rank tracks its own share.

Exact resume (map-style data: shapes, CSV, COCO): the train order is a function of (seed, epoch, rank, world size)
and each sample of (seed, epoch, index); ``train_dataloader`` reads the restored loop position from the trainer and
starts the sampler after the batches already trained (see :mod:`mmxattn.data.batching`). WebDataset streams
restart the interrupted epoch from its beginning (shard order is a function of seed and epoch; ``train_dataloader``
gives the stream the restored epoch, and ``set_epoch`` reaches it too).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..text.tokenizer import OpenCLIPTokenizer, WordTokenizer, load_tokenizer
from .batching import EpochIndexed, EvalCollate, ResumableLoader, ResumableSampler, TrainCollate, resume_position
from .formats import CocoCaptionsDataset, CsvDataset, DataFileNotFoundError, DatasetFormatError, WebDatasetCaptions
from .robust import SkipTracker, caption_problem
from .shapes import ShapesDataset, most_frequent_caption, retrieval_ceilings
from .shapes_captions import MAX_CAPTION_WORDS, check_caption, vocabulary
from .transforms import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_transforms

__all__ = ["ImageTextDataModule", "ShapesDataModule"]

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "openai": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}


class _CaptionDataModule(pl.LightningDataModule):
    """Loaders, tokenizer properties and the skip tracker shared by both data modules."""

    _tokenizer: Any
    batch_size: int
    num_workers: int
    seed: int

    def _init_loading(
        self,
        batch_size: int,
        num_workers: int,
        seed: int,
        max_broken_fraction: float,
        train_captions_per_image: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if train_captions_per_image < 1:
            raise ValueError(f"train_captions_per_image must be >= 1, got {train_captions_per_image}")
        self.train_captions_per_image = int(train_captions_per_image)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.skip_tracker = SkipTracker(max_fraction=max_broken_fraction)
        self._sampler: ResumableSampler | None = None
        self._train_stream: WebDatasetCaptions | None = None  # the train data when it is a stream (no sampler)

    # --- tokenizer
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self._tokenizer.pad_id

    @property
    def bos_id(self) -> int:
        return self._tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self._tokenizer.eos_id

    @property
    def context_length(self) -> int:
        return self._tokenizer.context_length

    # --- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _replicas(self) -> tuple[int, int]:
        """(world size, rank) of data parallelism: the trainer's, else torch.distributed's, else (1, 0)."""
        trainer = self._trainer_or_none()
        kw = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if kw:
            return int(kw["num_replicas"]), int(kw["rank"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)  # None until a Trainer attaches this module

    def _map_train_loader(self, dataset: Dataset) -> DataLoader:
        """Shuffled, resumable loader over a map-style train set (see the module docstring)."""
        world, rank = self._replicas()
        sampler = ResumableSampler(EpochIndexed(dataset, self.seed), world, rank, shuffle=True, seed=self.seed)
        trainer = self._trainer_or_none()
        position = resume_position(trainer) if trainer is not None else None
        if position is not None:
            epoch, batches_done = position
            sampler.resume(epoch, batches_done * self.batch_size)
        elif trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        self._sampler = sampler
        self._check_train_size(len(dataset), world)
        loader = ResumableLoader(
            sampler.dataset,
            sampler=sampler,
            drop_last=True,
            collate_fn=self._train_collate(),
            # seeds the workers' base seed: nothing of ours draws from it (augmentations are seeded per sample)
            generator=torch.Generator().manual_seed(self.seed),
            **self._loader_kwargs(),
        )
        loader.resume_at = position
        loader.fit_loop = getattr(trainer, "fit_loop", None) if position is not None else None
        return loader

    def _train_source(self) -> str:
        """How errors about the training split name it."""
        return "the training split"

    def _check_train_size(self, n_items: int, world: int | None = None) -> None:
        """A training split smaller than one batch (on every process) would run no step: an error naming it."""
        world = self._replicas()[0] if world is None else world
        if n_items < self.batch_size * world:
            raise DatasetFormatError(
                f"{type(self).__name__}: {self._train_source()} has {n_items} items, fewer than one batch "
                f"(batch_size {self.batch_size} x {world} process(es)); full batches only (drop_last), so no step "
                "would run: lower data.batch_size or add data"
            )

    def _train_collate(self) -> TrainCollate:
        return TrainCollate(self._tokenizer, captions_per_image=self.train_captions_per_image)

    def _eval_loader(self, dataset: Dataset, collate: EvalCollate) -> DataLoader:
        # Lightning shards this with a padded DistributedSampler under DDP: gather and dedupe by image_ids
        return DataLoader(dataset, shuffle=False, drop_last=False, collate_fn=collate, **self._loader_kwargs())

    def has_split(self, split: str) -> bool:
        """Whether the data module can serve ``split`` ("train" | "val" | "test")."""
        paths = getattr(self, "paths", None)
        return True if paths is None else paths.get(split) is not None

    def set_epoch(self, epoch: int) -> None:
        """Set the train sampler's epoch (Lightning does this itself; for use without a Trainer), or a train
        stream's (Lightning does not: it only reaches samplers)."""
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)
        if self._train_stream is not None:
            self._train_stream.set_epoch(epoch)


def _epoch_to_run(trainer: Any) -> int:
    """The epoch a fit is about to run when it asks for the train loader: the one its samplers get (the fit loop's
    processed epochs), or the next one after a checkpoint from an epoch's last batch (see ``resume_position``)."""
    position = resume_position(trainer)
    if position is not None:
        return position[0]
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None)
    return int(progress.processed) if progress is not None else int(getattr(trainer, "current_epoch", 0))


# ---------------------------------------------------------------------------------------------------- shapes


def _holdout_pairs(holdout: list[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for h in holdout or []:
        words = h.split() if isinstance(h, str) else list(h)
        if len(words) != 2:
            raise ValueError(f"holdout: entries are 'colour shape' strings like 'red circle', got {h!r}")
        pairs.append((words[0], words[1]))
    return pairs


class ShapesDataModule(_CaptionDataModule):
    """The embedded grounded shapes data (:class:`mmxattn.data.shapes.ShapesDataset`), generated on the fly.

    Train: one item per image, its caption drawn per (seed, epoch, index). Val/test: every caption of every image,
    plus ``boxes`` and token-level ``groundings``. The word tokenizer's vocabulary is everything the caption
    templates can produce, so it is the same for every split, seed and run.

    Args:
        img_size: image side in pixels (generated at this size).
        train_size: images in the train split.
        val_size: images in the val split.
        test_size: images in the test split.
        captions_per_image: distinct captions generated per image.
        batch_size: DataLoader batch size (val/test use the same batch size).
        num_workers: DataLoader worker processes.
        train_captions_per_image: captions of each image in one training batch (1 = one caption drawn per image and
            epoch). K > 1 encodes each image once for K of its captions: the contrastive loss treats them all as
            its positives and the decoder learns all K. Text work grows K-fold, image work does not.
        seed: generation seed (splits are disjoint streams of it) and train shuffle seed.
        holdout: "colour shape" pairs (e.g. "red circle") never shown in training; val/test keep them.
        cache_dir: generate images once into memory-mapped files there (built by ``prepare_data``).
        context_length: tokens per caption including bos/eos (the longest caption has 19 words).
        flip: paired horizontal flip in training (image, boxes and left/right in captions flip together).
        min_objects: fewest objects per image (objects per image: 1..4).
        max_objects: most objects per image (objects per image: 1..4).
    """

    def __init__(
        self,
        img_size: int = 64,
        train_size: int = 20000,
        val_size: int = 500,
        test_size: int = 1000,
        captions_per_image: int = 5,
        batch_size: int = 64,
        num_workers: int = 2,
        train_captions_per_image: int = 1,
        seed: int = 0,
        holdout: list[str] | None = None,
        cache_dir: str | None = None,
        context_length: int = 24,
        flip: bool = False,
        min_objects: int = 1,
        max_objects: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if context_length < MAX_CAPTION_WORDS + 2:
            raise ValueError(
                f"context_length={context_length} cannot hold the longest shapes caption "
                f"({MAX_CAPTION_WORDS} words + bos + eos = {MAX_CAPTION_WORDS + 2})"
            )
        if train_captions_per_image > captions_per_image:
            raise ValueError(
                f"train_captions_per_image={train_captions_per_image} > captions_per_image={captions_per_image}"
            )
        # a broken shape is a bug: no skip budget
        self._init_loading(batch_size, num_workers, seed, 0.0, train_captions_per_image)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.img_size, self.flip = img_size, flip
        self._common = dict(
            img_size=img_size,
            seed=seed,
            captions_per_image=captions_per_image,
            holdout=_holdout_pairs(holdout),
            cache_dir=cache_dir,
            min_objects=min_objects,
            max_objects=max_objects,
        )
        self._tokenizer = WordTokenizer([*WordTokenizer.SPECIALS, *vocabulary()], context_length=context_length)
        self._datasets: dict[str, ShapesDataset] = {}
        self.dataset("val")  # argument errors (holdout names, sizes) now, not when fit starts

    def dataset(self, split: str, transform: Any = None) -> ShapesDataset:
        """A ShapesDataset of ``split`` with this module's settings (``transform=None``: raw uint8 images)."""
        return ShapesDataset(split, size=self.sizes[split], transform=transform, **self._common)

    def prepare_data(self) -> None:
        if self._common["cache_dir"] is not None:  # rank 0 only: write the caches once
            for split in self.sizes:
                self.dataset(split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._datasets["train"] = self.dataset("train", build_transforms(self.img_size, True, flip=self.flip))
            if stage == "fit":  # before training (and its sanity check) starts, not when the loader is built
                self._check_train_size(len(self._datasets["train"]))
        for split, stages in (("val", (None, "fit", "validate")), ("test", (None, "test"))):
            if stage in stages:
                self._datasets[split] = self.dataset(split, build_transforms(self.img_size, False))

    def _train_source(self) -> str:
        return f"the training split (train_size={self.sizes['train']})"

    def _get(self, split: str) -> ShapesDataset:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._map_train_loader(self._get("train"))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._get("val"), EvalCollate(self._tokenizer, grounding=True))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._get("test"), EvalCollate(self._tokenizer, grounding=True))

    # --- for evaluation code
    def ceilings(self, split: str = "test") -> dict[str, float]:
        """Retrieval recall a "perfect meaning" model can expect on ``split`` (see ``shapes.retrieval_ceilings``)."""
        return retrieval_ceilings(self.dataset(split))

    def constant_caption(self) -> str:
        """The most frequent training caption: the constant-caption baseline for caption metrics."""
        return most_frequent_caption(self.dataset("train"))

    def caption_fit_rate(self, caption: str, split: str = "test") -> float:
        """Share of ``split``'s images that ``caption`` is true of (the ``caption_fit`` of a model that always
        says it; e.g. the constant caption's)."""
        ds = self.dataset(split)
        return sum(bool(c and c.fits) for c in (check_caption(caption, ds.scene(i)) for i in range(len(ds)))) / len(ds)


# ------------------------------------------------------------------------------------------------ real formats

FORMATS = ("csv", "coco", "wds")


class ImageTextDataModule(_CaptionDataModule):
    """Image-caption data in the formats of :mod:`mmxattn.data.formats`.

    WebDataset eval: one sample = one image; its references are the ``captions`` (or ``caption``/``text``) list of
    its ``.json``, or its single ``.txt``. Captions of one image spread over several samples are not grouped, so
    such shards give one gallery entry per sample (retrieval then counts the other copies as misses).

    Args:
        format: "csv" (CSV/TSV with image-path and caption columns), "coco" (official captions JSON or a Karpathy
            split file) or "wds" (WebDataset tar shards: brace notation, a directory, or "::"-joined lists).
        train_path: the file (or shards) of the train split; None = no such split. For one Karpathy file holding
            every split, pass it as each path (``train_split``, ``val_split``, ``test_split`` pick the split).
        val_path: the file (or shards) of the val split; None = no such split. Karpathy file: as ``train_path``.
        test_path: the file (or shards) of the test split; None = no such split. Karpathy file: as ``train_path``.
        image_root: directory image paths are relative to (csv/coco; default: the file's directory).
        img_key: CSV column of the image paths.
        caption_key: CSV column of the captions.
        csv_separator: CSV separator (default: tab for .tsv, else comma).
        train_split: name of the train split inside a Karpathy file ("train" includes "restval").
        val_split: name of the val split inside a Karpathy file.
        test_split: name of the test split inside a Karpathy file.
        tokenizer: "openclip" (CLIP BPE), "word" (word vocabulary built from the train captions; csv/coco), or
            the path of a saved ``tokenizer.json`` (or its directory).
        context_length: tokens per caption including bos/eos.
        img_size: output side.
        normalization: "imagenet" or "openai" (CLIP) mean/std.
        train_augment: RandomResizedCrop over 80-100% of the area in training (no flip, no colour jitter).
        batch_size: DataLoader batch size (val/test use the same batch size).
        num_workers: DataLoader worker processes.
        seed: seed of the training order (sampler; WebDataset shard and sample shuffling) and of per-sample
            draws in training (augmentations, the caption with ``train_items="images"``).
        max_broken_fraction: share of broken training samples per epoch above which the run stops.
        shuffle_buffer: wds only, samples shuffled within each reader.
        samples_per_epoch: wds only, a fixed number of training items per epoch over all ranks and workers (shards
            are re-read when they run out). Needed for multi-GPU training unless every rank's shards hold the same
            number of samples: otherwise a rank with fewer batches ends its epoch first and the others wait for it.
        train_captions_per_image: each training item brings up to this many captions of its image (the drawn one
            and the next ones of the image; see ``ShapesDataModule``); 1 = one caption per item.
        train_items: what one training item is. "pairs" (default): every (image, caption) pair, so an image with 5
            captions is seen 5 times per epoch. "images": every image once per epoch with a caption drawn per
            (seed, epoch, index) -- with ``train_captions_per_image`` > 1 the right choice for COCO-style data, where
            "pairs" would bring each image's K captions once per pair. With "images", unusable captions are
            warned about and dropped instead of counted as skipped samples.
    """

    def __init__(
        self,
        format: str = "csv",
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        image_root: str | None = None,
        img_key: str = "filepath",
        caption_key: str = "title",
        csv_separator: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        tokenizer: str = "openclip",
        context_length: int = 32,
        img_size: int = 224,
        normalization: str = "imagenet",
        train_augment: bool = False,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        max_broken_fraction: float = 0.05,
        shuffle_buffer: int = 1000,
        train_captions_per_image: int = 1,
        train_items: str = "pairs",
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if samples_per_epoch is not None and format != "wds":
            raise ValueError(
                f"samples_per_epoch is for WebDataset streams (format: wds); a {format} epoch is its file's samples"
            )
        self.samples_per_epoch = samples_per_epoch
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {tuple(NORMALIZATIONS)}, got {normalization!r}")
        if train_items not in ("pairs", "images"):
            raise ValueError(f"train_items must be 'pairs' or 'images', got {train_items!r}")
        self.format = format
        self._train_mode = "train" if train_items == "pairs" else "train_images"
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        for split, p in self.paths.items():  # missing files fail now; format problems in setup (or now, for "word")
            if p is not None and format != "wds" and not os.path.isfile(p):
                where = "" if os.path.isabs(p) else f" (relative to the working directory {os.getcwd()})"
                raise DataFileNotFoundError(f"ImageTextDataModule: {split}_path {p!r} does not exist{where}")
        self.image_root, self.img_key, self.caption_key, self.csv_separator = (
            image_root,
            img_key,
            caption_key,
            csv_separator,
        )
        self.img_size, self.train_augment, self.shuffle_buffer = img_size, train_augment, shuffle_buffer
        self.mean, self.std = NORMALIZATIONS[normalization]
        self._init_loading(batch_size, num_workers, seed, max_broken_fraction, train_captions_per_image)
        self.skip_tracker.source = f"train_path {train_path}" if train_path else None  # the data its error names
        self._datasets: dict[str, Dataset] = {}
        self._tokenizer = self._build_tokenizer(tokenizer, context_length)

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Tokenize captions with ``tokenizer`` from now on (e.g. a trained model's, so that evaluation references
        get the ids the model was trained with, whatever vocabulary this module would build)."""
        self._tokenizer = tokenizer

    def _build_tokenizer(self, spec: str, context_length: int) -> Any:
        if spec == "openclip":
            return OpenCLIPTokenizer(context_length=context_length)
        if spec == "word":
            if self.format == "wds" or self.paths["train"] is None:
                raise ValueError(
                    "tokenizer='word' builds its vocabulary from a csv/coco train_path; for WebDataset shards save a "
                    "tokenizer (WordTokenizer.build(captions).save(dir)) and pass its path"
                )
            train = self._make("train", self._train_mode, transform=None)  # also validates the train file now
            captions = [c for r in train.records for c in r.captions if caption_problem(c) is None]
            train.transform = self._transform(True)
            self._datasets["train"] = train  # read once
            return WordTokenizer.build(captions, context_length=context_length)
        if os.path.exists(spec):
            tok = load_tokenizer(spec)
            if tok.context_length != context_length:
                tok = type(tok).from_dict({**tok.to_dict(), "context_length": context_length})
            return tok
        raise ValueError(f"tokenizer must be 'openclip', 'word' or the path of a tokenizer.json, got {spec!r}")

    def _transform(self, train: bool) -> Any:
        crop = (0.8, 1.0) if (train and self.train_augment) else None
        return build_transforms(self.img_size, train, mean=self.mean, std=self.std, crop_scale=crop)

    def _make(self, split: str, mode: str, transform: Any) -> Dataset:
        path = self.paths[split]
        try:
            if self.format == "csv":
                return CsvDataset(
                    path,
                    self.image_root,
                    mode=mode,
                    transform=transform,
                    img_key=self.img_key,
                    caption_key=self.caption_key,
                    sep=self.csv_separator,
                )
            if self.format == "coco":
                return CocoCaptionsDataset(
                    path, self.image_root, split=self.splits[split], mode=mode, transform=transform
                )
            return WebDatasetCaptions(
                path,
                mode=mode,
                transform=transform,
                json_caption_fields=("captions", "caption", "text"),
                shuffle_shards=mode == "train",
                shuffle_buffer=self.shuffle_buffer if mode == "train" else 0,
                seed=self.seed,
                samples_per_epoch=self.samples_per_epoch if split == "train" else None,
            )
        except DatasetFormatError as e:  # say which argument of ours it was
            raise DatasetFormatError(f"ImageTextDataModule {split}_path ({self.format}): {e}") from None
        except FileNotFoundError as e:
            raise DataFileNotFoundError(f"ImageTextDataModule {split}_path ({self.format}): {e}") from None

    def setup(self, stage: str | None = None) -> None:
        wanted = {None: ("train", "val", "test"), "fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in wanted.get(stage, ()):
            if self.paths[split] is None:
                if split == "train":
                    raise DatasetFormatError("ImageTextDataModule: fitting needs train_path")
                continue
            if split not in self._datasets:
                mode = self._train_mode if split == "train" else "eval"
                self._datasets[split] = self._make(split, mode, self._transform(split == "train"))
        train = self._datasets.get("train")
        if stage == "fit" and train is not None and not isinstance(train, WebDatasetCaptions):
            self._check_train_size(len(train))  # before training (and its sanity check) starts

    def _train_source(self) -> str:
        return f"train_path {self.paths['train']}: the training split"

    def _get(self, split: str) -> Dataset | None:
        if self.paths[split] is None:
            return None
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        ds = self._get("train")
        if ds is None:
            raise ValueError("ImageTextDataModule: train_dataloader needs train_path")
        if isinstance(ds, WebDatasetCaptions):
            # a stream: order from (seed, epoch) shard shuffling, per-reader sample shuffling; no sampler
            world, _ = self._replicas()
            if world > 1 and ds.samples_per_epoch is None:
                warnings.warn(
                    f"WebDataset training on {world} ranks without samples_per_epoch: unless every rank's shards "
                    "hold the same number of samples, ranks run different numbers of steps and the run can hang at "
                    "an epoch's end; set --data.init_args.samples_per_epoch",
                    stacklevel=2,
                )
            # the shard order is a function of the epoch: start at the epoch the trainer is about to run (a resumed
            # run's, not 0). Lightning iterates an unsized loader as soon as it gets it, before on_train_epoch_start
            # (and persistent workers copy the data set then); later passes count the following epochs
            trainer = self._trainer_or_none()
            if trainer is not None:
                ds.set_epoch(_epoch_to_run(trainer))
            self._train_stream = ds
            return DataLoader(ds, drop_last=True, collate_fn=self._train_collate(), **self._loader_kwargs())
        return self._map_train_loader(ds)

    def val_dataloader(self) -> DataLoader | list:
        ds = self._get("val")
        return [] if ds is None else self._eval_loader(ds, EvalCollate(self._tokenizer))

    def test_dataloader(self) -> DataLoader | list:
        ds = self._get("test")
        if ds is None:
            raise DatasetFormatError("ImageTextDataModule: testing needs test_path")
        return self._eval_loader(ds, EvalCollate(self._tokenizer))
