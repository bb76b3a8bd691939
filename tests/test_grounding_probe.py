"""benchmarks/grounding_probe.py on the shipped tiny checkpoint: the probes find what the fixture is known to
encode (colour at the object's cell, far above chance), the probe itself recovers a planted linear signal and
fails on noise, and the word counts are consistent."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import grounding_probe  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "tiny_shapes"


def test_probe_accuracy_finds_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, :3] @ torch.tensor([[2.0, -1.0, 0.0], [0.0, 2.0, -1.0], [1.0, 0.0, 2.0]])).argmax(1)
    assert grounding_probe.probe_accuracy(x, y) > 0.9
    noise = torch.randint(0, 3, (600,), generator=g)
    assert grounding_probe.probe_accuracy(x, noise) < 0.5


def test_probe_script_on_the_tiny_fixture(tmp_path):
    out = grounding_probe.main(
        ["--ckpt", str(FIXTURE), "--images", "200", "--caption-images", "6", "--json", str(tmp_path / "p.json")]
    )
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(out))
    pr = out["probe"]
    assert pr["objects"] > 100
    colour = pr["colour"]
    # the fixture's colour words ground on their objects: its finest stage's token there knows the colour
    assert colour["stage 1 token at the object"] > colour["chance"] + 0.4
    for kind in ("colour", "shape"):
        g = out["grounding"][kind]
        assert 0 <= g["correct"] <= g["said"]
        assert g["peak_on_object"] is None or 0.0 <= g["peak_on_object"] <= 1.0


def test_shape_learnability_runs_every_model_on_single_object_images():
    import shape_learnability

    rows = shape_learnability.main(
        ["--models", ",".join(shape_learnability.MODELS), "--steps", "2", "--test-images", "12"]
    )
    assert [r["model"] for r in rows] == list(shape_learnability.MODELS)
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["params"] > 0 and r["final_loss"] > 0
    # the data it learns from: one object per image, its shape is the label
    dm = shape_learnability.ShapesDataModule(
        img_size=64, val_size=8, test_size=8, min_objects=1, max_objects=1, num_workers=0
    )
    ds = dm.dataset("test", shape_learnability.build_transforms(64, False))
    x, y = shape_learnability._batch(ds, 0, 8)
    assert x.shape == (8, 3, 64, 64) and y.max() < len(shape_learnability.SHAPES)
    assert all(len(ds[i]["labels"]) == 1 and int(ds[i]["labels"][0][0]) == y[i] for i in range(8))


def test_shape_learnability_cat_options():
    import shape_learnability as sl

    m = sl.build("cat_pico", stage=1, skip_cpsa=(1,), pool="max")
    assert m.stage == 1 and m.pool == "max" and m.head.in_features == m.encoder.stage_dims[1]
    assert all(isinstance(b, sl._Skip) for b in m.encoder.layers[1].cpsa_blocks)
    assert not any(isinstance(b, sl._Skip) for b in m.encoder.layers[0].cpsa_blocks)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, len(sl.SHAPES))
    # the skip is real: with the CPSA blocks back (all other weights equal) stage 1 computes something else
    with torch.no_grad():
        full = sl.build("cat_pico", stage=1)
        full.load_state_dict(m.state_dict(), strict=False)
        assert not torch.equal(
            full.encoder.forward_features(x, stages=[1])[0], m.encoder.forward_features(x, stages=[1])[0]
        )


def test_shape_learnability_stem_and_warmup_options():
    import shape_learnability as sl

    m = sl.build("cat_pico", stem="conv")
    assert m.encoder.cfg.stem == "conv" and isinstance(m.encoder.patch_embed.proj, torch.nn.Sequential)
    assert sl.build("cat_pico").encoder.cfg.stem == "patch"
    # warmup > 0 trains under the captioner's warmup-cosine schedule, not the constant lr: other weights, other loss
    torch.manual_seed(0)
    a = sl.run("cat_pico", 3, 1e-3, batch=4, test_images=4, warmup=2)
    b = sl.run("cat_pico", 3, 1e-3, batch=4, test_images=4, warmup=0)
    assert a["final_loss"] != b["final_loss"]


def test_shape_learnability_multilabel_targets_and_score():
    import shape_learnability as sl

    # the score: ROC AUC per shape against the true shapes, mean over shapes
    truth = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float)
    assert sl.shape_auc(truth * 3 - 1, truth) == 1.0 and sl.shape_auc(1 - truth, truth) == 0.0
    assert sl.shape_auc(torch.zeros(4, 2), truth) == 0.5
    assert sl.shape_auc(torch.tensor([[0.9, 0.0], [0.1, 0.0], [0.2, 0.0], [0.3, 0.0]]), truth[:, :1].repeat(1, 2)) == (
        pytest.approx((0.75 + 0.5) / 2)  # 3 of 4 pairs ranked right; all tied
    )
    # the targets: words the image's captions say; the truth: the shapes its scene holds
    dm = sl.ShapesDataModule(img_size=64, val_size=8, test_size=16, min_objects=1, max_objects=4, num_workers=0)
    ds = dm.dataset("test", sl.build_transforms(64, False))
    for targets in ("shape-words", "caption-words"):
        columns, shape_cols = sl._word_columns(targets, dm.tokenizer)
        assert [columns[c] for c in shape_cols] == list(sl.SHAPES)
        x, said, truth = sl._multilabel_batch(ds, 0, 16, columns, targets == "shape-words")
        assert x.shape == (16, 3, 64, 64) and said.shape == (16, len(columns)) and truth.shape == (16, 6)
        for i in range(16):
            words = {w for c in ds[i]["captions"] for w in c.split()}
            assert set(truth[i].nonzero().flatten().tolist()) == {int(r[0]) for r in ds[i]["labels"]}
            if targets == "caption-words":
                assert {columns[j] for j in said[i].nonzero().flatten().tolist()} == words & set(columns)
            else:
                named = {sl._SHAPE_OF_WORD[w] for w in words if w in sl._SHAPE_OF_WORD}
                assert set(said[i].nonzero().flatten().tolist()) == named
                # captions only say shapes the scene has
                assert named <= set(truth[i].nonzero().flatten().tolist())
    assert len(sl._word_columns("caption-words", dm.tokenizer)[0]) > 20
    rows = sl.main(
        "--models cnn,cat_pico --steps 2 --test-images 12 --targets caption-words --max-objects 4 --pool mil".split()
    )
    assert all(0.0 <= r["shape_auc"] <= 1.0 and r["columns"] > 20 for r in rows)
    m = sl.build("cat_pico", n_classes=5, pool="mil", stage=0)
    x = torch.randn(2, 3, 64, 64)
    tokens = m.encoder.forward_features(x, stages=[0])[0]
    torch.testing.assert_close(m(x), m.head(tokens).amax(1))
    # read through the captioner's projection: its ImageTokenProjector (16 x 16 stage-0 grid) before the head
    mp = sl.build("cat_pico", n_classes=5, pool="mil", stage=0, project=16)
    assert mp.head.in_features == 16
    tokens = mp.encoder.forward_features(x, stages=[0])[0]
    torch.testing.assert_close(mp(x), mp.head(mp.proj([tokens], [(16, 16)])).amax(1))
    with pytest.raises(ValueError, match="max_objects=1"):
        sl.run("cnn", 1, 1e-3, max_objects=4)


def test_word_head_check_scores_an_oracle_perfectly_and_a_blind_head_at_its_baseline():
    """The word-head measurement: maps planted from the scenes' own labels and boxes score 1.0 on both counts;
    maps that see nothing score exactly the 'always absent' rate."""
    from PIL import Image

    import mmxattn
    from mmxattn.data.datamodule import ShapesDataModule
    from mmxattn.data.shapes_render import objects_named

    n, grid = 12, 8
    ds = ShapesDataModule(img_size=64, val_size=8, test_size=n, num_workers=0).dataset("test")
    model = mmxattn.load(FIXTURE)
    scenes = [ds[i] for i in range(n)]
    pixels = [model.preprocess(Image.fromarray(s["image"]))[0] for s in scenes]

    def oracle(images, words):  # finds each image's scene by its pixels, then marks its named objects' centres
        maps = torch.zeros(images.shape[0], len(words), grid, grid)
        for b, img in enumerate(images):
            s = scenes[next(i for i, p in enumerate(pixels) if torch.equal(p, img))]
            for k, w in enumerate(words):
                for o in objects_named(w, s["labels"]):
                    x0, y0, x1, y1 = (float(v) for v in s["boxes"][o])
                    cx, cy = (x0 + x1) / 2 * grid / 64, (y0 + y1) / 2 * grid / 64
                    maps[b, k, min(int(cy), grid - 1), min(int(cx), grid - 1)] = 1.0
        return maps, maps.flatten(2).amax(-1)

    model.word_head = torch.nn.Linear(1, 1)  # the check only needs a head to exist and word_maps to answer
    model.word_maps = oracle
    seen = grounding_probe.word_head_check(model, ds, n, batch=5)
    model.word_maps = lambda images, words: (
        torch.zeros(images.shape[0], len(words), 4, 4),
        torch.zeros(images.shape[0], len(words)),
    )
    blind = grounding_probe.word_head_check(model, ds, n, batch=5)
    for kind in ("colour", "shape"):
        assert seen[kind]["detection_acc"] == seen[kind]["peak_on_object"] == 1.0
        assert seen[kind]["named_objects"] == blind[kind]["named_objects"] > 0
        assert blind[kind]["detection_acc"] == blind[kind]["always_absent_acc"] < 1.0
