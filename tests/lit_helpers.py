"""Shared pieces of the tests: tiny data sets in the real formats, CLI argument sets that shrink a shipped config to
a CPU smoke run, and a recorder of a model's preprocess calls. Not a test module."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
WORDS = ["red", "blue", "green", "circle", "square", "small", "large", "left", "of", "a", "the", "shape"]


def _jpeg(path: Path, seed: int, size: int = 48) -> None:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
    img.paste(tuple(rng.randrange(256) for _ in range(3)), (x0, y0, x0 + size // 3, y0 + size // 3))
    img.save(path, quality=90)


def _caption(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 8)))


def make_csv(root: Path, n_images: int = 12, caps: int = 2) -> dict[str, str]:
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for i in range(n_images):
        _jpeg(img_dir / f"{i}.jpg", i)
        rows += [f"{i}.jpg,{_caption(i * 10 + j)}" for j in range(caps)]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    p = str(root / "pairs.csv")
    return {"train_path": p, "val_path": p, "test_path": p, "image_root": str(img_dir)}


def make_coco(root: Path, n_images: int = 12) -> dict[str, str]:
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        _jpeg(img_dir / f"{i}.jpg", 100 + i)
        images.append({"id": i, "file_name": f"{i}.jpg"})
        anns += [{"id": i * 10 + j, "image_id": i, "caption": _caption(100 + i * 10 + j)} for j in range(2)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    p = str(root / "captions.json")
    return {"train_path": p, "val_path": p, "test_path": p, "image_root": str(img_dir)}


def make_wds(root: Path, n_shards: int = 2, per_shard: int = 8) -> dict[str, str | None]:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"train-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}_{i:04d}"
                buf = io.BytesIO()
                _jpeg(root / "tmp.jpg", 1000 + s * 100 + i)
                buf.write((root / "tmp.jpg").read_bytes())
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", _caption(s * 100 + i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pattern = str(root / f"train-{{000..{n_shards - 1:03d}}}.tar")
    return {"train_path": pattern, "val_path": pattern, "test_path": None, "image_root": None}


def smoke_args(
    config: str, tmp: Path, data_paths: dict | None = None, fast_dev_run: int = 2, overlays: tuple[str, ...] = ()
) -> list[str]:
    """CLI arguments that run ``config`` (then the ``overlays`` configs on top of it, as a user would stack them) as
    a CPU smoke test: tiny model and data, fast_dev_run."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / config),
        *(a for name in overlays for a in ("--config", str(CONFIGS / name))),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        f"--trainer.fast_dev_run={fast_dev_run}",
        f"--trainer.default_root_dir={tmp}",
        "--model.preset=mmx_tiny",
        "--model.rerank=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.img_size=64",
    ]
    if data_paths is None:  # shapes
        args += [
            "--data.init_args.train_size=32",
            "--data.init_args.val_size=8",
            "--data.init_args.test_size=8",
            f"--data.init_args.cache_dir={tmp / 'cache'}",
        ]
    else:
        args += [
            f"--data.init_args.{k}={v}" if v is not None else f"--data.init_args.{k}=null"
            for k, v in data_paths.items()
        ]
    return args


def data_linked(dm) -> dict[str, int]:
    """The MMXAttnModule arguments the CLI links from a data module (vocabulary size, special ids, context)."""
    return dict(
        vocab_size=dm.vocab_size, pad_id=dm.pad_id, bos_id=dm.bos_id, eos_id=dm.eos_id,
        context_length=dm.context_length,
    )  # fmt: skip


def record_preprocess_batches(model, monkeypatch) -> list[int]:
    """Patch ``model.preprocess`` to record the batch size of every call that reads raw images (not a call that
    passes an already preprocessed tensor through, as ``generate`` does): the list it appends to is returned."""
    import torch

    sizes: list[int] = []
    real = model.preprocess

    def recording(images, **kwargs):
        out = real(images, **kwargs)
        if not isinstance(images, torch.Tensor):
            sizes.append(out.shape[0])
        return out

    monkeypatch.setattr(model, "preprocess", recording)
    return sizes
