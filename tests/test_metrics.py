"""Metrics: full-gallery recall against a brute-force count, caption scores through pycocoevalcap, heatmaps."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmxattn import metrics
from mmxattn.metrics import (
    caption_metrics,
    gallery_normalized_scores,
    grounding_hits,
    grounding_hits_any,
    recall_from_rankings,
    retrieval_metrics,
    token_heatmap,
)


def _brute(img, txt, t2i, k):
    sim = img @ txt.T
    i2t = []
    for i in range(img.shape[0]):
        top = sim[i].argsort(descending=True)[:k]
        i2t.append(any(int(t2i[t]) == i for t in top))
    t2i_hits = []
    for t in range(txt.shape[0]):
        top = sim[:, t].argsort(descending=True)[:k]
        t2i_hits.append(int(t2i[t]) in top.tolist())
    return sum(i2t) / len(i2t), sum(t2i_hits) / len(t2i_hits)


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    t2i = torch.arange(30).repeat_interleave(5)  # 5 captions per image
    txt = F.normalize(img[t2i] + 0.9 * torch.randn(150, 8, generator=g), dim=-1)
    m = retrieval_metrics(img, txt, t2i, chunk=7)  # small chunks exercise the chunking
    for k in (1, 5, 10):
        bi, bt = _brute(img, txt, t2i, k)
        assert m[f"i2t_r{k}"] == pytest.approx(bi)
        assert m[f"t2i_r{k}"] == pytest.approx(bt)
    assert 0 < m["i2t_r1"] < 1 and 0 < m["t2i_r1"] < 1  # not a degenerate case
    # the same numbers from explicit rankings
    sim = img @ txt.T
    r = recall_from_rankings(sim.topk(10, 1).indices, sim.T.topk(10, 1).indices, t2i)
    for key in r:
        assert r[key] == pytest.approx(m[key])


def test_gallery_normalized_recall_matches_brute_force():
    """``*_norm`` recall ranks by the inverted softmax (log p(image | text) for i2t, log p(text | image) for t2i),
    computed in chunks; checked against full-matrix scores ranked by argsort."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    t2i = torch.arange(40).repeat_interleave(3)
    txt = F.normalize(img[t2i] + 0.8 * torch.randn(120, 8, generator=g), dim=-1)
    scale = 7.0
    m = retrieval_metrics(img, txt, t2i, chunk=9, norm_scale=scale)
    s_i2t, s_t2i = gallery_normalized_scores(img, txt, scale)
    assert torch.allclose(s_i2t.exp().sum(0), torch.ones(120)) and torch.allclose(s_t2i.exp().sum(1), torch.ones(40))
    for k in (1, 5, 10):
        hit_i = [any(int(t2i[t]) == i for t in s_i2t[i].argsort(descending=True)[:k]) for i in range(40)]
        hit_t = [int(t2i[t]) in s_t2i[:, t].argsort(descending=True)[:k].tolist() for t in range(120)]
        assert m[f"i2t_r{k}_norm"] == pytest.approx(sum(hit_i) / 40)
        assert m[f"t2i_r{k}_norm"] == pytest.approx(sum(hit_t) / 120)
    # the plain numbers are unchanged by asking for the normalised ones
    plain = retrieval_metrics(img, txt, t2i, chunk=9)
    assert all(m[k] == plain[k] for k in plain)


def test_gallery_normalization_prefers_the_specific_caption():
    """Two images share a generic caption direction; each also has a specific caption. Plain cosine ranks the
    generic caption first for both images (it is closer to both), the inverted softmax ranks each image's own
    specific caption first, as the Bayes rule does."""
    img = F.normalize(torch.tensor([[1.0, 0.6, 0.0], [1.0, 0.0, 0.6]]), dim=-1)
    generic = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    txt = torch.stack(
        [generic, F.normalize(torch.tensor([0.5, 1.0, 0.0]), dim=0), F.normalize(torch.tensor([0.5, 0.0, 1.0]), dim=0)]
    )
    t2i = torch.tensor([0, 0, 1])  # the generic caption belongs to image 0
    sim = img @ txt.T
    assert (sim.argmax(1) == 0).all()  # plain cosine: the generic caption wins for both images
    m = retrieval_metrics(img, txt, t2i, ks=(1,), norm_scale=10.0)
    assert m["i2t_r1"] == 0.5 and m["i2t_r1_norm"] == 1.0
    s_i2t, _ = gallery_normalized_scores(img, txt, 10.0)
    assert s_i2t.argmax(1).tolist() == [1, 2]


def test_retrieval_rejects_bad_mapping():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="text_to_image"):  # a negative index read an uninitialised score
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="at least one image and one text, got 3 and 0"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(0, 4), torch.zeros(0, dtype=torch.long))


