"""How fast the shapes data set produces samples, against how fast training consumes them.

    python benchmarks/data_speed.py [--img-size 64] [--n 1024] [--repeats 3] [--step-ms 20 40 60]

Prints samples/s (median of ``--repeats``) for: scene + captions only, rendering only, a full item (lazy and from
the .npy cache), a full item + the eval transform, DataLoader batches of 64 with 0 and 2 workers, and the main
job's own training loader (``ShapesDataModule.train_dataloader()``: resumable sampler, per-sample seeding, tokenised
collate with ``--captions-per-image`` captions per image, 3 as in configs/shapes.yaml); then the ratio of each to the nominal consumption of a training step (64 samples per ``--step-ms``). A ratio above 1
means the data never makes the step wait (with workers; in the main process the data time ADDS to the step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.data.shapes import ShapesDataset
from mmxattn.data.transforms import build_transforms, normalize_batch


def collate(batch: list[dict]) -> dict:
    out = {k: [s[k] for s in batch] for k in batch[0]}
    out["image"] = torch.stack(out["image"])  # (B, 3, H, W) float
    return out


def collate_uint8(batch: list[dict]) -> dict:
    """No per-sample transform: stack uint8 (B, H, W, 3) and normalise the batch at once."""
    out = {k: [s[k] for s in batch] for k in batch[0]}
    out["image"] = normalize_batch(torch.from_numpy(np.stack(out["image"])))  # (B, 3, H, W) float
    return out


def rate(fn: Callable[[], int], repeats: int) -> float:
    """Median samples/s of ``fn`` (which returns how many samples it produced)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--n", type=int, default=1024, help="samples per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--step-ms", type=float, nargs="+", default=[20.0, 40.0, 60.0])
    ap.add_argument("--captions-per-image", type=int, default=3, help="of the training loader row")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-sample work is single-threaded; keep torch from oversubscribing 2 cores
    n, s = args.n, args.img_size
    tf = build_transforms(s, train=True)
    lazy = ShapesDataset("train", size=n, img_size=s)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        cached = ShapesDataset("train", size=n, img_size=s, cache_dir=cache)
        build = n / (time.perf_counter() - t)
        cached_tf = ShapesDataset("train", size=n, img_size=s, cache_dir=cache, transform=tf)
        lazy_tf = ShapesDataset("train", size=n, img_size=s, transform=tf)
        scenes = [lazy.scene(i) for i in range(n)]

        def loader(ds: ShapesDataset, workers: int, fn: Callable = collate) -> Callable[[], int]:
            def run() -> int:
                dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=fn)
                return sum(len(b["image"]) for b in dl)

            return run

        rows = {
            "scene + 5 captions": rate(lambda: sum(1 for i in range(n) if lazy.annotation(i)), args.repeats),
            "render pixels": rate(lambda: sum(1 for i in range(n) if lazy.render(i, scenes[i]).size), args.repeats),
            "item, lazy": rate(lambda: sum(1 for i in range(n) if lazy[i]), args.repeats),
            "item, cached": rate(lambda: sum(1 for i in range(n) if cached[i]), args.repeats),
            "item + transform, lazy": rate(lambda: sum(1 for i in range(n) if lazy_tf[i]), args.repeats),
            "item + transform, cached": rate(lambda: sum(1 for i in range(n) if cached_tf[i]), args.repeats),
            "cache build (one pass)": build,
        }
        dm = ShapesDataModule(
            img_size=s,
            train_size=n,
            val_size=8,
            test_size=8,
            batch_size=args.batch_size,
            num_workers=0,
            cache_dir=cache,
            train_captions_per_image=args.captions_per_image,
        )
        dm.setup("fit")

        def train_loader() -> int:
            return sum(len(b["images"]) for b in dm.train_dataloader())

        rows["training loader (shapes.yaml), 0 workers"] = rate(train_loader, args.repeats)
        for workers in (0, 2):
            rows[f"DataLoader lazy, {workers} workers"] = rate(loader(lazy_tf, workers), args.repeats)
            rows[f"DataLoader cached, {workers} workers"] = rate(loader(cached_tf, workers), args.repeats)
            rows[f"DataLoader cached, uint8+batch norm, {workers} w"] = rate(
                loader(cached, workers, collate_uint8), args.repeats
            )
    need = [args.batch_size / (ms / 1000) for ms in args.step_ms]  # samples/s a training step consumes
    print(f"shapes data set, {s} px, {n} samples, median of {args.repeats}")
    print(f"{'':42s}{'samples/s':>10s}" + "".join(f"{f'/ {ms:g} ms step':>16s}" for ms in args.step_ms))
    print(f"{'training consumes (nominal)':42s}{'':>10s}" + "".join(f"{v:>16.0f}" for v in need))
    for name, r in rows.items():
        print(f"{name:42s}{r:>10.0f}" + "".join(f"{r / v:>15.2f}x" for v in need))
    for name in (
        "DataLoader cached, 0 workers",
        "DataLoader cached, uint8+batch norm, 0 w",
        "training loader (shapes.yaml), 0 workers",
    ):
        print(
            f"main-process data time per batch of {args.batch_size}, {name}: {args.batch_size / rows[name] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
