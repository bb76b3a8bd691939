"""Broken inputs: robust image decoding, skip markers, collate, SkipTracker, and a full DataLoader epoch with workers.

Every broken input is built here (PIL, raw bytes); nothing allocates more than a few MB (the decompression-bomb
images only *claim* huge sizes in their header).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmxattn.data.formats import CsvDataset
from mmxattn.data.robust import (
    BadDataError,
    BadImageError,
    BrokenSample,
    SkipTracker,
    caption_problem,
    collate_samples,
    collate_skipping,
    load_image,
    to_rgb,
)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _jpeg_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG")
    return b.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A 70-byte PNG whose header claims w x h pixels: opening it must not decode (or allocate) the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ load_image


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p, "file not found"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_bytes(_jpeg_bytes((64, 64))[:300]), p)[1], "truncated/corrupt image"),
        (lambda p: (p.write_bytes(b"<html>404 not found</html>\n"), p)[1], "not an image"),
        (lambda p: _save(Image.new("RGB", (1, 1)), p, "PNG"), "too small (1x1)"),
        (lambda p: (p.write_bytes(_png_claiming(100_000, 100_000)), p)[1], "decompression bomb"),
    ],
    ids=["missing", "zero-byte", "truncated-jpeg", "text-as-jpg", "1x1", "bomb-header"],
)
def test_unusable_images_raise_bad_image_error_with_reason(tmp_path, make, reason):
    path = make(tmp_path / "img.jpg")
    with pytest.raises(BadImageError) as ei:
        load_image(path)
    assert ei.value.reason.startswith(reason), ei.value.reason
    assert str(path) in str(ei.value)  # the error names the file


def test_bomb_between_pil_limits_is_skipped_not_warned(monkeypatch):
    # PIL only *warns* between MAX_IMAGE_PIXELS and 2x; a run must skip such images, silently for the log
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    data = io.BytesIO()
    Image.new("RGB", (64, 64)).save(data, "PNG")  # 4096 px: over 3000, under 6000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError, match=r"decompression bomb \(64 x 64\)"):
            load_image(data.getvalue(), name="small.png")
        with pytest.raises(BadImageError, match="decompression bomb"):  # over 2x: PIL raises inside Image.open
            load_image(_png_claiming(100, 100), name="claims.png")


def test_max_pixels_and_min_size_are_configurable():
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    with pytest.raises(BadImageError, match=r"decompression bomb \(64 x 64\)"):
        load_image(png.getvalue(), max_pixels=1000)
    tiny = io.BytesIO()
    Image.new("RGB", (4, 6)).save(tiny, "PNG")
    with pytest.raises(BadImageError, match=r"too small \(4x6\)"):
        load_image(tiny.getvalue())
    assert load_image(tiny.getvalue(), min_size=4).size == (4, 6)


def test_convertible_modes_become_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # (16, 16) horizontal ramp
    cases = {
        "cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),  # pure red in CMYK
        "gray.png": Image.fromarray(gray, "L"),
        "la.png": Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA"),
        "p.png": Image.new("RGB", (16, 16), (0, 0, 255)).convert("P"),
        "rgb.webp": Image.new("RGB", (16, 16), (10, 200, 10)),
    }
    for name, img in cases.items():
        out = load_image(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (16, 16), name
    assert load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))[0] > 200  # red survives CMYK -> RGB
    assert np.array_equal(np.asarray(load_image(tmp_path / "gray.png"))[..., 1], gray)


def test_16bit_is_rescaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))[..., 0]
    # PIL's own convert("RGB") clips everything above 255 to white; we map 0..65535 onto 0..255
    np.testing.assert_allclose(out[0], ramp[0] / 257, atol=1)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black...
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))  # ...left half opaque red
    out = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert out.getpixel((2, 2)) == (255, 0, 0) and out.getpixel((12, 2)) == (255, 255, 255)

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), index 1 green
    pal.paste(1, (0, 0, 8, 16))
    path = _save(pal, tmp_path / "ptrans.png", transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    out = load_image(path)
    assert out.getpixel((2, 2)) == (0, 255, 0) and out.getpixel((12, 2)) == (255, 255, 255)


def _tiff_with_strip_offsets_of_type(kind: int) -> bytes:
    """A 16x16 8-bit grey TIFF; StripOffsets stored as TIFF type ``kind`` (4 = LONG is valid; 7 = UNDEFINED makes
    PIL's decoder raise a raw TypeError, as a byte-flipped TIFF found by fuzzing did)."""
    data_at = 8 + 2 + 12 * 8 + 4  # header, entry count, 8 entries, next-IFD offset
    entries = [(256, 3, 16), (257, 3, 16), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, kind, data_at)]
    entries += [(278, 3, 16), (279, 4, 256)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        ifd += struct.pack("<HHI", tag, typ, 1) + (
            struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 4 + bytes(range(256))


def test_any_decoder_exception_becomes_bad_image_error_naming_the_file(tmp_path, monkeypatch):
    assert load_image(_tiff_with_strip_offsets_of_type(4)).size == (16, 16)  # the well-formed twin decodes
    path = tmp_path / "hostile.tif"
    path.write_bytes(_tiff_with_strip_offsets_of_type(7))
    with pytest.raises(BadImageError) as ei:
        load_image(path)
    assert str(path) in str(ei.value) and ei.value.reason.startswith("truncated/corrupt image")  # (TypeError: ...)
    # whatever else a PIL plugin raises on hostile bytes (KeyError, ZeroDivisionError...) is named the same way
    for exc in (KeyError("tag"), ZeroDivisionError("division by zero")):

        def hostile(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(Image, "open", hostile)
        with pytest.raises(BadImageError, match=rf"x\.jpg: truncated/corrupt image \({type(exc).__name__}"):
            load_image(_jpeg_bytes(), name="x.jpg")


def test_max_pixels_above_pils_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for PIL's 89 Mpx default
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")  # 4096 px: over 2x PIL's limit, where PIL raises inside Image.open
    assert load_image(png.getvalue(), max_pixels=100_000).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's limit restored
    with pytest.raises(BadImageError, match=r"decompression bomb \(64 x 64\)"):
        load_image(png.getvalue(), max_pixels=3000)  # above PIL's limit, below the image: our own check
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(png.getvalue())  # no max_pixels: PIL's limit
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_modes_become_rgb(mode):
    straight = "LA" if mode == "La" else "RGBA"
    img = Image.new(straight, (16, 16), (0,) * len(straight))  # fully transparent...
    img.paste((200,) * (len(straight) - 1) + (255,), (0, 0, 8, 16))  # ...left half opaque
    out = to_rgb(img.convert(mode))  # PIL has no "La" -> "RGBA" conversion
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (200, 200, 200) and out.getpixel((12, 2)) == (255, 255, 255)


def test_caption_problem():
    assert caption_problem("a dog") is None
    assert caption_problem("") == "empty caption"
    assert caption_problem(" \t\n") == "empty caption"
    assert caption_problem(b"caf\xe9") == "caption not valid UTF-8"
    assert caption_problem(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caption not valid UTF-8"
    assert caption_problem(None) == "missing caption"
    assert caption_problem(3) == "caption is int, not text"


# ------------------------------------------------------------------------------------------ collate and tracker


def test_collate_skipping_drops_markers_and_reports_them():
    ok = [
        {"image": torch.zeros(3, 4, 4), "caption": f"c{i}", "captions": ["x"] * (i + 1), "image_id": i}
        for i in range(3)
    ]
    samples = [ok[0], BrokenSample("a.jpg", "empty file"), ok[1], ok[2], BrokenSample("b.jpg", "not an image")]
    batch = collate_skipping(samples)
    assert batch["image"].shape == (3, 3, 4, 4)
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["captions"][2] == ["x", "x", "x"]
    assert batch["skipped"] == [("a.jpg", "empty file"), ("b.jpg", "not an image")]
    assert collate_skipping([BrokenSample("c.jpg", "empty file")]) == {"skipped": [("c.jpg", "empty file")]}
    # a custom base collate is used for the good samples only
    custom = collate_skipping(samples, base_collate=lambda s: {"n": len(s)})
    assert custom == {"n": 3, "skipped": batch["skipped"]}
    assert collate_samples([{"image": Image.new("RGB", (2, 2))}])["image"][0].size == (2, 2)  # PIL stays a list


def test_tracker_waits_for_min_samples_then_raises_with_examples():
    tracker = SkipTracker(max_fraction=0.1, min_samples=50, max_examples=2)
    tracker.update(0, [("first.jpg", "empty file")])  # 100% broken, but only 1 sample seen: keep going
    tracker.update(20, [])
    with pytest.raises(BadDataError) as ei:
        for i in range(10):
            tracker.update(5, [(f"bad{i}.jpg", "not an image")])  # crosses min_samples=50 at ~20% broken
    msg = str(ei.value)
    assert "first.jpg: empty file" in msg and "bad0.jpg: not an image" in msg and "more" in msg
    assert "bad1.jpg" not in msg  # max_examples=2


def test_tracker_error_is_one_line_naming_each_broken_file_once_with_its_count():
    tracker = SkipTracker(max_fraction=0.05, min_samples=1000, max_examples=2, source="train_path data/train.csv")
    tracker.update(70, [("imgs/corrupt.png", "not an image")] * 10)  # one image named by 10 CSV rows
    tracker.update(8, [("imgs/empty.jpg", "empty file"), ("imgs/third.jpg", "empty file")])
    with pytest.raises(BadDataError) as ei:
        tracker.end_epoch()
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("train_path data/train.csv: 12 of 90 samples")
    assert msg.count("corrupt.png") == 1 and "imgs/corrupt.png: not an image (10 samples)" in msg
    assert "imgs/empty.jpg: empty file;" in msg and "third.jpg" not in msg and "and 1 more sample" in msg


def test_tracker_end_epoch_summary_and_reset():
    tracker = SkipTracker(max_fraction=0.5, min_samples=1000)
    tracker.update(9, [("x.jpg", "too small (1x1)")])
    tracker.update_from_batch({"caption": ["a", "b"], "skipped": [("y.jpg", "too small (2x3)")]})
    s = tracker.end_epoch()
    assert (s["n_seen"], s["n_skipped"]) == (13, 2)
    assert s["reasons"] == {"too small": 2} and s["examples"][0] == ("x.jpg", "too small (1x1)")
    assert tracker.end_epoch()["n_seen"] == 0 and tracker.total_skipped == 2
    strict = SkipTracker(max_fraction=0.05, min_samples=1000)
    strict.update(9, [("x.jpg", "empty file")])  # under min_samples: no raise during the epoch...
    with pytest.raises(BadDataError, match="x.jpg: empty file"):
        strict.end_epoch()  # ...but the whole epoch is 10% broken
    strict = SkipTracker(max_fraction=0.05, min_samples=1000)
    strict.update(9, [("x.jpg", "empty file")])
    assert strict.n_batches == 1
    s = strict.end_epoch(complete=False)  # an epoch cut short (max_steps) or resumed mid-way: 10 samples say little
    assert (s["n_seen"], s["n_skipped"]) == (10, 1)


def test_module_tells_a_partial_training_epoch_from_a_whole_one():
    from types import SimpleNamespace
    from unittest import mock

    from mmxattn.lit.module import MMXAttnModule

    mod = MMXAttnModule(preset="mmx_tiny", vocab_size=64, pad_id=0, bos_id=1, eos_id=2, context_length=16, img_size=64)
    tracker = SkipTracker()
    tracker.n_batches = 5
    for max_steps, step, n_batches, whole in (
        (-1, 10, 5, True),  # ran all 5 batches
        (-1, 10, 8, False),  # resumed mid-epoch: this process saw 5 of 8
        (12, 12, 5, False),  # stopped by max_steps
        (-1, 10, float("inf"), True),  # an iterable data set of unknown length that ran out
    ):
        fake = SimpleNamespace(max_steps=max_steps, global_step=step, num_training_batches=n_batches)
        with mock.patch.object(MMXAttnModule, "trainer", new_callable=mock.PropertyMock, return_value=fake):
            assert mod._epoch_ran_to_its_end(tracker) is whole


# ---------------------------------------------------------------------------- end to end: CSV, 2 workers


def _to_tensor(img: Image.Image) -> torch.Tensor:  # module level: picklable for worker processes
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _broken_csv(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """40 rows: 36 good 16x16 images, 4 broken files (10%). Returns the CSV and {broken file name: reason}."""
    rows, broken = ["filepath,title"], {}
    for i in range(36):
        Image.new("RGB", (16, 16), (i * 7 % 256, 80, 160)).save(tmp_path / f"ok{i:02d}.png")
        rows.append(f"ok{i:02d}.png,picture number {i}")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(_jpeg_bytes((64, 64))[:200])
    (tmp_path / "text.jpg").write_bytes(b"just some text\n")
    broken = {"missing.jpg": "file not found", "zero.jpg": "empty file", "trunc.jpg": "truncated/corrupt image"}
    broken["text.jpg"] = "not an image"
    rows += [f"{name},a broken one" for name in broken]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path, broken


def _run_epoch(path: Path, tracker: SkipTracker) -> tuple[int, dict]:
    ds = CsvDataset(path, transform=_to_tensor)
    loader = DataLoader(ds, batch_size=6, num_workers=2, shuffle=True, collate_fn=partial(collate_skipping))
    n_images = 0
    for batch in loader:
        tracker.update_from_batch(batch)
        n_images += len(batch.get("image", []))
    return n_images, tracker.end_epoch()


def test_epoch_with_workers_counts_skips(tmp_path):
    path, broken = _broken_csv(tmp_path)
    n_images, summary = _run_epoch(path, SkipTracker(max_fraction=0.5, min_samples=10))
    assert n_images == 36
    assert summary["n_seen"] == 40 and summary["n_skipped"] == 4
    got = {Path(src).name: reason.split(" (")[0] for src, reason in summary["examples"]}
    assert got == broken


def test_epoch_with_workers_raises_over_threshold(tmp_path):
    path, broken = _broken_csv(tmp_path)
    with pytest.raises(BadDataError) as ei:
        _run_epoch(path, SkipTracker(max_fraction=0.05, min_samples=1000))
    msg = str(ei.value)
    assert "4 of 40" in msg and all(name in msg for name in broken)


# ---------------------------------------------------------------------------- end to end: train.py


def test_too_much_broken_data_stops_train_py_with_one_line_and_keeps_the_steps_for_resume(
    tmp_path, monkeypatch, capsys
):
    """One corrupt image named by 4 of 28 CSV rows (14% > 5%): exit 2, one error line naming the train file and the
    image once with its count; last.ckpt holds the epoch trained, and after the image is fixed --ckpt_path last
    resumes from it."""
    from lit_helpers import make_csv, smoke_args

    from mmxattn.lit.callbacks import AttentionMapLogger
    from mmxattn.lit.cli import main as cli_main

    monkeypatch.delenv("MMXATTN_TRACEBACK", raising=False)
    monkeypatch.setattr(AttentionMapLogger, "on_validation_epoch_end", lambda *a, **k: None)  # 9 s of PNGs
    monkeypatch.chdir(tmp_path)  # finetune_csv.yaml's relative checkpoint folder lands here
    data = make_csv(tmp_path / "data")  # 12 images x 2 captions
    train = tmp_path / "data" / "train.csv"
    rows = Path(data["train_path"]).read_text() + "".join(f"corrupt.png,a broken picture {i}\n" for i in range(4))
    train.write_text(rows)
    corrupt = Path(data["image_root"]) / "corrupt.png"
    corrupt.write_bytes(b"<html>not found</html>")
    args = smoke_args("finetune_csv.yaml", tmp_path, {**data, "train_path": str(train), "test_path": None}, 0)
    args += ["--data.init_args.tokenizer=word", "--trainer.limit_val_batches=1", "--trainer.logger=false"]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false"]
    args += ["--trainer.num_sanity_val_steps=0", "--model.val_captions=false"]
    with pytest.raises(SystemExit) as e:
        cli_main(args + ["--trainer.max_epochs=1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"train_path {train}: 4 of 28 samples (14.3%) are broken" in errors[0]
    assert errors[0].count("corrupt.png") == 1 and f"{corrupt}: not an image (4 samples)" in errors[0]
    last = tmp_path / "runs" / "finetune" / "checkpoints" / "last.ckpt"
    assert f"the training state at step 7 is saved in {last}" in errors[0] and last.exists()

    Image.new("RGB", (48, 48), (10, 200, 10)).save(corrupt, "PNG")  # the data fixed
    cli = cli_main(args + ["--trainer.max_epochs=2", "--ckpt_path=last"])
    assert cli.trainer.global_step == 14 and cli.trainer.current_epoch == 2  # epoch 0 kept, epoch 1 trained


def test_a_validation_split_of_only_broken_images_stops_fit_naming_it_when_a_callback_monitors_it(tmp_path):
    """Every validation image unreadable: with a callback monitoring val/* (the configs' best-checkpoint one) the
    fit stopped after an epoch in ModelCheckpoint ("could not find the monitored key"); it is now a BadDataError
    naming the samples. Without such a callback, validation is skipped with a message and training goes on."""
    import pytorch_lightning as pl
    from lit_helpers import data_linked, make_csv

    from mmxattn.data.datamodule import ImageTextDataModule
    from mmxattn.lit.module import MMXAttnModule

    data = make_csv(tmp_path / "csv", n_images=8, caps=1)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "csv" / "images" / name).write_bytes(b"not an image at all")
    (tmp_path / "val.csv").write_text("filepath,title\na.jpg,a red one\nb.jpg,a blue one\n")
    data["val_path"] = str(tmp_path / "val.csv")
    dm = ImageTextDataModule(**data, tokenizer="word", img_size=32, batch_size=4, num_workers=0)

    def fit(callbacks):
        mod = MMXAttnModule(preset="mmx_tiny", img_size=32, rerank=0, warmup_steps=1, **data_linked(dm))
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=2, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=bool(callbacks), default_root_dir=tmp_path,
            callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(mod, datamodule=dm)
        return trainer

    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/rsum", mode="max")
    with pytest.raises(BadDataError, match=r"validation: all 2 samples were broken .*\['val/rsum'\] cannot be"):
        fit([best])
    assert fit([]).global_step == 2  # nothing monitors validation: it is skipped, training goes on
