"""Generated captions checked against their scene: the shapes grammar read back into meanings
(``parse_caption``/``check_caption``, the caption generator as the reference), the scene carried through transforms
and eval batches, and the evaluator's ``caption_fit`` / ``grounding_acc_gen``."""

from __future__ import annotations

import random

import pytest
import torch

from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.data.shapes_captions import caption_fits, check_caption, make_captions, parse_caption
from mmxattn.data.shapes_render import SHAPES, Scene, sample_scene
from mmxattn.data.transforms import build_transforms, swap_left_right
from mmxattn.evaluation import EvalAccumulator
from mmxattn.lit.module import MMXAttnModule
from tests.lit_helpers import data_linked


def test_every_generated_caption_parses_back_to_its_meaning_and_groundings():
    """The generator is the reference: its captions (all six templates, 1-4 objects) read back into the Meaning it
    generated, fit their scene, and name exactly the objects of its word groundings."""
    rng = random.Random(7)
    seen = set()
    for _ in range(600):
        scene = sample_scene(rng, 64)
        for cap in make_captions(scene, rng, 5):
            parsed = parse_caption(cap.text)
            assert parsed is not None, cap.text
            assert parsed.meaning == cap.meaning, cap.text
            assert parsed.template == cap.template
            check = check_caption(cap.text, scene)
            assert check.fits and check.n_unnamed == 0
            assert sorted(check.groundings) == sorted(cap.groundings), cap.text
            seen.add(cap.template)
    assert seen == {"single", "region", "relation", "pair", "count", "full"}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a red",
        "red circle",
        "a circle left of",
        "a circle and",
        "two",
        "two shapes a circle circle",
        "a circle in the top",
        "there is a circle a circle",
        "a purple banana",
        "two large shapes a circle and a star",
    ],
)
def test_garbled_captions_do_not_parse(text):
    assert parse_caption(text) is None
    assert check_caption(text, Scene(64, (0,), (0,), (0,), (32.0,), (32.0,), (8.0,))) is None


def test_a_false_caption_is_grounded_phrase_by_phrase_and_a_missing_object_is_unnamed():
    # object 0: small red circle on the left; object 1: large blue square on the right
    scene = Scene(64, (0, 1), (0, 5), (0, 1), (10.0, 54.0), (32.0, 32.0), (5.0, 8.0))
    assert check_caption("a red circle left of a blue square", scene).fits
    wrong = check_caption("a red circle right of a blue square", scene)  # the relation is false
    assert not wrong.fits and wrong.n_phrases == 2 and wrong.n_unnamed == 0
    assert sorted(wrong.groundings) == [((1, 2), 0), ((6, 7), 1)]  # each phrase still names its object
    ghost = check_caption("a red circle and a green star", scene)  # no green star: nothing to ground it to
    assert not ghost.fits and ghost.n_phrases == 2 and ghost.n_unnamed == 1
    assert ghost.groundings == (((1, 2), 0),)
    count = check_caption("there are two circles", scene)  # one circle: false, but the word names it
    assert not count.fits and count.groundings == (((3,), 0),)
    assert check_caption("a picture of one circle", scene).fits
    assert check_caption("two shapes a circle and a large square", scene).fits
    assert not check_caption("three shapes a circle and a large square", scene).fits
    assert check_caption("a square on the right", scene).fits and not check_caption("a square at the top", scene).fits


