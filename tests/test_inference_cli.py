"""``python -m mmxattn caption``: captions for image files from the shipped tiny checkpoint, as text lines or JSON,
the same captions as ``model.caption``; bad images and bad checkpoints give one clear line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmxattn
from mmxattn.__main__ import main
from mmxattn.data.datamodule import ShapesDataModule

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmxattn", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.fixture(scope="module")
def model():
    assert (FIXTURE / "model.safetensors").exists(), f"{FIXTURE} is missing: run tests/fixtures/make_tiny_checkpoint.py"
    return mmxattn.load(FIXTURE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two shapes test images on disk: one RGBA (opaque), one grayscale of another size (80 x 96)."""
    d = tmp_path_factory.mktemp("imgs")
    ds = ShapesDataModule(val_size=8, test_size=2, num_workers=0).dataset("test")
    rgb = [Image.fromarray(ds[i]["image"]) for i in range(2)]
    rgba = rgb[0].convert("RGBA")
    assert np.asarray(rgba)[..., 3].min() == 255
    rgba.save(d / "rgba.png")
    rgb[1].convert("L").resize((80, 96)).save(d / "gray image.png")  # a space in the name, for the TAB format
    return [d / "rgba.png", d / "gray image.png"]


def test_help_lists_subcommands_and_other_entry_points(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "caption" in out and "train.py" in out and "mmxattn.evaluate" in out


def test_caption_plain_and_json_match_the_api(model, images, capsys):
    expected = [model.caption([Image.open(p)])[0] for p in images]  # load_image converts RGBA / L to RGB
    assert all(expected)
    assert main(["caption", "--ckpt", str(FIXTURE), *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{p}\t{c}" for p, c in zip(images, expected)]
    assert main(["caption", "--ckpt", str(FIXTURE), "--json", *map(str, images)]) == 0
    assert json.loads(capsys.readouterr().out) == [{"image": str(p), "caption": c} for p, c in zip(images, expected)]


def test_caption_options_reach_generation(model, images, capsys):
    beam = model.caption([Image.open(images[0])], strategy="beam", num_beams=2, max_new_tokens=3)[0]
    args = ["caption", "--ckpt", str(FIXTURE), "--strategy", "beam", "--num-beams", "2", "--max-new-tokens", "3"]
    assert main([*args, str(images[0])]) == 0
    out = capsys.readouterr().out
    assert out == f"{images[0]}\t{beam}\n"
    assert 1 <= len(out.split("\t")[1].split()) <= 3


def test_bad_image_path_exits_2_naming_the_file(images, tmp_path):
    missing = tmp_path / "no_such_image.png"
    r = _run("caption", "--ckpt", str(FIXTURE), str(images[0]), str(missing))
    assert r.returncode == 2, r.stderr
    assert str(missing) in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["caption", "--ckpt", str(FIXTURE), str(tmp_path / "notes.png")]) == 2


def test_bad_checkpoint_gives_the_checkpoint_error(images, tmp_path, capsys):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("hello")
    assert main(["caption", "--ckpt", str(bogus), str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bogus) in err and "not a loadable checkpoint" in err
    assert main(["caption", "--ckpt", str(tmp_path), str(images[0])]) == 2  # a directory that is no export
    assert "not an exported mmxattn model" in capsys.readouterr().err
    assert main(["caption", "--ckpt", str(FIXTURE), "--num-beams", "0", str(images[0])]) == 2
    assert "--num-beams" in capsys.readouterr().err
