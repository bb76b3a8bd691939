"""Zero-shot classification (``mmxattn.zero_shot_classifier`` / ``mmxattn.classify``) on the shipped tiny shapes
model: the classifier is the re-normalised mean of each class's template embeddings, the probabilities the softmax of
``logit_scale * image_emb @ classifier``, batching changes nothing, the model tells the colour and the shape of
single-object test images far above chance, and bad input gets an error naming it. Then the evaluator's zero-shot
accuracy on the shapes data (``EvalAccumulator``: ``zeroshot_colour_acc`` / ``_shape_acc`` / ``_count_acc``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lit_helpers import record_preprocess_batches
from PIL import Image

import mmxattn
from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.data.shapes_captions import check_caption
from mmxattn.data.shapes_render import COLOURS, SHAPES, Scene
from mmxattn.evaluation import METRIC_KEYS, ZEROSHOT_TASKS, EvalAccumulator, zeroshot_labels
from mmxattn.zeroshot import DEFAULT_TEMPLATES, ZeroShotResult, classify, zero_shot_classifier

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
TEMPLATES = ["a {} shape", "there is a {} object", "{}"]
N_IMAGES = 48


@pytest.fixture(scope="module")
def model():
    assert (FIXTURE / "model.safetensors").exists(), f"{FIXTURE} is missing: run tests/fixtures/make_tiny_checkpoint.py"
    return mmxattn.load(FIXTURE)


@pytest.fixture(scope="module")
def shapes():
    """Single-object shapes test images (uint8 arrays) and their scenes: one colour and one shape per image."""
    ds = ShapesDataModule(val_size=8, test_size=N_IMAGES, num_workers=0, max_objects=1).dataset("test")
    samples = [ds[i] for i in range(N_IMAGES)]
    assert all(s["scene"].n == 1 for s in samples)
    return [s["image"] for s in samples], [s["scene"] for s in samples]


def _by_hand(model, names, templates):
    cols = []
    for n in names:
        e = model.encode_text([t.replace("{}", n) for t in templates])  # (T, E), rows normalised
        cols.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(cols, 1)  # (E, C)


@torch.no_grad()
def test_classifier_is_the_renormalised_mean_of_the_template_embeddings(model):
    model.train()  # the classifier is built in eval mode, and the caller's mode comes back
    try:
        w = zero_shot_classifier(model, list(COLOURS), TEMPLATES)
        assert model.training
    finally:
        model.eval()
    assert w.shape == (model.cfg.embed_dim, len(COLOURS)) and w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w, _by_hand(model, COLOURS, TEMPLATES), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(len(COLOURS)))
    # the mean of several templates is not any one of them (the ensemble is really averaged)
    assert not torch.allclose(w, _by_hand(model, COLOURS, ["{}"]), atol=1e-3)
    # callables give the same prompts; one template alone may be given as is
    fns = [lambda c, t=t: t.replace("{}", c) for t in TEMPLATES]
    torch.testing.assert_close(zero_shot_classifier(model, list(COLOURS), fns), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        zero_shot_classifier(model, list(COLOURS), "a {} shape"), _by_hand(model, COLOURS, ["a {} shape"])
    )


@torch.no_grad()
def test_default_templates_leave_out_those_the_word_vocabulary_cannot_read(model):
    assert "a photo of a {}." in DEFAULT_TEMPLATES  # "photo" is no word of the shapes vocabulary
    readable = [t for t in DEFAULT_TEMPLATES if "photo" not in t]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults adapt silently
        w = zero_shot_classifier(model, list(SHAPES))
    torch.testing.assert_close(w, _by_hand(model, SHAPES, readable), rtol=0, atol=1e-6)
    # a template the user chose is kept, with a warning naming its unknown word
    with pytest.warns(UserWarning, match=r"templates\[0\] 'a photo of a \{\}\.' .*photo"):
        w_photo = zero_shot_classifier(model, list(SHAPES), ["a photo of a {}.", "{}"])
    torch.testing.assert_close(w_photo, _by_hand(model, SHAPES, ["a photo of a {}.", "{}"]), rtol=0, atol=1e-6)


@torch.no_grad()
def test_probs_are_the_softmax_of_scaled_cosines(model, shapes):
    images, _ = shapes
    images = images[:10]
    r = classify(model, images, list(COLOURS), TEMPLATES, k=3)
    assert isinstance(r, ZeroShotResult) and r.class_names == list(COLOURS)
    w = _by_hand(model, COLOURS, TEMPLATES)
    logits = model.get_logit_scale() * model.encode_image(model.preprocess(images)) @ w
    torch.testing.assert_close(r.logits, logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r.probs, logits.softmax(-1), rtol=1e-5, atol=1e-6)
    assert r.indices.shape == (10, 3)
    assert torch.equal(r.indices, r.probs.argsort(1, descending=True)[:, :3])
    assert r.labels == [COLOURS[i] for i in r.probs.argmax(1).tolist()]
    # names from any iterable (read once)
    r_gen = classify(model, images, (c for c in COLOURS), TEMPLATES, k=3)
    assert r_gen.class_names == list(COLOURS) and torch.equal(r_gen.probs, r.probs)
    # a ready classifier gives the same scores, with or without names
    r2 = classify(model, images, w, class_names=list(COLOURS), k=3)
    torch.testing.assert_close(r2.probs, r.probs)
    assert r2.labels == r.labels
    r3 = classify(model, images, w, k=100)  # k above the classes: all of them
    assert r3.class_names is None and r3.indices.shape == (10, len(COLOURS))
    with pytest.raises(ValueError, match="no class names"):
        _ = r3.labels


@torch.no_grad()
def test_batch_size_and_input_form_change_nothing(model, shapes, tmp_path):
    images, _ = shapes
    images = images[:7]
    ref = classify(model, images, list(SHAPES), TEMPLATES, batch_size=64)
    for bs in (1, 3):
        r = classify(model, images, list(SHAPES), TEMPLATES, batch_size=bs)
        torch.testing.assert_close(r.probs, ref.probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(r.indices, ref.indices)
    torch.testing.assert_close(
        zero_shot_classifier(model, list(SHAPES), TEMPLATES, batch_size=1),
        zero_shot_classifier(model, list(SHAPES), TEMPLATES, batch_size=256),
        rtol=0,
        atol=1e-6,
    )
    # files read a batch at a time from a generator, and one (B, 3, H, W) tensor, give what the arrays give
    paths = []
    for i, a in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    r = classify(model, (p for p in paths), list(SHAPES), TEMPLATES, batch_size=3)
    torch.testing.assert_close(r.probs, ref.probs, rtol=1e-5, atol=1e-6)
    r = classify(model, model.preprocess(images), list(SHAPES), TEMPLATES, batch_size=2)
    torch.testing.assert_close(r.probs, ref.probs, rtol=1e-5, atol=1e-6)
    one = classify(model, str(paths[4]), list(SHAPES), TEMPLATES)  # one image alone
    torch.testing.assert_close(one.probs, ref.probs[4:5], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_the_tiny_model_tells_colour_and_shape_far_above_chance(model, shapes):
    """The fixture knows the colour and the shape of single-object images (measured: colour 0.92, shape 1.0 over
    these 48 images with the default templates; chance 1/8 and 1/6)."""
    images, scenes = shapes
    for names, truth in ((COLOURS, [s.colour[0] for s in scenes]), (SHAPES, [s.shape[0] for s in scenes])):
        assert len(set(truth)) > len(names) // 2  # many classes present: accuracy is not one class's rate
        r = classify(model, images, list(names))
        acc = (r.indices[:, 0] == torch.tensor(truth)).float().mean().item()
        assert acc >= 0.75, (names, acc)
        # the scores follow the names: reversed class order, reversed columns (no position bias)
        rev = classify(model, images, list(names)[::-1])
        torch.testing.assert_close(rev.probs, r.probs.flip(1), rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(model, shapes):
    images, _ = shapes
    names = list(COLOURS)
    with pytest.raises(ValueError, match="class_names is empty"):
        zero_shot_classifier(model, [])
    with pytest.raises(TypeError, match="class_names must be a list of str, got the str 'red'"):
        zero_shot_classifier(model, "red")
    with pytest.raises(TypeError, match=r"class_names\[1\] must be a str, got int"):
        zero_shot_classifier(model, ["red", 3])
    with pytest.raises(ValueError, match=r"class_names\[1\] is an empty name"):
        zero_shot_classifier(model, ["red", " "])
    with pytest.raises(ValueError, match=r"templates\[1\] 'a shape' has no '\{\}'"):
        zero_shot_classifier(model, names, ["a {}", "a shape"])
    with pytest.raises(ValueError, match="templates is empty"):
        zero_shot_classifier(model, names, [])
    with pytest.raises(TypeError, match=r"templates\[0\] must be a str with '\{\}' or a callable"):
        zero_shot_classifier(model, names, [3])
    with pytest.raises(ValueError, match=r"templates\[0\]\('red'\) returned None"):
        zero_shot_classifier(model, names, [lambda c: None])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        zero_shot_classifier(model, names, batch_size=0)
    with pytest.warns(UserWarning, match=r"duplicates \{'red': 2\}"):
        w = zero_shot_classifier(model, ["red", "blue", "red"], TEMPLATES)
    torch.testing.assert_close(w[:, 0], w[:, 2])  # kept, aligned with the caller's label ids
    with pytest.warns(UserWarning, match="'magenta' \\(magenta\\): they read as <unk>"):
        zero_shot_classifier(model, ["red", "magenta"], TEMPLATES)
    # classify: images, k, the classifier and its names
    with pytest.raises(ValueError, match="images is empty"):
        classify(model, [], names)
    with pytest.raises(ValueError, match="images is empty"):
        classify(model, iter(()), names)
    bad = [*images[:5], "no/such/file.png"]
    with pytest.raises(Exception, match="no/such/file.png"):
        classify(model, bad, names, batch_size=2)
    with pytest.raises(TypeError, match=r"images\[5\]: expected a tensor, PIL image"):  # indexed over all images
        classify(model, [*images[:5], 3.5], names, batch_size=2)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        classify(model, images[:2], names, k=0)
    w = zero_shot_classifier(model, names, TEMPLATES)
    with pytest.raises(ValueError, match=r"classifier must be a float tensor \(E=64, C\).*\(8, 64\)"):
        classify(model, images[:2], w.T)
    with pytest.raises(ValueError, match="3 class_names for a classifier of 8 classes"):
        classify(model, images[:2], w, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="templates apply to class names"):
        classify(model, images[:2], w, TEMPLATES)
    with pytest.raises(ValueError, match="class_names= goes with a classifier tensor"):
        classify(model, images[:2], names, class_names=names)
    nan = w.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        classify(model, images[:2], nan)


def test_a_model_without_tokenizer_says_so(model):
    tok, model.tokenizer = model.tokenizer, None
    try:
        with pytest.raises(RuntimeError, match="model.tokenizer is None"):
            zero_shot_classifier(model, ["red", "blue"])
        with pytest.raises(RuntimeError, match="model.tokenizer is None"):
            classify(model, [np.zeros((64, 64, 3), np.uint8)], ["red", "blue"])
    finally:
        model.tokenizer = tok


def test_distinct_names_cut_to_the_same_tokens_warn_every_time(model):
    """Class names longer than the context length are cut by the tokenizer, which says so once per session: two
    names that differ only after the cut give identical columns (as duplicate names do), and every classifier
    built from them says so; names that the cut leaves distinct do not warn."""
    n = model.cfg.text.context_length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.tokenizer(["red " * (2 * n)], context_length=n)  # an earlier truncation: the tokenizer's one warning
    long = ["a red square " * n + "red", "a red square " * n + "blue"]
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"distinct class names read as the same tokens.*context_length=24"):
            w = zero_shot_classifier(model, [*long, "green"], TEMPLATES)
        torch.testing.assert_close(w[:, 0], w[:, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero_shot_classifier(model, ["red square", "blue square", "red"], TEMPLATES)


def test_exported_from_the_package():
    assert mmxattn.classify is classify and mmxattn.zero_shot_classifier is zero_shot_classifier
    assert {"classify", "zero_shot_classifier"} <= set(mmxattn.__all__)
    assert mmxattn.__all__ == sorted(mmxattn.__all__, key=lambda s: (s[0].islower(), s))


# ------------------------------------------------------------------ the evaluator's zero-shot accuracy (shapes data)


@pytest.fixture(scope="module")
def eval_batch():
    """One test batch of the shapes data module (1-4 objects per image, with scenes)."""
    dm = ShapesDataModule(val_size=8, test_size=40, batch_size=40, num_workers=0)
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    return dm, batch


def test_zeroshot_labels_and_prompts_follow_the_data():
    ds = ShapesDataModule(val_size=8, test_size=40, num_workers=0).dataset("test")
    scenes = [ds.scene(i) for i in range(40)]
    assert {s.n for s in scenes} == {1, 2, 3, 4}
    for sc in scenes:
        colour, shape, count = zeroshot_labels(sc)
        assert count == sc.n - 1
        assert (colour, shape) == ((sc.colour[0], sc.shape[0]) if sc.n == 1 else (-1, -1))
        # every prompt of the true class is a caption of the data's grammar that is true of the image
        for j, (names, templates) in enumerate(ZEROSHOT_TASKS.values()):
            label = zeroshot_labels(sc)[j]
            for t in templates if label >= 0 else ():
                prompt = t(names[label]) if callable(t) else t.replace("{}", names[label])
                check = check_caption(prompt, sc)
                assert check is not None and check.fits, (prompt, sc)
    assert ZEROSHOT_TASKS["colour"][1][0]("orange") == "an orange shape"


@torch.no_grad()
def test_evaluator_reports_zero_shot_accuracy(model, eval_batch):
    dm, batch = eval_batch
    acc = EvalAccumulator(model, rerank=0, captions=False, grounding=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every prompt word is in the shapes vocabulary
        acc.update(batch)
        out = acc.compute()
    assert set(METRIC_KEYS) <= set(out)
    scenes = [Scene(*s) for s in batch["scenes"]]
    labels = torch.tensor([zeroshot_labels(s) for s in scenes])
    single = labels[:, 0] >= 0
    assert out["zeroshot_n_single"] == int(single.sum()) > 5
    # by hand: argmax of image embedding @ classifier, over the images that have the task's label
    emb = model.encode_image(batch["images"])
    for j, (task, (names, templates)) in enumerate(ZEROSHOT_TASKS.items()):
        keep = labels[:, j] >= 0
        pred = (emb[keep] @ zero_shot_classifier(model, list(names), list(templates))).argmax(1)
        assert out[f"zeroshot_{task}_acc"] == pytest.approx((pred == labels[keep, j]).float().mean().item())
        # the baseline over the same images: the most frequent class's share
        assert out[f"zeroshot_{task}_majority"] == pytest.approx(
            labels[keep, j].bincount().max().item() / int(keep.sum())
        )
    # measured on the tiny fixture: colour 0.99, shape 1.0 over 252 single-object images of 1000; count 0.47
    # (majority classes 0.14, 0.20, 0.26)
    assert out["zeroshot_colour_acc"] >= 0.75 and out["zeroshot_shape_acc"] >= 0.75
    assert out["zeroshot_count_acc"] > out["zeroshot_count_majority"]
    # off, or without scenes (other data): None
    for kwargs, b in (({"zeroshot": False}, batch), ({}, {k: v for k, v in batch.items() if k != "scenes"})):
        acc = EvalAccumulator(model, rerank=0, captions=False, grounding=False, **kwargs)
        acc.update(b)
        out = acc.compute()
        assert all(out[f"zeroshot_{t}_acc"] is None for t in ZEROSHOT_TASKS) and out["zeroshot_n_single"] == 0
        assert all(out[f"zeroshot_{t}_majority"] is None for t in ZEROSHOT_TASKS)


def test_classify_encodes_batch_size_images_at_a_time_whatever_the_input_form(model, monkeypatch):
    """A list holding one large batched tensor is cut like a list of images (retrieve's gallery cutting), so no
    forward pass exceeds batch_size; the result equals one pass over all."""
    x = model.preprocess([Image.new("RGB", (40, 40), (40 * i, 200 - 30 * i, 90)) for i in range(5)])  # (5, 3, H, W)
    names = ["red", "green", "blue"]
    whole = classify(model, x, names, batch_size=64)
    sizes = record_preprocess_batches(model, monkeypatch)
    got = classify(model, [x[:1], x[1:]], names, batch_size=2)
    assert sizes == [2, 2, 1]
    assert torch.allclose(got.probs, whole.probs, atol=1e-5) and torch.equal(got.indices, whole.indices)
