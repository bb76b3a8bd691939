"""``python -m mmxattn COMMAND --ckpt PATH ...``: inference from the command line.

Subcommands (argparse subparsers; ``python -m mmxattn --help`` lists them):

* ``caption``: one caption per image, as ``path<TAB>caption`` lines or (``--json``) one JSON list of
  ``{"image", "caption"}`` objects, in the order the images were given.
* ``retrieve``: :meth:`MMXAttn.retrieve` from the shell. Text-to-image (``--text`` queries over a gallery given as
  ``--images`` or ``--image-dir``) or image-to-text (``--query-image`` over the lines of a ``--captions`` file);
  ``query<TAB>rank<TAB>score<TAB>result`` lines per query, best first, or (``--json``) a JSON list of
  ``{"query", "results"}`` objects. ``-k`` above the gallery size shows the whole gallery, as ``retrieve`` does,
  with a note on stderr.
* ``attention``: captions one image and writes the per-word cross-attention figure
  (:func:`mmxattn.viz.plot_caption_attention`) as a PNG; prints the caption and the PNG's path.
* ``export``: :func:`mmxattn.export` of a checkpoint to a directory (refusing a non-empty one without ``--force``);
  prints the directory.

Inputs are checked before the model is loaded (every image file's header read, the captions file read, the output
path's directory writable), so bad input fails at once; pixels are decoded a batch at a time (a truncated file
still fails there, named; in an ``--image-dir`` gallery it is skipped, and named and counted with the files whose
header did not read in one ``warning:`` line). Bad input (an unreadable image, an empty gallery or captions file,
a file that is not an mmxattn checkpoint, an output that cannot be written) prints ``error: ...`` naming it to
stderr and exits with status 2, without a traceback; warnings of the new commands are printed as ``warning: ...``
lines. Training and evaluation have their own entry points (see the epilog of ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

EPILOG = """commands:
  caption    one caption per image
  retrieve   text-to-image search over images, or image-to-text over a captions file (top-k with scores)
  attention  caption one image and write its per-word cross-attention figure as a PNG
  export     write a checkpoint as a directory (safetensors + JSON) that mmxattn.load reads

other entry points:
  train      python train.py fit --config configs/shapes.yaml   (LightningCLI; `make train`)
  evaluate   python -m mmxattn.evaluate --ckpt PATH [--split test]   (metrics of a checkpoint as JSON)

examples:
  python -m mmxattn caption --ckpt runs/shapes/checkpoints/last.ckpt a.png b.jpg --strategy beam --json
  python -m mmxattn retrieve --ckpt my_model --image-dir photos/ --text "a red circle" -k 3 --rerank 10
  python -m mmxattn retrieve --ckpt my_model --captions captions.txt --query-image a.png
  python -m mmxattn attention --ckpt my_model a.png --out a_attention.png
  python -m mmxattn export --ckpt runs/shapes/checkpoints/last.ckpt --out my_model