def test_the_scene_flips_with_the_image_and_a_crop_drops_it():
    ds_rng = random.Random(3)
    scene = next(s for s in (sample_scene(ds_rng, 64) for _ in range(200)) if s.n >= 2)
    caps = [c.text for c in make_captions(scene, random.Random(1), 5)]
    sample = {"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "captions": caps, "scene": scene}
    flip = build_transforms(64, train=True, flip=True, flip_p=1.0)
    out = flip(sample)
    assert out["flipped"] and out["captions"] == [swap_left_right(c) for c in caps]
    assert out["scene"].cx == tuple(64 - x for x in scene.cx)
    for c in out["captions"]:  # every mirrored caption is true of the mirrored scene
        assert check_caption(c, out["scene"]).fits
    crop = build_transforms(64, train=True, crop_scale=(0.5, 0.6))
    assert crop(sample)["scene"] is None
    assert build_transforms(64, train=False)(sample)["scene"] == scene


def _eval_setup(tmp_path):
    dm = ShapesDataModule(
        train_size=16,
        val_size=12,
        test_size=8,
        batch_size=12,
        num_workers=0,
        captions_per_image=1,
        cache_dir=str(tmp_path),
    )
    dm.setup("fit")
    torch.manual_seed(0)
    model = MMXAttnModule(preset="mmx_tiny", img_size=64, itm_weight=0.0, **data_linked(dm)).model.eval()
    model.tokenizer = dm.tokenizer
    (batch,) = list(dm.val_dataloader())
    return dm, model, batch


def _captioning(model, texts):
    ids = model.tokenizer(texts)
    model.generate = lambda *a, **k: ids  # the "model" says these captions
    return model


def test_evaluator_scores_the_generated_captions_against_the_scene(tmp_path):
    dm, model, batch = _eval_setup(tmp_path)
    ds = dm.dataset("val")
    assert [Scene(*s) for s in batch["scenes"]] == [ds.scene(i) for i in range(12)]
    refs = [r[0] for r in batch["references"]]
    # captioning every image with its own reference: its grounding IS the reference's (same words, same objects)
    acc = EvalAccumulator(_captioning(model, refs), rerank=0)
    acc.update(batch)
    out = acc.compute()
    assert out["caption_fit"] == 1.0 and out["caption_parsed"] == 1.0 and out["caption_unnamed"] == 0.0
    assert out["grounding_n_gen"] == out["grounding_n"] > 0
    for key in ("grounding_acc", "grounding_near", "grounding_other"):
        assert out[key + "_gen"] == pytest.approx(out[key])
    assert out["grounding_acc"] + out["grounding_near"] + out["grounding_other"] <= 1.0
    # by place in the phrase: first words counted from the batch's own groundings, the two parts make the whole
    n_first = sum(len({tuple(pos) for pos, _ in row}) for per_image in batch["groundings"] for row in per_image)
    n = out["grounding_n"]
    assert 0 < n_first < n and out["grounding_acc_first"] != pytest.approx(out["grounding_acc_later"])
    assert out["grounding_acc_first"] * n_first + out["grounding_acc_later"] * (n - n_first) == pytest.approx(
        out["grounding_acc"] * n
    )
    assert out["grounding_acc_first_gen"] == pytest.approx(out["grounding_acc_first"])
    # the next image's reference, and garble for the last: fit decided by the generator's own meanings
    shifted = refs[1:] + ["circle circle circle"]
    truth = [caption_fits(ds.annotation((i + 1) % 12).captions[0].meaning, ds.scene(i)) for i in range(11)]
    assert 0 < sum(truth) < 11  # some true by chance ("a circle"), most not
    acc = EvalAccumulator(_captioning(model, shifted), rerank=0)
    acc.update(batch)
    out = acc.compute()
    assert out["caption_fit"] == pytest.approx(sum(truth) / 12)
    assert out["caption_parsed"] == pytest.approx(11 / 12)
    named = [check_caption(t, ds.scene(i)) for i, t in enumerate(shifted[:11])]
    assert out["caption_unnamed"] == pytest.approx(sum(c.n_unnamed for c in named) / sum(c.n_phrases for c in named))
    # one heatmap per attribute word of every phrase that names an object (a phrase naming two objects counts once)
    words = sum(len(p) for c in named for p in {pos for pos, _ in c.groundings})
    assert out["grounding_n_gen"] == words > 0


def test_without_scenes_the_generated_caption_metrics_are_none(tmp_path):
    _, model, batch = _eval_setup(tmp_path)
    batch = {k: v for k, v in batch.items() if k != "scenes"}
    acc = EvalAccumulator(_captioning(model, [r[0] for r in batch["references"]]), rerank=0)
    acc.update(batch)
    out = acc.compute()
    assert out["grounding_acc"] is not None
    for key in ("caption_fit", "caption_parsed", "caption_unnamed", "grounding_acc_gen"):
        assert out[key] is None
    assert out["grounding_n_gen"] == 0


def test_a_constant_caption_fits_the_images_that_show_what_it_says(tmp_path):
    dm = ShapesDataModule(train_size=8, val_size=40, test_size=8, num_workers=0, cache_dir=str(tmp_path))
    ds = dm.dataset("val")
    scenes = [ds.scene(i) for i in range(40)]
    with_circle = sum(SHAPES.index("circle") in s.shape for s in scenes) / 40
    assert 0 < with_circle < 1
    assert dm.caption_fit_rate("a circle", "val") == pytest.approx(with_circle)
    one = sum(s.n == 1 for s in scenes) / 40
    assert dm.caption_fit_rate("there is one shape", "val") == pytest.approx(one)
    assert dm.caption_fit_rate("circle circle", "val") == 0.0
