"""mmxattn.viz and the AttentionMapLogger callback: figures have the panels/titles/colour bars they promise, heatmaps
land where the attention is (non-square images catch transposes/flips), step attention is aligned with the word it
generated, and the callback writes (and logs) PNGs in a real Lightning run."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import pytorch_lightning as pl
import torch

import mmxattn
from mmxattn import viz
from mmxattn.capture import capture_attention
from mmxattn.data.shapes import ShapesDataset
from mmxattn.data.shapes_captions import vocabulary
from mmxattn.data.transforms import build_transforms
from mmxattn.metrics import token_heatmap
from mmxattn.text.tokenizer import WordTokenizer
from mmxattn.vision.windows import WindowGrid

COPY_DIR = Path(os.environ.get("MMXATTN_VIZ_COPY_DIR", "/tmp"))  # copies of rendered figures, to look at


def _colorbars(fig) -> list:
    return [ax for ax in fig.get_axes() if ax.get_label() == "<colorbar>"]


def _panels(fig) -> list:
    return [ax for ax in fig.get_axes() if ax.get_label() != "<colorbar>" and ax.get_visible()]


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer([*WordTokenizer.SPECIALS, *vocabulary()], context_length=24)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return mmxattn.create_model("mmx_tiny", vocab_size=tok.vocab_size, context_length=24, tokenizer=tok).eval()


@pytest.fixture(scope="module")
def shapes():
    raw = ShapesDataset("val", size=4)
    return raw, ShapesDataset("val", size=4, transform=build_transforms(64, False))


# ------------------------------------------------------------------------------------------ caption attention
def test_caption_attention_words_maps_and_display(model, shapes):
    raw, ds = shapes
    words, heat, shown = viz.caption_attention(model, ds[0]["image"], max_new_tokens=7)
    assert words == model.caption(ds[0]["image"], max_new_tokens=7)[0].split()  # one map per generated word
    assert heat.shape == (len(words), 64, 64) and bool(torch.isfinite(heat).all()) and float(heat.min()) >= 0
    # un-normalised with the transform's mean/std: the original pixels come back
    np.testing.assert_allclose(shown.numpy(), raw[0]["image"] / 255.0, atol=1e-5)
    r = viz._caption_attention(model, ds[0]["image"], max_new_tokens=7)
    torch.testing.assert_close(r.token_maps.sum((-2, -1)), torch.ones(len(words)))


def test_step_attention_is_the_attention_that_generated_the_word(model, shapes):
    """The cached per-step calls equal a teacher-forced pass where query p-1 is read for the word at p (the
    grounding metric's convention), and the uncached path agrees."""
    x = shapes[1][1]["image"]
    cached = viz._caption_attention(model, x, max_new_tokens=6)
    uncached = viz._caption_attention(model, x, max_new_tokens=6, use_cache=False)
    n = len(cached.words)
    names = [f"decoder.blocks.{i}.cross_attn" for i in range(len(model.decoder.blocks))]
    with torch.no_grad():
        ids = model.generate(x[None], max_new_tokens=6)
        tokens = model.encode_image_tokens(x[None])
        with capture_attention(model, which=names) as maps:
            model.decoder(model.text(ids)[1][:, :-1], tokens)
    att = torch.stack([maps[k][0].mean(0) for k in names]).mean(0)[:n]  # (n, L): row p-1 -> word at p
    grids = [model.visual.grid_sizes(64, 64)[s] for s in model.stages]
    expected = token_heatmap(att, grids)
    torch.testing.assert_close(cached.token_maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(uncached.token_maps, expected, atol=1e-5, rtol=1e-4)
    assert ids[0, 1 : n + 1].tolist() == cached.token_ids
    beam = viz._caption_attention(model, x, max_new_tokens=6, strategy="beam", num_beams=2)
    beam_ids = model.generate(x[None], max_new_tokens=6, strategy="beam", num_beams=2)[0, 1:].tolist()
    assert beam.token_ids == beam_ids[: len(beam.token_ids)] and beam.token_maps.shape[0] == len(beam.words)


@pytest.mark.parametrize(
    "token_rc, stage_pos, pixel_box",
    [
        # stage 1 of a 64x96 image: 8x12 tokens of 8 px; token (1, 9) -> top right, x in [72, 80), y in [8, 16)
        ((1, 9), 0, (72, 8, 80, 16)),
        # stage 2: 4x6 tokens of 16 px; token (3, 0) -> bottom left, x in [0, 16), y in [48, 64)
        ((3, 0), 1, (0, 48, 16, 64)),
    ],
)
def test_heatmap_lands_on_the_forced_token_non_square(model, token_rc, stage_pos, pixel_box, monkeypatch):
    """Force every decoder cross-attention onto one image token; the word heatmaps must peak on its pixels."""
    m = copy.deepcopy(model)
    H, W = 64, 96
    grids = [m.visual.grid_sizes(H, W)[s] for s in m.stages]
    assert grids == [(8, 12), (4, 6)]
    offset = sum(h * w for h, w in grids[:stage_pos])
    j = offset + token_rc[0] * grids[stage_pos][1] + token_rc[1]
    for blk in m.decoder.blocks:
        ca = blk.cross_attn
        with torch.no_grad():
            ca.q.weight.zero_()
            ca.q.bias.fill_(1.0)  # every query = ones: the score of key j is the sum of its entries

        def forced(context, _orig=ca.project_kv):
            k, v = _orig(context)
            k = k.clone()
            k[:, :, j] += 30.0  # (B, nh, L, hd): token j dominates every head
            return k, v

        monkeypatch.setattr(ca, "project_kv", forced)
    x = torch.randn(3, H, W)
    r = viz._caption_attention(m, x, max_new_tokens=4)
    assert r.heatmaps.shape == (len(r.words), H, W) and len(r.words) > 0
    x0, y0, x1, y1 = pixel_box
    for hm, tm in zip(r.heatmaps, r.token_maps):
        yy, xx = divmod(int(hm.argmax()), W)
        assert x0 <= xx < x1 and y0 <= yy < y1, (yy, xx)
        assert float(tm[y0 // 8 : y1 // 8, x0 // 8 : x1 // 8].sum()) > 0.95  # the finest grid has 8-px cells


def test_one_hot_attention_maps_to_the_right_pixels_non_square():
    """token_heatmap + upsampling on their own, for a 48x80 image read at stages 1 (6x10 tokens of 8 px) and 2
    (3x5 tokens of 16 px): a one-hot weight on stage-2 token (r, c) lights rows 16r..16r+15, columns 16c..16c+15."""
    enc = mmxattn.create_encoder("cat_pico")
    grids = [enc.grid_sizes(48, 80)[s] for s in (1, 2)]
    assert grids == [(6, 10), (3, 5)]
    for r, c in [(0, 4), (2, 0), (1, 3)]:
        w = torch.zeros(1, 60 + 15)
        w[0, 60 + r * 5 + c] = 1.0
        hm = viz._to_pixels(token_heatmap(w, grids), enc, 1, (48, 80))[0]  # (48, 80)
        assert hm.shape == (48, 80)
        yy, xx = divmod(int(hm.argmax()), 80)
        assert 16 * r <= yy < 16 * r + 16 and 16 * c <= xx < 16 * c + 16, (r, c, yy, xx)
        inside = hm[16 * r : 16 * r + 16, 16 * c : 16 * c + 16].sum()
        assert float(inside) > 0.75 * float(hm.sum())  # bilinear blur leaks a little across the cell border


def test_plot_caption_attention_panels_titles_colorbar(model, shapes, tmp_path):
    x = shapes[1][1]["image"]
    words, _, _ = viz.caption_attention(model, x, max_new_tokens=5)
    fig = viz.plot_caption_attention(model, x, max_words=3, max_new_tokens=5)
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == words[:3]
    assert len(_colorbars(fig)) == 1
    assert fig.get_suptitle().startswith(" ".join(words))
    path = viz.figure_to_png(fig, tmp_path / "caption.png", dpi=80)
    w, h = PIL.Image.open(path).size
    assert (w, h) == (round(fig.get_figwidth() * 80), round(fig.get_figheight() * 80))
    shutil.copy(path, COPY_DIR / "viz_test_caption.png")


def test_caption_attention_accepts_pil_and_path(model, shapes, tmp_path):
    raw, ds = shapes
    path = tmp_path / "img.png"
    PIL.Image.fromarray(raw[2]["image"]).save(path)
    from_tensor, heat_t, _ = viz.caption_attention(model, ds[2]["image"], max_new_tokens=4)
    from_path, heat_p, _ = viz.caption_attention(model, str(path), max_new_tokens=4)
    from_pil, _, _ = viz.caption_attention(model, PIL.Image.open(path), max_new_tokens=4)
    assert from_tensor == from_path == from_pil
    torch.testing.assert_close(heat_t, heat_p, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="ONE image"):
        viz.caption_attention(model, torch.randn(2, 3, 64, 64))


# ------------------------------------------------------------------------------------------ encoder attention
def test_resolve_encoder_layer_names(model):
    assert viz.resolve_encoder_layer(model, (0, "cpsa", 0)) == ("layers.0.cpsa_blocks.0.attn", 0, "cpsa")
    assert viz.resolve_encoder_layer(model, "visual.layers.1.post_ipsa_blocks.0") == (
        "layers.1.post_ipsa_blocks.0.attn",
        1,
        "ipsa",
    )
    assert viz.resolve_encoder_layer(model.visual, (-1, "ipsa", 0))[1] == 2
    with pytest.raises(ValueError, match="available"):
        viz.resolve_encoder_layer(model, "layers.0.cpsa_blocks.3.attn")
    for stage in (3, 7, -4):  # a 3-stage encoder: no silent wrap-around
        with pytest.raises(ValueError, match="out of range"):
            viz.resolve_encoder_layer(model, (stage, "ipsa", 0))


def test_window_tiling_inverts_the_encoder_partition():
    """The maps are laid out by undoing CAT's own window partition (also on a padded, non-square grid)."""
    for h, w, p in [(8, 12, 4), (6, 10, 4)]:
        g = WindowGrid(h, w, p)
        ids = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
        per_window = g.partition(ids).view(g.num_windows, p * p)  # window order, zero-padded
        ea = viz.EncoderAttention("x", "ipsa", 0, (h, w), p, (g.rows, g.cols), 4, torch.zeros(1), torch.zeros(1))
        tiled = ea._tile(per_window)
        assert torch.equal(tiled[:h, :w], ids[0, :, :, 0])


def test_encoder_attention_maps_and_placement(model):
    x = torch.randn(3, 64, 80)  # stage 0: 16x20 tokens, 4x5 windows; stage 1: 8x10 tokens, 2x3 windows (padded)
    ipsa0, cpsa1 = viz.encoder_attention(model, x, ["layers.0.pre_ipsa_blocks.0.attn", (1, "cpsa", 0)])
    assert ipsa0.grid == (16, 20) and ipsa0.windows == (4, 5) and ipsa0.stride == 4
    assert ipsa0.weights.shape == (20, 1, 16, 16)
    q = ipsa0.ipsa_query_map((5, 9))  # window (1, 2): rows 4..7, cols 8..11
    inside = ~torch.isnan(q)
    assert inside.nonzero().min(0).values.tolist() == [4, 8] and inside.nonzero().max(0).values.tolist() == [7, 11]
    torch.testing.assert_close(q[inside].sum(), torch.tensor(1.0))
    assert cpsa1.windows == (2, 3) and cpsa1.weights.shape == (6, 6) and cpsa1.stride == 8
    torch.testing.assert_close(cpsa1.weights.sum(-1), torch.ones(6))
    assert cpsa1.cpsa_query_map(4).shape == (2, 3)


def test_plot_encoder_attention_layouts(model, shapes, tmp_path):
    x = shapes[1][0]["image"]
    ipsa = viz.plot_encoder_attention(model, x, layer=(0, "ipsa", 0))
    assert len(_panels(ipsa)) == 3 and len(_colorbars(ipsa)) == 3
    assert _panels(ipsa)[0].get_title() == "query token (8, 8) in its window"  # centre of the 16x16 grid
    both = viz.plot_encoder_attention(
        model.visual, x, layer=["layers.0.pre_ipsa_blocks.0.attn", "layers.0.cpsa_blocks.0"]
    )
    panels = _panels(both)
    assert len(panels) == 6 and len(_colorbars(both)) == 6
    matrix = panels[3].get_images()[0].get_array()
    assert matrix.shape == (16, 16)
    np.testing.assert_allclose(np.asarray(matrix).sum(1), 1.0, atol=1e-5)
    assert panels[4].get_title() == "query window 10 (2, 2)"  # the window of the centre token (8, 8)
    cpsa_q = viz.plot_encoder_attention(model, x, layer=(0, "cpsa", 0), query=(1, 14))
    assert _panels(cpsa_q)[1].get_title() == "query window 3 (0, 3)"
    with pytest.raises(ValueError, match="not in window"):
        viz.plot_encoder_attention(model, x, layer=(0, "ipsa", 0), window=0, query=(8, 8))
    path = viz.figure_to_png(both, tmp_path / "encoder.png")
    shutil.copy(path, COPY_DIR / "viz_test_encoder.png")


# ------------------------------------------------------------------------------------------ retrieval
def test_plot_retrieval_both_directions(model, shapes, tmp_path):
    _, ds = shapes
    gallery = torch.stack([ds[i]["image"] for i in range(4)])
    caption = ds[2]["caption"]
    fig = viz.plot_retrieval(model, caption, gallery, k=3, relevant=[2])
    titles = [ax.get_title() for ax in _panels(fig)]
    assert len(titles) == 3
    sims = model.similarity(gallery, [caption])[:, 0]
    order = sims.argsort(descending=True)[:3].tolist()
    for rank, (t, i) in enumerate(zip(titles, order), 1):
        assert t == f"#{rank}  [{i}]  {float(sims[i]):.3f}"
    texts = [c for i in range(3) for c in ds[i]["captions"]]
    fig2 = viz.plot_retrieval(model, ds[0]["image"], texts, k=4, direction="i2t", relevant=[0, 1, 2, 3, 4])
    assert len(_panels(fig2)) == 2
    assert len(_panels(fig2)[1].texts) == 4
    viz.figure_to_png(fig2, tmp_path / "i2t.png")
    with pytest.raises(ValueError, match="direction"):
        viz.plot_retrieval(model, caption, gallery, direction="x2y")
    with pytest.raises(TypeError, match="caption"):
        viz.plot_retrieval(model, gallery[0], gallery)


# ------------------------------------------------------------------------------------------ callback
def _tiny_fit(tmp_path, callbacks, logger):
    from mmxattn.data.datamodule import ShapesDataModule
    from mmxattn.lit.module import MMXAttnModule

    dm = ShapesDataModule(train_size=8, val_size=4, test_size=4, batch_size=4, num_workers=0)
    module = MMXAttnModule(
        preset="mmx_tiny",
        vocab_size=dm.vocab_size,
        pad_id=dm.pad_id,
        bos_id=dm.bos_id,
        eos_id=dm.eos_id,
        context_length=dm.context_length,
        img_size=64,
        rerank=0,
        val_captions=False,
    )
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(module, dm)
    return trainer


def test_callback_writes_and_logs_pngs(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import TensorBoardLogger

    from mmxattn.lit.callbacks import AttentionMapLogger

    cb = AttentionMapLogger(num_images=2, max_words=4, max_new_tokens=5)
    skipped = AttentionMapLogger(num_images=1, every_n_epochs=2, out_dir=str(tmp_path / "never"))
    logger = TensorBoardLogger(tmp_path / "tb")
    tags = []
    monkeypatch.setattr(logger.experiment, "add_figure", lambda tag, fig, **kw: tags.append((tag, len(fig.axes))))
    _tiny_fit(tmp_path, [cb, skipped], logger)
    out = Path(logger.log_dir) / "attention_maps"
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"epoch000_img{i}_{k}.png" for i in range(2) for k in ("caption", "encoder")]
    assert sorted(p.name for p in cb.last_paths) == names  # one round only: the sanity check drew nothing
    assert cb.images.shape == (2, 3, 64, 64) and cb.images.device.type == "cpu"
    assert sorted(t for t, _ in tags) == [f"attention/{k}/img{i}" for k in ("caption", "encoder") for i in range(2)]
    assert all(n > 0 for _, n in tags)
    assert not (tmp_path / "never").exists() and skipped.last_paths == []
    shutil.copy(out / "epoch000_img0_caption.png", COPY_DIR / "viz_callback_caption.png")


@pytest.mark.slow  # wandb's service process takes 3-30 s to start
def test_callback_logs_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    from mmxattn.lit.callbacks import AttentionMapLogger

    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    cb = AttentionMapLogger(num_images=1, max_words=3, max_new_tokens=3)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="mmxattn-test")
    try:
        _tiny_fit(tmp_path, [cb], logger)
    finally:
        logger.experiment.finish()
    media = list(tmp_path.rglob("media/images/attention/*.png"))
    assert len(media) == 2, media  # caption + encoder of one image
    assert sorted(p.name for p in cb.last_paths) == ["epoch000_img0_caption.png", "epoch000_img0_encoder.png"]


def test_encoder_only_attention_converts_images_as_the_model_does(model):
    """An encoder given alone (no model.preprocess) converts PIL images the way training and the model do: alpha
    composited on white, 16-bit rescaled (``convert("RGB")`` showed a transparent image black and a 16-bit ramp
    nearly white)."""
    enc = model.visual
    clear = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ramp = PIL.Image.fromarray((np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16))
    (shown_clear,) = viz.encoder_attention(enc, clear, ["layers.0.pre_ipsa_blocks.0.attn"])
    (shown_ramp,) = viz.encoder_attention(enc, ramp, ["layers.0.pre_ipsa_blocks.0.attn"])
    assert shown_clear.image.min() > 0.98  # white
    assert abs(shown_ramp.image.mean().item() - 0.5) < 0.05  # the ramp's mean grey, not white