"""

# the re-ranking scores of MMXAttn.retrieve (mmxattn.model.RERANK_METHODS; a test keeps the two equal)
RERANK_CHOICES = ("itm", "lm", "pmi")


class UsageError(Exception):
    """Bad input from the command line: printed as ``error: ...``, exit status 2."""


def _add_ckpt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint (.ckpt) written by train.py, or a directory written by mmxattn.export",
    )


def _add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam"], help="decoding (default: greedy)")
    p.add_argument("--num-beams", type=int, default=3, help="beams for --strategy beam (default: 3)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="longest caption in tokens (default: fill the context)"
    )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmxattn",
        description="mmxattn inference from a trained checkpoint: caption images, retrieve images or captions, "
        "draw caption attention maps, export checkpoints.",
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
    _add_ckpt(c)
    _add_generation(c)
    c.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    _add_device(c)
    c.add_argument("--json", action="store_true", help='print a JSON list of {"image", "caption"} objects')
    c.set_defaults(func=cmd_caption)

    r = sub.add_parser(
        "retrieve",
        help="text-to-image or image-to-text retrieval (top-k with scores)",
        description="Text-to-image: rank the gallery (--images or --image-dir) for each --text. Image-to-text: rank "
        "the lines of --captions for each --query-image. Prints 'query<TAB>rank<TAB>score<TAB>result' lines, best "
        "first, or a JSON list of {query, results} with --json. Scores are embedding cosines, or with --rerank the "
        "decoder's scores (see MMXAttn.retrieve).",
    )
    _add_ckpt(r)
    gallery = r.add_mutually_exclusive_group()
    gallery.add_argument("--images", nargs="+", metavar="IMG", help="gallery images for --text queries")
    gallery.add_argument(
        "--image-dir", metavar="DIR", help="gallery: the image files in DIR (by name; not recursive, others skipped)"
    )
    r.add_argument("--text", action="append", metavar="TEXT", help="a text query (repeat for several)")
    r.add_argument("--captions", metavar="FILE", help="image-to-text: a UTF-8 file of captions, one per line")
    r.add_argument(
        "--query-image", action="append", metavar="IMG", help="image-to-text: a query image (repeat for several)"
    )
    r.add_argument("-k", type=int, default=5, help="results per query (default: 5)")
    r.add_argument(
        "--rerank", type=int, default=0, metavar="N", help="re-score each query's top max(N, k) with the decoder"
    )
    r.add_argument(
        "--rerank-with",
        choices=RERANK_CHOICES,
        default=None,
        help="re-ranking score (default: the one the training run evaluated with, as mmxattn.load reads it)",
    )
    r.add_argument(
        "--gallery-norm",
        action="store_true",
        help="rank by scores normalised over the queries (see retrieve): over the --text queries, or over the "
        "--query-image images; needs several queries",
    )
    r.add_argument("--batch-size", type=int, default=256, help="images / texts per forward pass (default: 256)")
    _add_device(r)
    r.add_argument("--json", action="store_true", help='print a JSON list of {"query", "results"} objects')
    r.set_defaults(func=cmd_retrieve)

    a = sub.add_parser(
        "attention",
        help="caption one image and write its per-word cross-attention figure (PNG)",
        description="Caption IMAGE and write one heatmap panel per generated word (where the decoder's "
        "cross-attention looked) to --out as a PNG; prints the caption, then the PNG's path.",
    )
    a.add_argument("image", metavar="IMAGE", help="an image file (any format PIL reads)")
    _add_ckpt(a)
    a.add_argument("--out", required=True, metavar="PNG", help="the PNG file to write (parent folders are created)")
    _add_generation(a)
    a.add_argument("--max-words", type=int, default=12, help="panels drawn, one per word (default: 12)")
    a.add_argument("--dpi", type=int, default=None, help="resolution of the PNG (default: mmxattn.viz.DEFAULT_DPI)")
    _add_device(a)
    a.add_argument("--json", action="store_true", help='print a JSON object {"image", "caption", "out"}')
    a.set_defaults(func=cmd_attention)

    e = sub.add_parser(
        "export",
        help="write a checkpoint as an exported directory (safetensors + JSON)",
        description="Load --ckpt and write model.safetensors, config.json, tokenizer.json and preprocess.json to "
        "--out (mmxattn.export), which mmxattn.load and --ckpt read; prints the directory.",
    )
    _add_ckpt(e)
    e.add_argument("--out", required=True, metavar="DIR", help="the directory to write (created if missing)")
    e.add_argument(
        "--force", action="store_true", help="write into a non-empty DIR (the export's files are replaced, others kept)"
    )
    e.set_defaults(func=cmd_export)
    return p


def _gen_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    if a.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {a.num_beams}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    kw: dict[str, Any] = {"strategy": a.strategy, "max_new_tokens": a.max_new_tokens}
    if a.strategy == "beam":
        kw["num_beams"] = a.num_beams
    return kw


def _at_least(flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def _read_images(paths: Sequence[str]) -> list[Any]:
    """Decode every image up front (RGB PIL images; RGBA, grayscale, palette... are converted)."""
    from .data.formats import BadImageError, load_image

    images = []
    for path in paths:
        try:
            images.append(load_image(path, min_size=1))  # any readable image, as model.preprocess takes
        except BadImageError as e:
            raise UsageError(f"image {e}") from None
    return images


def _load_model(ckpt: str, device: str | None, need_tokenizer: bool = True) -> Any:
    import torch

    from .checkpoint import CheckpointError, load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load(ckpt, device=device)
    except (CheckpointError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # e.g. an unknown or unavailable --device
        raise UsageError(f"cannot put the model on device {device!r}: {str(e).splitlines()[0]}") from None
    if need_tokenizer and model.tokenizer is None:
        raise UsageError(f"{ckpt} has no tokenizer, so its token ids cannot be turned into captions")
    return model


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Warnings raised inside the block printed as one ``warning: ...`` line each on stderr (no source lines)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


def _check_writable(path: Path, flag: str, directory: bool) -> None:
    """Fail before any work when ``path`` (a file, or with ``directory`` a folder) cannot be written: its nearest
    existing folder (missing ones are created on writing) must be a writable directory."""
    if not directory and path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file name")
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    existing = path if directory else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: cannot be written, {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot be written, {existing} is not writable")


# ---------------------------------------------------------------------------------------------- caption
def _header_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable image (missing, not a file, a header PIL cannot open, no pixels), or None.
    Only the header is read: the pixels are decoded a batch at a time, so many large photos are never held decoded
    at once."""
    from PIL import Image

    p = Path(path)
    if not p.exists():
        return "not found"
    if not p.is_file():
        return "not a file"
    try:
        with Image.open(p) as im:
            empty = im.width < 1 or im.height < 1
    except Exception as e:  # noqa: BLE001 - whatever PIL raises for a damaged or foreign file
        return f"cannot be read as an image ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
    return "an empty image" if empty else None