def test_ties_count_at_chance_and_a_collapsed_or_nan_model_scores_no_better():
    """Ties against the query used to count as wins: a model whose embeddings all collapsed to one vector scored
    recall 1 everywhere (and would have been saved as the best checkpoint by val/rsum)."""
    n = 20
    t2i = torch.arange(n).repeat_interleave(2)
    same = F.normalize(torch.ones(n, 8), dim=-1)
    m = retrieval_metrics(same, F.normalize(torch.ones(2 * n, 8), dim=-1), t2i, ks=(1, 5), chunk=7)
    # the expected top-k hit rate under random tie-breaking: 1 own image among 20, 2 own texts among 40
    assert m["t2i_r1"] == pytest.approx(1 / n) and m["t2i_r5"] == pytest.approx(5 / n)
    assert m["i2t_r1"] == pytest.approx(2 / (2 * n))
    assert m["i2t_r5"] == pytest.approx(1 - math.comb(2 * n - 2, 5) / math.comb(2 * n, 5))
    # averaged over random tie-breaks, brute force gives the same expectation
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randint(0, 2, (12, 3), generator=g).float() + 0.1, dim=-1)  # many exact ties
    txt = img[torch.arange(12).repeat_interleave(2)].clone()
    txt[::3] = img[torch.randint(0, 12, (8,), generator=g)]
    pairs = torch.arange(12).repeat_interleave(2)
    exact = retrieval_metrics(img, txt, pairs, ks=(1, 3), chunk=5)
    runs = []
    for _ in range(400):  # a random tie-break: a tiny random offset per score
        sim = img @ txt.T + 1e-6 * torch.rand(12, 24, generator=g)
        runs.append(recall_from_rankings(sim.topk(3, 1).indices, sim.T.topk(3, 1).indices, pairs, ks=(1, 3)))
    for key in ("i2t_r1", "i2t_r3", "t2i_r1", "t2i_r3"):
        assert exact[key] == pytest.approx(sum(r[key] for r in runs) / len(runs), abs=0.03), key
    with pytest.warns(UserWarning, match="non-finite"):
        bad = retrieval_metrics(torch.full((3, 4), float("nan")), torch.randn(3, 4), torch.arange(3), norm_scale=5.0)
    assert all(v != v for v in bad.values()) and "rsum" in bad and "t2i_r1_norm" in bad


def test_recall_over_scored_candidates_equals_the_rankings_and_counts_ties_at_chance():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(15, 6, generator=g), dim=-1)
    t2i = torch.arange(15).repeat_interleave(2)
    txt = F.normalize(img[t2i] + 0.7 * torch.randn(30, 6, generator=g), dim=-1)
    sim = img @ txt.T
    i2t_s, i2t_c = sim.topk(10, 1)
    t2i_s, t2i_c = sim.T.topk(10, 1)
    ranked = recall_from_rankings(i2t_c, t2i_c, t2i)  # no ties: the same numbers
    scored = metrics.recall_from_candidates(i2t_c, i2t_s, t2i_c, t2i_s, t2i)
    assert scored.keys() == ranked.keys() and all(scored[k] == pytest.approx(ranked[k]) for k in ranked)
    # all candidates level: each query's own item is one of the 10 tied (2 own texts per image)
    flat_i, flat_t = torch.zeros_like(i2t_s), torch.zeros_like(t2i_s)
    own_i = (t2i[i2t_c] == torch.arange(15)[:, None]).sum(1).double()
    own_t = (t2i_c == t2i[:, None]).any(1).double()
    tied = metrics.recall_from_candidates(i2t_c, flat_i, t2i_c, flat_t, t2i, ks=(1,))
    expect_i = torch.where(own_i > 0, own_i / 10, torch.zeros_like(own_i)).mean().item()
    assert tied["i2t_r1"] == pytest.approx(expect_i) and tied["t2i_r1"] == pytest.approx(own_t.mean().item() / 10)


def test_images_without_a_text_are_t2i_distractors_not_i2t_queries():
    img = torch.eye(4)
    txt = torch.eye(4)[:2]  # texts of images 0 and 1; images 2 and 3 have none
    m = retrieval_metrics(img, txt, torch.tensor([0, 1]), ks=(1, 5))
    assert m["i2t_r5"] == 1.0 and m["i2t_r1"] == 1.0  # over the two captioned images only
    swapped = retrieval_metrics(img, torch.eye(4)[[1, 0]], torch.tensor([0, 1]), ks=(1, 5))  # each text fits the other
    assert swapped["i2t_r1"] == 0.0 and swapped["i2t_r5"] == 1.0 and swapped["t2i_r1"] == 0.0


REFS = {
    1: ["a small red circle left of a blue square", "a red circle and a blue square", "two shapes"],
    2: ["three green triangles", "green triangles in the top right", "some triangles"],
}


def test_caption_scores_extremes():
    perfect = caption_metrics({1: REFS[1][0], 2: REFS[2][0]}, REFS, meteor=False)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_metrics({1: "zebra yak", 2: "quokka"}, REFS, meteor=False)
    assert wrong["bleu4"] < 1e-6 and wrong["cider"] == 0.0 and wrong["rouge_l"] == 0.0
    assert perfect["cider"] > 0


