"""notebooks/01-inference.ipynb runs top to bottom on the shipped tiny checkpoint, its figures render to PNG, and
the word heatmaps it shows are grounded: a trained model looks at the object a colour or shape word names.

The fixture ``tests/fixtures/tiny_shapes`` is an ``mmx_tiny`` trained for a few CPU minutes
(``tests/fixtures/make_tiny_checkpoint.py``, whose docstring records its metrics).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from PIL import Image

import mmxattn
from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.data.shapes_render import objects_named
from mmxattn.viz import caption_attention, figure_to_png, plot_caption_attention, plot_encoder_attention

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01-inference.ipynb"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    assert (FIXTURE / "model.safetensors").exists(), (
        f"{FIXTURE} is missing: run `.venv/bin/python tests/fixtures/make_tiny_checkpoint.py`"
    )
    return mmxattn.load(FIXTURE)


@pytest.fixture(scope="module")
def test_split(model):
    dm = ShapesDataModule(img_size=model.cfg.vision.img_size, val_size=8, test_size=60, num_workers=0)
    return dm.dataset("test")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # a consumer of the package: no private names imported
    assert not any("import _" in c.source or "._" in c.source.split("import")[0] for c in code if "import" in c.source)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # A kernelspec that runs THIS interpreter (the venv's), whatever kernels the machine has installed.
    spec = tmp_path / "jupyter" / "kernels" / "mmxattn-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "mmxattn test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MMXATTN_CKPT", str(FIXTURE))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # raises CellExecutionError (with the cell's traceback) if any cell fails
    NotebookClient(
        nb, timeout=240, kernel_name="mmxattn-test", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stdout = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert stdout.strip().splitlines()[-1] == sys.executable
    assert "checkpoint from MMXATTN_CKPT" in stdout and str(FIXTURE) in stdout
    # captions grid, two retrieval figures, two caption-attention figures, the encoder figure
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 6, f"expected >= 6 figures, got {len(pngs)}"
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.lstrip().startswith("plot_"):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"no figure from:\n{cell.source}"


def test_figures_render_to_png(model, test_split, tmp_path):
    image = Image.fromarray(test_split[0]["image"])
    fig = plot_caption_attention(model, image, max_words=8)
    n_words = len(fig.axes) - 1  # one axis per shown word and the colour bar
    cap = figure_to_png(fig, tmp_path / "caption_attention.png")
    enc = figure_to_png(
        plot_encoder_attention(model, image, layer=["layers.0.pre_ipsa_blocks.0.attn", "layers.0.cpsa_blocks.0.attn"]),
        tmp_path / "encoder_attention.png",
    )
    for path in (cap, enc):
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as im:
            assert im.width > 300 and im.height > 200
    assert n_words >= 2  # the trained model says something


@pytest.mark.slow
def test_word_heatmaps_land_on_the_objects_they_name(model, test_split):
    """For the generated captions of test images, the heatmap peak of every colour/shape word lies inside a box of
    an object with that colour/shape, far more often than chance (the share of the image those boxes cover)."""
    hits, chance, words = 0, 0.0, 0
    for i in range(len(test_split)):
        s = test_split[i]
        w, heat, img = caption_attention(model, Image.fromarray(s["image"]))
        H, W = heat.shape[-2:]
        for j, word in enumerate(w):
            objs = objects_named(word, s["labels"])
            if not objs:  # not an object word, or names nothing in the image: grounding is undefined
                continue
            boxes = torch.as_tensor(s["boxes"][objs], dtype=torch.float32)  # (k, 4) x0, y0, x1, y1
            y, x = divmod(int(heat[j].argmax()), W)
            cx, cy = x + 0.5, y + 0.5
            hits += bool(((cx >= boxes[:, 0]) & (cx <= boxes[:, 2]) & (cy >= boxes[:, 1]) & (cy <= boxes[:, 3])).any())
            covered = torch.zeros(H, W, dtype=torch.bool)
            for x0, y0, x1, y1 in boxes.tolist():
                covered[max(0, int(y0)) : int(y1) + 1, max(0, int(x0)) : int(x1) + 1] = True
            chance += covered.float().mean().item()
            words += 1
        if words >= 100:  # the shipped fixture: 81 of its first 100 words (99 of all 135 words of the 60 images)
            break
    assert words >= 50, f"only {words} object words in the captions of {i + 1} test images"
    rate, base = hits / words, chance / words
    print(
        f"grounding: {hits}/{words} = {rate:.2f} of object-word heatmap peaks inside their objects (chance {base:.2f})"
    )
    assert rate >= 0.6 and rate >= base + 0.25, f"hit rate {rate:.2f} over {words} words (chance {base:.2f})"
