"""``python -m mmxattn caption --ckpt PATH IMAGE...``: inference from the command line.

Subcommands (argparse subparsers; ``python -m mmxattn --help`` lists them):

* ``caption``: one caption per image, as ``path<TAB>caption`` lines or (``--json``) one JSON list of
  ``{"image", "caption"}`` objects, in the order the images were given.

Every image is decoded before the model is loaded, so a bad path fails at once. Bad input (an unreadable image, a
file that is not an mmxattn checkpoint) prints ``error: ...`` naming it to stderr and exits with status 2, without
a traceback. Training and evaluation have their own entry points (see the epilog of ``--help``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

EPILOG = """other entry points:
  train      python train.py fit --config configs/shapes.yaml   (LightningCLI; `make train`)
  evaluate   python -m mmxattn.evaluate --ckpt PATH [--split test]   (metrics of a checkpoint as JSON)

example:
  python -m mmxattn caption --ckpt runs/shapes/checkpoints/last.ckpt a.png b.jpg --strategy beam --json
"""


class UsageError(Exception):
    """Bad input from the command line: printed as ``error: ...``, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmxattn",
        description="mmxattn inference: captions for images from a trained checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    c = sub.add_parser(
        "caption",
        help="caption images with a trained checkpoint",
        description="Print one caption per image: 'path<TAB>caption' lines, or a JSON list with --json.",
    )
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    c.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint (.ckpt) written by train.py, or a directory written by mmxattn.export",
    )
    c.add_argument("--strategy", default="greedy", choices=["greedy", "beam"], help="decoding (default: greedy)")
    c.add_argument("--num-beams", type=int, default=3, help="beams for --strategy beam (default: 3)")
    c.add_argument(
        "--max-new-tokens", type=int, default=None, help="longest caption in tokens (default: fill the context)"
    )
    c.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    c.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    c.add_argument("--json", action="store_true", help='print a JSON list of {"image", "caption"} objects')
    c.set_defaults(func=cmd_caption)
    return p


def _gen_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    if a.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {a.num_beams}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {a.batch_size}")
    kw: dict[str, Any] = {"strategy": a.strategy, "max_new_tokens": a.max_new_tokens}
    if a.strategy == "beam":
        kw["num_beams"] = a.num_beams
    return kw


def _read_images(paths: Sequence[str]) -> list[Any]:
    """Decode every image up front (RGB PIL images; RGBA, grayscale, palette... are converted)."""
    from .data.formats import BadImageError, load_image

    images = []
    for path in paths:
        try:
            images.append(load_image(path))
        except BadImageError as e:
            raise UsageError(f"image {e}") from None
    return images


def _load_model(ckpt: str, device: str | None) -> Any:
    import torch

    from .checkpoint import CheckpointError, load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load(ckpt, device=device)
    except (CheckpointError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # e.g. an unknown or unavailable --device
        raise UsageError(f"cannot put the model on device {device!r}: {str(e).splitlines()[0]}") from None
    if model.tokenizer is None:
        raise UsageError(f"{ckpt} has no tokenizer, so its token ids cannot be turned into captions")
    return model


def cmd_caption(a: argparse.Namespace) -> int:
    gen = _gen_kwargs(a)
    images = _read_images(a.images)
    model = _load_model(a.ckpt, a.device)
    captions: list[str] = []
    for i in range(0, len(images), a.batch_size):
        captions += model.caption(images[i : i + a.batch_size], **gen)
    if a.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(a.images, captions)], indent=2))
    else:
        for p, c in zip(a.images, captions):
            print(f"{p}\t{c}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