def _check_headers(paths: Sequence[str]) -> None:
    """Fail before the model loads on the first path that is not a readable image (:func:`_header_problem`)."""
    for path in paths:
        why = _header_problem(path)
        if why is not None:
            raise UsageError(f"image {path}: {why}")


def cmd_caption(a: argparse.Namespace) -> int:
    gen = _gen_kwargs(a)
    _at_least("--batch-size", a.batch_size, 1)
    _check_headers(a.images)
    model = _load_model(a.ckpt, a.device)
    captions: list[str] = []
    for i in range(0, len(a.images), a.batch_size):
        paths = a.images[i : i + a.batch_size]
        batch = model.caption(_read_images(paths), **gen)  # decoded a batch at a time
        if not a.json:  # lines as they come: a long run shows progress, and an interrupt keeps what was printed
            for p, c in zip(paths, batch):
                print(f"{p}\t{c}", flush=True)
        captions += batch
    if a.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(a.images, captions)], indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- retrieve
def _image_dir(directory: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files of ``directory`` by name (extensions PIL knows; hidden files and sub-folders skipped) whose
    header reads, and ``(path, why)`` of those whose header does not (skipped: see :class:`_FolderGallery`)."""
    from PIL import Image

    d = Path(directory)
    if not d.exists():
        raise UsageError(f"--image-dir {d}: not found")
    if not d.is_dir():
        raise UsageError(f"--image-dir {d}: not a directory")
    known = {ext.lower() for ext in Image.registered_extensions()}
    try:
        # a dangling symlink is an unreadable image (skipped and named), not a silently missing one
        files = sorted(
            f
            for f in d.iterdir()
            if (f.is_file() or (f.is_symlink() and not f.exists())) and not f.name.startswith(".")
        )
    except OSError as e:
        raise UsageError(f"--image-dir {d}: cannot be listed ({e.strerror or e})") from None
    paths = [str(f) for f in files if f.suffix.lower() in known]
    if not paths:
        raise UsageError(f"--image-dir {d}: no image files in it ({len(files)} other files)")
    # a folder of photos often holds a few broken files: skipped (named on stderr), not a stop after half the
    # gallery is encoded. Only headers are read here, before the model loads; the pixels are decoded batch by batch.
    problems = [(path, _header_problem(path)) for path in paths]
    good = [path for path, why in problems if why is None]
    bad = [(path, why) for path, why in problems if why is not None]
    if not good:
        raise UsageError(f"--image-dir {d}: none of its {len(paths)} image files can be read")
    return good, bad


class _FolderGallery:
    """The files of an ``--image-dir`` for ``model.retrieve``, which reads an iterable a batch at a time: each file
    is decoded once, as it is read (a folder of photos is never held decoded at once); one whose pixels do not decode
    (a header that reads, then cut-off data) is skipped and joins ``skipped`` (with those whose header did not read),
    and ``kept`` lists the decoded ones in order: the gallery the results index."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.paths, self._bad_headers = _image_dir(directory)
        self.n_files = len(self.paths) + len(self._bad_headers)  # the image files listed
        self.kept: list[str] = []
        self.skipped: list[tuple[str, str]] = list(self._bad_headers)  # (path, why)
        self.done = False  # every file was read

    def __iter__(self) -> Iterator[Any]:
        from .data.robust import BadImageError, load_image

        self.kept.clear()
        self.skipped[:] = self._bad_headers
        self.done = False
        for path in self.paths:
            try:
                image = load_image(path, min_size=1)  # any readable image, as model.preprocess takes
            except BadImageError as e:
                self.skipped.append((path, e.reason))
                continue
            self.kept.append(path)
            yield image
        self.done = True

    def report_skipped(self) -> None:
        """One ``warning:`` line on stderr counting the skipped files and naming (the first 3 of) them."""
        if not self.skipped:
            return
        bad = sorted(self.skipped)  # in the order of the folder's listing (by name)
        named = "; ".join(f"{p}: {why}" for p, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        print(f"warning: --image-dir {self.directory}: skipped {len(bad)} unreadable file(s), e.g. {named}",
              file=sys.stderr)  # fmt: skip


def _read_captions(path: str) -> tuple[list[str], list[int]]:
    """Non-blank lines of ``path`` (stripped) and their 1-based line numbers."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"--captions {path}: file not found") from None
    except IsADirectoryError:
        raise UsageError(f"--captions {path}: is a directory, not a file of captions") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--captions {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"--captions {path}: cannot read file ({e.strerror or e})") from None
    # lines as editors and `sed -n Np` count them: read_text's universal newlines made "\r\n" and "\r" into
    # "\n"; str.splitlines would also cut at U+2028, U+0085, form feeds..., splitting a caption and its numbering
    lines = [(n, s.strip()) for n, s in enumerate(text.split("\n"), 1) if s.strip()]
    if not lines:
        raise UsageError(f"--captions {path}: no captions in it (one caption per line)")
    return [s for _, s in lines], [n for n, _ in lines]


def cmd_retrieve(a: argparse.Namespace) -> int:
    text_to_image = a.text is not None
    image_to_text = a.captions is not None or a.query_image is not None
    if text_to_image and image_to_text:
        raise UsageError("give --text (text-to-image) or --captions with --query-image (image-to-text), not both")
    if not text_to_image and not image_to_text:
        raise UsageError(
            "nothing to retrieve: give --text QUERY with --images/--image-dir (text-to-image), "
            "or --captions FILE with --query-image IMG (image-to-text)"
        )
    _at_least("-k", a.k, 1)
    _at_least("--rerank", a.rerank, 0)
    _at_least("--batch-size", a.batch_size, 1)
    if text_to_image:
        if a.images is None and a.image_dir is None:
            raise UsageError("--text needs a gallery to search: --images IMG... or --image-dir DIR")
        blank = [t for t in a.text if not t.strip()]
        if blank:
            raise UsageError(f"--text {blank[0]!r}: an empty query")
        queries: list[str] = list(a.text)
        if a.images is not None:
            results = a.images
            missing = [p for p in results if not Path(p).is_file()]
            if missing:  # named before the model loads; files that exist are decoded batch by batch in retrieve
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UsageError(f"image {missing[0]}: not found{more}")
            # the gallery goes to retrieve as paths: it decodes them a batch at a time (many photos are never held
            # decoded at once); a file the user named that does not decode stops the run there, named
            images: Any = list(results)
        else:  # a folder's files are decoded as retrieve reads them; those that do not decode are skipped
            folder = _FolderGallery(a.image_dir)
            images, results = folder, folder.kept  # kept: filled as retrieve reads the gallery, what it indexes
        texts, lines = queries, None
    else:
        if a.captions is None or a.query_image is None:
            missing = "--captions FILE" if a.captions is None else "--query-image IMG"
            raise UsageError(
                f"image-to-text retrieval needs --captions FILE and --query-image IMG; {missing} is missing"
            )
        if a.images is not None or a.image_dir is not None:
            raise UsageError(
                "--images/--image-dir are the gallery of a --text search; with --captions use --query-image"
            )
        queries = list(a.query_image)
        images = _read_images(queries)
        texts, lines = _read_captions(a.captions)
        results = texts
    model = _load_model(a.ckpt, a.device)  # (texts with words it does not know: retrieve warns, naming them)
    from .data.formats import BadImageError

    with _warnings_as_lines():
        try:
            res = model.retrieve(
                images,
                texts,
                k=a.k,
                rerank=a.rerank,
                rerank_with=a.rerank_with,
                batch_size=a.batch_size,
                gallery_norm=a.gallery_norm,
                direction="t2i" if text_to_image else "i2t",  # the other direction is not shown: not computed
            )
        except BadImageError as e:
            raise UsageError(f"image {e}") from None
        except RuntimeError as e:  # e.g. out of memory on --device
            raise UsageError(f"retrieval failed: {str(e).splitlines()[0]} (try a smaller --batch-size)") from None
        except ValueError:
            if isinstance(images, _FolderGallery) and images.done and not images.kept:  # retrieve: "an empty list"
                path, why = sorted(images.skipped)[0]
                raise UsageError(
                    f"--image-dir {a.image_dir}: none of its {images.n_files} image files can be read "
                    f"(e.g. {path}: {why})"
                ) from None
            raise
    if isinstance(images, _FolderGallery):
        images.report_skipped()
    kind = "images" if text_to_image else "captions"
    if a.k > len(results):  # retrieve clamps k to the gallery (as here); say so (once it has read the gallery)
        print(f"note: -k {a.k} is more than the {len(results)} {kind}; showing all {len(results)}", file=sys.stderr)
    indices, scores = (res.t2i_indices, res.t2i_scores) if text_to_image else (res.i2t_indices, res.i2t_scores)
    out = []
    for q, row_i, row_s in zip(queries, indices.tolist(), scores.float().tolist()):
        ranked = []
        for rank, (i, s) in enumerate(zip(row_i, row_s), 1):
            item: dict[str, Any] = {"rank": rank, "index": i, "score": s}
            if text_to_image:
                item["image"] = results[i]
            else:
                item["caption"] = results[i]
                item["line"] = lines[i]
            ranked.append(item)
        out.append({"query": q, "results": ranked})
    if a.json:
        print(json.dumps(_json_safe(out), indent=2, allow_nan=False))
    else:
        key = "image" if text_to_image else "caption"
        for q in out:
            for item in q["results"]:
                print(f"{q['query']}\t{item['rank']}\t{item['score']:.4f}\t{item[key]}")
    return 0


# ---------------------------------------------------------------------------------------------- attention
def cmd_attention(a: argparse.Namespace) -> int:
    gen = _gen_kwargs(a)
    _at_least("--max-words", a.max_words, 1)
    _at_least("--dpi", a.dpi, 1)
    out = Path(a.out)
    _check_writable(out, "--out", directory=False)
    image = _read_images([a.image])[0]
    model = _load_model(a.ckpt, a.device)
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # with pyplot up (a notebook calling main), switching would close
        matplotlib.use("Agg")  # its figures; viz draws on bare Figures, which never need pyplot's backend
    from .viz import _caption_attention, figure_to_png, plot_caption_attention

    with _warnings_as_lines():
        # one generation for the printed caption and the figure: the words model.caption gives (what `caption`
        # prints for this image), their attention recomputed teacher-forced
        found = _caption_attention(model, image, **gen)
        caption = found.caption
        fig = plot_caption_attention(model, image, max_words=a.max_words, attention=found)
    try:
        path = figure_to_png(fig, out, **({} if a.dpi is None else {"dpi": a.dpi}))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the PNG ({e.strerror or e})") from None
    if a.json:
        print(json.dumps({"image": a.image, "caption": caption, "out": str(path)}, indent=2))
    else:
        print(caption)
        print(path)
    return 0


# ---------------------------------------------------------------------------------------------- export
def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, export

    out = Path(a.out)
    _check_writable(out, "--out", directory=True)
    if out.is_dir() and Path(a.ckpt).exists() and out.resolve() == Path(a.ckpt).resolve():
        raise UsageError(f"--out {out}: is the checkpoint being exported; give another directory")
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise UsageError(f"--out {out}: directory is not empty; --force writes the export into it")
    model = _load_model(a.ckpt, "cpu", need_tokenizer=False)  # export writes CPU tensors
    try:
        path = export(model, out)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the export ({e.strerror or e})") from None
    print(path)
    return 0


def _json_safe(x: Any) -> Any:
    """NaN and infinite floats as null: JSON has no NaN (json.dumps would print a bare NaN that parsers reject)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the library's input checks (e.g. NaN pixels in a float TIFF): their message says it
        if os.environ.get("MMXATTN_TRACEBACK") == "1":
            raise
        print(f"error: {e}\n(MMXATTN_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our stdout went away (`... | head`): stop quietly, as Unix tools do; stdout is pointed at
        # devnull so that Python's own flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