def test_caption_scores_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds = {1: "a red circle left of a square", 2: "green triangles"}
    ours = caption_metrics(preds, REFS, meteor=False)
    # references are already lowercase without punctuation, which is what the PTB tokenizer produces
    gts = {k: list(v) for k, v in REFS.items()}
    res = {k: [v] for k, v in preds.items()}
    assert ours["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])


@pytest.mark.skipif(not metrics.java_available(), reason="METEOR needs java")
def test_meteor_runs_with_java():
    out = caption_metrics({1: "a red circle left of a blue square", 2: "green triangles"}, REFS)
    assert 0 < out["meteor"] <= 1


def test_without_java_falls_back_with_a_warning(monkeypatch):
    preds = {1: "A red circle, left of a square.", 2: "Green triangles!"}
    with_java = caption_metrics(preds, REFS, meteor=False) if metrics.java_available() else None
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    monkeypatch.setattr(metrics, "_NO_JAVA_WARNED", False)  # an earlier test of this process may have warned
    with pytest.warns(UserWarning, match="java not found"):
        out = caption_metrics(preds, REFS)
    assert out["meteor"] is None
    with warnings.catch_warnings():  # once per process: an evaluation calls it per split and reference score
        warnings.simplefilter("error")
        assert caption_metrics(preds, REFS)["meteor"] is None
    if with_java is not None:  # the plain tokenizer agrees with PTB on ordinary captions
        assert out["bleu4"] == pytest.approx(with_java["bleu4"])
        assert out["cider"] == pytest.approx(with_java["cider"])


@pytest.mark.skipif(not metrics.java_available(), reason="the PTB tokenizer needs java")
def test_line_breaks_inside_captions_do_not_shift_references_between_images():
    refs = {i: [f"caption number {w} of image {i}", f"another view {w} {i}"] for i, w in enumerate("abcdef")}
    preds = {i: r[0] for i, r in refs.items()}
    clean = caption_metrics(preds, refs, meteor=False)
    assert clean["bleu4"] == pytest.approx(1.0, abs=1e-6)
    messy_refs = {i: list(r) for i, r in refs.items()}
    messy_refs[1][1] = "another view\r\nb 1"  # CSV data can hold \r\n
    messy_preds = {**preds, 2: "caption number\rc of image 2", 3: "caption\u2028number d of\fimage 3"}
    messy = caption_metrics(messy_preds, messy_refs, meteor=False)
    for key in ("bleu4", "cider", "rouge_l"):
        assert messy[key] == pytest.approx(clean[key], abs=1e-6), key


def test_caption_metrics_errors():
    with pytest.raises(ValueError, match="keys differ"):
        caption_metrics({1: "x"}, REFS)
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({1: "x"}, {1: []})


def test_token_heatmap_places_tokens_row_major():
    grids = [(4, 4), (2, 2)]
    w = torch.zeros(20)
    w[1 * 4 + 3] = 1.0  # fine stage: row 1, column 3
    hm = token_heatmap(w, grids)
    assert hm.shape == (4, 4)
    assert hm.argmax().item() == 1 * 4 + 3
    w = torch.zeros(20)
    w[16 + 2] = 1.0  # coarse stage: row 1, column 0 -> fine rows 2-3, columns 0-1
    hm = token_heatmap(w, grids)
    assert torch.allclose(hm[2:, :2], torch.full((2, 2), 0.25)) and hm.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="grids"):
        token_heatmap(torch.zeros(19), grids)


def test_grounding_hits():
    hm = torch.zeros(2, 4, 4)
    hm[0, 0, 3] = 1  # top right cell of a 64 px image: centre (56, 8)
    hm[1, 3, 0] = 1  # bottom left: centre (8, 56)
    boxes = torch.tensor([[40.0, 0, 64, 20], [40.0, 0, 64, 20]])
    assert grounding_hits(hm, boxes, (64, 64)).tolist() == [True, False]


def test_grounding_misses_tell_the_near_the_wrong_object_and_the_background_apart():
    from mmxattn.metrics import grounding_misses

    hm = torch.zeros(4, 4, 4)  # 16 px cells of a 64 px image
    hm[0, 0, 0] = 1  # cell (0..16, 0..16), centre (8, 8): inside the target box -> a hit
    hm[1, 0, 1] = 1  # cell (16..32, 0..16), centre (24, 8): outside the target, the cell overlaps it -> near
    hm[2, 2, 2] = 1  # cell (32..48, 32..48): on the other object -> other
    hm[3, 3, 0] = 1  # cell (0..16, 48..64): nothing there -> background
    target = torch.tensor([[2.0, 2, 18, 14]])
    other = torch.tensor([[36.0, 36, 44, 44]])
    near, wrong = grounding_misses(hm, [target] * 4, [other] * 4, (64, 64))
    assert near.tolist() == [False, True, False, False]
    assert wrong.tolist() == [False, False, True, False]
    assert grounding_hits_any(hm, [target] * 4, (64, 64)).tolist() == [True, False, False, False]


def test_grounding_hits_any_box():
    hm = torch.zeros(2, 4, 4)
    hm[0, 0, 3] = 1
    hm[1, 3, 0] = 1
    boxes = [torch.tensor([[0.0, 40, 20, 64], [40.0, 0, 64, 20]]), torch.tensor([[40.0, 0, 64, 20]])]
    assert grounding_hits_any(hm, boxes, (64, 64)).tolist() == [True, False]
