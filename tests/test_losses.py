"""Losses: InfoNCE against references (plain cross-entropy, open_clip's ClipLoss), positives, the 2-process
gloo gradient identity, caption loss with pads and label smoothing, ITM and hard-negative sampling, the attention
losses."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmxattn.losses import (
    AttentionEntropyLoss,
    CaptionLoss,
    ContrastiveLoss,
    ITMLoss,
    MMXAttnLoss,
    WordAttentionLoss,
    phrase_maps,
    positive_mask,
    sample_hard_negatives,
    text_pos_ids,
)


def _embeds(b: int = 6, e: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(b, e, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _reference_infonce(img, txt, scale):
    logits = scale * img @ txt.T  # (B, B)
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------------------------------- contrastive


def test_infonce_matches_cross_entropy_reference():
    img, txt = _embeds()
    for scale in (1.0, 14.3, 100.0):
        got = ContrastiveLoss()(img, txt, torch.tensor(scale))
        torch.testing.assert_close(got, _reference_infonce(img, txt, scale))


def test_infonce_matches_open_clip_cliploss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = _embeds(b=10, e=16, seed=3)
    scale = torch.tensor(20.0)
    ref = open_clip_loss.ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ContrastiveLoss()(img, txt, scale), ref)
    torch.testing.assert_close(ContrastiveLoss(local_loss=False)(img, txt, scale), ref)


def test_infonce_gradient_matches_reference():
    img, txt = _embeds(dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    a = [t.clone().requires_grad_(True) for t in (img, txt)]
    b = [t.clone().requires_grad_(True) for t in (img, txt)]
    ContrastiveLoss()(*a, scale).backward()
    g_scale = scale.grad.clone()
    scale.grad = None
    _reference_infonce(*b, scale).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(g_scale, scale.grad)


def test_distinct_pos_ids_equal_plain_loss():
    img, txt = _embeds()
    scale = torch.tensor(30.0)
    plain = ContrastiveLoss()(img, txt, scale)
    ids = torch.tensor([7, 3, 100, -2, 5, 0])
    torch.testing.assert_close(ContrastiveLoss()(img, txt, scale, pos_ids=ids), plain)


def test_duplicate_positives_put_a_perfect_duplicated_match_at_the_optimum():
    # rows 0 and 1 are two captions of one image (same id) and a perfect match embeds them identically. Plain
    # InfoNCE treats each as the other's negative: the pair costs log 2 above that loss's optimum (0) however large
    # the scale. With pos_ids the targets are uniform over both, so the match reaches the soft-target optimum: the
    # loss equals its floor, the mean target entropy ((log 2 + log 2 + 0 + 0) / 4 per direction). As raw values both
    # are log(2) / 2 here; what pos_ids removes is the excess over the floor.
    basis = torch.eye(3, dtype=torch.float64)
    img = torch.stack([basis[0], basis[0], basis[1], basis[2]])  # image 0 twice
    scale = torch.tensor(50.0, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2])
    floor = torch.tensor(2 * 0.6931471805599453 / 4, dtype=torch.float64)
    results = {}
    for name, pos_ids in (("plain", None), ("grouped", ids)):
        results[name] = ContrastiveLoss()(img, img.clone(), scale, pos_ids=pos_ids)
    grouped_excess = results["grouped"] - floor
    plain_excess = results["plain"] - 0.0  # one-hot targets: floor 0
    assert abs(grouped_excess) < 1e-9 and plain_excess > 0.3
    # the soft target equals the hand-written one: uniform over the two positives
    logits = scale * img @ img.T
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]], dtype=torch.float64)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(results["grouped"], ref)


def test_text_pos_ids_are_stable_and_group_equal_strings():
    ids = text_pos_ids(["a red square", "a blue circle", "a red square"])
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1]
    # stable across processes and runs (Python's hash is salted per process): a fixed value
    assert text_pos_ids(["a red square"]).tolist() == [1257929797341462793]


def test_contrastive_bad_inputs():
    img, txt = _embeds()
    with pytest.raises(ValueError, match=r"\(6, 8\) and \(5, 8\)"):
        ContrastiveLoss()(img, txt[:5], 1.0)
    with pytest.raises(ValueError, match="pos_ids"):
        ContrastiveLoss()(img, txt, 1.0, pos_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="logit_scale"):
        ContrastiveLoss()(img, txt, torch.ones(2))


def test_contrastive_empty_batch_is_an_error_not_nan():
    img, txt = _embeds()
    with pytest.raises(ValueError, match=r"ContrastiveLoss: an empty batch \(0 images, 0 texts"):
        ContrastiveLoss()(img[:0], txt[:0], 10.0)
    with pytest.raises(ValueError, match=r"ContrastiveLoss: an empty batch \(0 images, 0 texts"):
        ContrastiveLoss()(img[:0], txt[:0], 10.0, text_image_index=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="ContrastiveLoss: an empty batch"):
        MMXAttnLoss(pad_id=0, caption_weight=0.0)(img[:0], txt[:0], 10.0, None, None)


def _many_texts_reference(img, txt, scale, tii, pos_ids=None):
    """Written out: image i's positives are its texts and texts equal (by id) to one of them; soft targets uniform
    over the positives; i2t averaged over images, t2i over texts."""
    b, t = img.shape[0], txt.shape[0]
    pos = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        own = [j for j in range(t) if int(tii[j]) == i]
        for j in range(t):
            pos[i, j] = j in own or (pos_ids is not None and any(int(pos_ids[j]) == int(pos_ids[o]) for o in own))
    logits = scale * img @ txt.T
    i2t = -sum((logits[i].log_softmax(0)[pos[i]]).mean() for i in range(b)) / b
    t2i = -sum((logits[:, j].log_softmax(0)[pos[:, j]]).mean() for j in range(t)) / t
    return (i2t + t2i) / 2, pos


def test_many_texts_per_image_matches_written_out_reference():
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(9, 8, generator=g, dtype=torch.float64), dim=-1)
    tii = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    ids = torch.tensor([1, 2, 3, 4, 5, 2, 7, 8, 9])  # text 5 (image 2) is the same string as text 1 (image 0)
    scale = torch.tensor(9.0, dtype=torch.float64)
    for pos_ids in (None, ids):
        ref, pos = _many_texts_reference(img, txt, scale, tii, pos_ids)
        got = ContrastiveLoss()(img, txt, scale, pos_ids=pos_ids, text_image_index=tii)
        torch.testing.assert_close(got, ref)
        assert torch.equal(positive_mask(tii, 4, pos_ids), pos)
    assert positive_mask(tii, 4, ids)[2, 1] and positive_mask(tii, 4, ids)[0, 5]  # the shared string, both ways
    assert not positive_mask(tii, 4, None)[2, 1]


def test_one_text_per_image_index_equals_the_plain_loss():
    img, txt = _embeds(dtype=torch.float64)
    scale = torch.tensor(12.0, dtype=torch.float64)
    ids = torch.tensor([3, 4, 3, 6, 7, 8])
    for pos_ids in (None, ids):
        plain = ContrastiveLoss()(img, txt, scale, pos_ids=pos_ids)
        indexed = ContrastiveLoss()(img, txt, scale, pos_ids=pos_ids, text_image_index=torch.arange(6))
        torch.testing.assert_close(indexed, plain)


def test_many_texts_bad_index():
    img, txt = _embeds()
    with pytest.raises(ValueError, match="text_image_index must be an integer tensor of shape \\(6,\\)"):
        ContrastiveLoss()(img, txt, 1.0, text_image_index=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="must index the 6 images"):
        ContrastiveLoss()(img, txt, 1.0, text_image_index=torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match="every image needs at least one text"):
        ContrastiveLoss()(img, txt, 1.0, text_image_index=torch.tensor([0, 0, 1, 2, 3, 4]))


def test_hard_negatives_respect_pos_mask():
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 1] = 50.0  # by similarity text 1 would be image 0's negative almost surely...
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = True  # ...but it is a positive of image 0 (e.g. another caption of it)
    for _ in range(20):
        neg_t, neg_i = sample_hard_negatives(sim, generator=g, pos_mask=mask)
        assert neg_t[0] not in (0, 1) and neg_i[1] not in (0, 1)
    with pytest.raises(ValueError, match="pos_mask"):
        sample_hard_negatives(sim, pos_mask=mask[:3])


# ----------------------------------------------------------------------------------------------------- distributed


def _single_process(case):
    """Loss and gradients of ONE process on the concatenated batch."""
    p_img = case["proj_img"].clone().requires_grad_(True)
    p_txt = case["proj_txt"].clone().requires_grad_(True)
    log_scale = case["log_scale"].clone().requires_grad_(True)
    img = F.normalize(case["raw_img"] @ p_img, dim=-1)
    txt = F.normalize(case["raw_txt"] @ p_txt, dim=-1)
    img.retain_grad()
    txt.retain_grad()
    loss = ContrastiveLoss()(img, txt, log_scale.exp(), pos_ids=case["pos_ids"], text_image_index=case["tii"])
    loss.backward()
    return {
        "loss": loss.detach(),
        "proj_img": p_img.grad,
        "proj_txt": p_txt.grad,
        "log_scale": log_scale.grad,
        "img": img.grad,
        "txt": txt.grad,
    }


def _cases():
    g = torch.Generator().manual_seed(0)
    n, di, dt, e = 6, 5, 7, 4
    dup = torch.tensor([10, 11, 12, 13, 11, 15])  # row 1 (rank 0) and row 4 (rank 1) are positives of each other
    # several texts per image: counts 2,1,3 | 2,2,1 (rank 0 holds images 0-2 and texts 0-5, rank 1 the rest); text 1
    # (image 0, rank 0) and text 8 (image 4, rank 1) are the same string
    tii = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 5])
    tdup = torch.tensor([20, 21, 22, 23, 24, 25, 26, 27, 21, 29, 30])
    out = []
    for local_loss, pos_ids, sizes, text_index in [
        (True, None, [3, 3], None),
        (True, dup, [3, 3], None),
        (False, dup, [3, 3], None),
        (True, dup, [4, 2], None),  # unequal per-rank batches (e.g. a last webdataset batch)
        (True, tdup, [3, 3], tii),
        (False, tdup, [3, 3], tii),
        (True, None, [3, 3], tii),
    ]:
        n_txt = n if text_index is None else len(text_index)
        tsizes = (
            sizes if text_index is None else [int((text_index < sizes[0]).sum()), int((text_index >= sizes[0]).sum())]
        )
        out.append(
            {
                "raw_img": torch.randn(n, di, generator=g, dtype=torch.float64),
                "raw_txt": torch.randn(n_txt, dt, generator=g, dtype=torch.float64),
                "proj_img": torch.randn(di, e, generator=g, dtype=torch.float64),
                "proj_txt": torch.randn(dt, e, generator=g, dtype=torch.float64),
                "log_scale": torch.tensor(2.0, dtype=torch.float64),
                "pos_ids": pos_ids,
                "sizes": sizes,
                "tsizes": tsizes,
                "tii": text_index,
                "local_loss": local_loss,
            }
        )
    return out


def test_two_process_gloo_matches_one_process(tmp_path: Path):
    """What is equal, for W = 2 ranks each embedding its own rows with shared parameters theta:
    (a) mean over ranks of the returned loss == the one-process loss on the concatenated batch (and with
        local_loss=False every rank returns that loss itself);
    (b) mean over ranks of d(loss_r)/d(theta) -- what DDP applies -- == the one-process d(loss)/d(theta), for the
        projections and for logit_scale;
    (c) the gradient reaching rank r's local embeddings == W * the one-process gradient of those rows (the
        all-gather backward sums every rank's contribution; DDP's averaging divides the W back out).
    Tolerance 1e-6 (float64)."""
    cases = _cases()
    cases_file = tmp_path / "cases.pt"
    torch.save(cases, cases_file)
    worker = Path(__file__).with_name("_dist_loss_worker.py")
    # loopback only: gloo binds to the interface named here
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    world = 2
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(world), str(tmp_path / "init"), str(cases_file)]
            + [str(tmp_path / f"rank{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed worker timed out")
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    tol = {"rtol": 0.0, "atol": 1e-6}
    for i, case in enumerate(cases):
        ref = _single_process(case)
        per_rank = [ranks[r][i] for r in range(world)]
        mean_loss = sum(r["loss"] for r in per_rank) / world
        torch.testing.assert_close(mean_loss, ref["loss"], **tol)
        if not case["local_loss"]:
            for r in per_rank:
                torch.testing.assert_close(r["loss"], ref["loss"], **tol)
        for name in ("proj_img", "proj_txt", "log_scale"):
            ddp_grad = sum(r[name] for r in per_rank) / world
            torch.testing.assert_close(ddp_grad, ref[name], **tol, msg=lambda m, i=i, n=name: f"case {i} {n}: {m}")
        for name, sizes in (("img", case["sizes"]), ("txt", case["tsizes"])):
            start = 0
            for r, size in enumerate(sizes):
                torch.testing.assert_close(per_rank[r][name], world * ref[name][start : start + size], **tol)
                start += size
        # the identity is not vacuous: the ranks' own losses and gradients differ from each other
        assert not torch.allclose(per_rank[0]["proj_img"], per_rank[1]["proj_img"])


# ----------------------------------------------------------------------------------------------------- caption


def _caption_batch(pad_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t, v = 3, 7, 11
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(1, v, (b, t), generator=g)
    labels[0, 4:] = pad_id
    labels[2, 2:] = pad_id
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_matches_cross_entropy_with_ignore_index(smoothing):
    logits, labels = _caption_batch(pad_id=5)
    got = CaptionLoss(pad_id=5, label_smoothing=smoothing)(logits, labels)
    ref = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=5, label_smoothing=smoothing)
    torch.testing.assert_close(got, ref)
    # explicit mean over the non-pad tokens
    keep = labels != 5
    manual = F.cross_entropy(logits[keep], labels[keep], label_smoothing=smoothing)
    torch.testing.assert_close(got, manual)


def test_caption_loss_ignores_pad_positions():
    logits, labels = _caption_batch()
    loss_fn = CaptionLoss(pad_id=0)
    before = loss_fn(logits, labels)
    changed = logits.clone()
    changed[labels == 0] = torch.randn_like(changed[labels == 0]) * 100
    torch.testing.assert_close(loss_fn(changed, labels), before)
    logits.requires_grad_(True)
    loss_fn(logits, labels).backward()
    assert logits.grad[labels == 0].abs().max() == 0
    assert logits.grad[labels != 0].abs().sum() > 0


def test_caption_loss_all_pad_is_zero_not_nan():
    logits, labels = _caption_batch()
    loss = CaptionLoss(pad_id=0)(logits.requires_grad_(True), torch.zeros_like(labels))
    assert loss.item() == 0.0
    loss.backward()


def test_caption_loss_ignores_minus_100_labels_like_pads():
    """-100 (PyTorch's and Hugging Face's ignore index) is ignored as pad is, in the same batch."""
    logits, labels = _caption_batch(pad_id=5)
    mixed = labels.clone()
    mixed[0, 4:] = -100  # those were pads
    loss_fn = CaptionLoss(pad_id=5)
    torch.testing.assert_close(loss_fn(logits, mixed), loss_fn(logits, labels))
    keep = (labels != 5) & (mixed != -100)
    torch.testing.assert_close(loss_fn(logits, mixed), F.cross_entropy(logits[keep], labels[keep]))
    logits.requires_grad_(True)
    loss_fn(logits, mixed).backward()
    assert logits.grad[mixed == -100].abs().max() == 0
    all_ignored = torch.full_like(labels, -100)
    all_ignored[0, 0] = 5
    assert loss_fn(logits, all_ignored).item() == 0.0


def test_caption_loss_pad_id_must_be_a_vocabulary_id():
    logits, labels = _caption_batch()  # V = 11
    with pytest.raises(ValueError, match=r"pad_id must be >= 0 .*got -1"):
        CaptionLoss(pad_id=-1)
    with pytest.raises(ValueError, match=r"pad_id must be >= 0 .*got -100"):
        MMXAttnLoss(pad_id=-100)
    with pytest.raises(TypeError, match=r"pad_id must be an int .*got float"):
        CaptionLoss(pad_id=0.0)
    with pytest.raises(ValueError, match=r"pad_id=11 is outside the vocabulary of the logits \[0, 11\)"):
        CaptionLoss(pad_id=11)(logits, labels)
    with pytest.raises(ValueError, match=r"pad_id=40 is outside the vocabulary of the logits \[0, 11\)"):
        CaptionLoss(pad_id=40)(logits, labels)


@pytest.mark.parametrize("bad", [11, 12, -1, -99])
def test_caption_loss_out_of_range_labels_name_the_value(bad):
    logits, labels = _caption_batch()  # V = 11, pad 0
    labels[1, 3] = bad
    labels[2, 0] = -100  # ignored, not out of range
    with pytest.raises(ValueError, match=rf"labels must be token ids in \[0, 11\) .*got {bad} \(1 label"):
        CaptionLoss(pad_id=0)(logits, labels)


def test_caption_loss_shape_error_names_both():
    logits, labels = _caption_batch()
    with pytest.raises(ValueError, match=r"\(3, 7, 11\).*\(3, 6\)"):
        CaptionLoss(pad_id=0)(logits, labels[:, :6])


# ----------------------------------------------------------------------------------------------------- ITM


def test_itm_loss_is_binary_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2, generator=g)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    torch.testing.assert_close(ITMLoss()(logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match=r"\(8, 3\)"):
        ITMLoss()(torch.randn(8, 3), labels)


def test_hard_negatives_never_pick_positives_and_follow_similarity():
    b = 6
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(b, b, generator=g) * 3
    pos_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    positive = pos_ids[:, None] == pos_ids[None, :]
    counts = torch.zeros(b, b)
    for _ in range(300):
        neg_txt, neg_img = sample_hard_negatives(sim, generator=g, pos_ids=pos_ids)
        assert not positive[torch.arange(b), neg_txt].any()  # image i -> text neg_txt[i]
        assert not positive[neg_img, torch.arange(b)].any()  # text j -> image neg_img[j]
        counts[torch.arange(b), neg_txt] += 1
    # row 0's negatives are texts 2..5 drawn proportionally to softmax(sim[0, 2:])
    expected = sim[0, 2:].softmax(0) * 300
    assert (counts[0, 2:] - expected).abs().max() < 40
    # without pos_ids only the diagonal is excluded
    for _ in range(50):
        neg_txt, _ = sample_hard_negatives(sim, generator=g)
        assert (neg_txt != torch.arange(b)).all()


def test_hard_negatives_rows_without_negatives_are_minus_one():
    sim = torch.randn(3, 3)
    neg_txt, neg_img = sample_hard_negatives(sim, pos_ids=torch.tensor([4, 4, 4]))
    assert neg_txt.tolist() == [-1, -1, -1] and neg_img.tolist() == [-1, -1, -1]
    neg_txt, neg_img = sample_hard_negatives(sim, pos_ids=torch.tensor([4, 4, 5]))
    assert neg_txt.tolist() == [2, 2, 0] or neg_txt.tolist() == [2, 2, 1]
    assert sample_hard_negatives(torch.randn(1, 1))[0].tolist() == [-1]
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(torch.randn(3, 4))


def test_hard_negatives_from_non_finite_similarities_are_still_negatives():
    """A diverged forward gives NaN similarities: the draw must not fail (the caller's non-finite-loss policy acts
    on the step) and must still never pick a positive."""
    pos_ids = torch.tensor([0, 0, 1, 2])
    for bad in (float("nan"), float("inf")):
        sim = torch.randn(4, 4)
        sim[1] = bad
        for seed in range(20):
            neg_txt, neg_img = sample_hard_negatives(sim, torch.Generator().manual_seed(seed), pos_ids=pos_ids)
            for i, j in enumerate(neg_txt.tolist()):
                assert pos_ids[i] != pos_ids[j]
            for j, i in enumerate(neg_img.tolist()):
                assert pos_ids[i] != pos_ids[j]


def test_combined_loss_weights_terms():
    img, txt = _embeds()
    logits, labels = _caption_batch()
    out = MMXAttnLoss(pad_id=0, contrastive_weight=1.0, caption_weight=2.0)(img, txt, 10.0, logits, labels)
    ref = ContrastiveLoss()(img, txt, 10.0) + 2.0 * CaptionLoss(0)(logits, labels)
    torch.testing.assert_close(out["loss"], ref)
    assert set(out) == {"loss", "contrastive_loss", "caption_loss"}


# -------------------------------------------------------------------------------------------- attention entropy


def test_attention_entropy_matches_categorical_entropy():
    """Against torch.distributions.Categorical on the head-averaged maps: the masked mean of the queries'
    entropies minus diversity times the entropy of their mean distribution, over log(keys), mean over maps."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 2, 5, 7, generator=g).softmax(-1) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for diversity in (0.0, 1.0, 0.5):
        ref = []
        for w in maps:
            p = w.mean(1)[mask]  # (kept queries, 7)
            h_q = torch.distributions.Categorical(probs=p).entropy().mean()
            h_m = torch.distributions.Categorical(probs=p.mean(0)).entropy()
            ref.append((h_q - diversity * h_m) / math.log(7))
        out = AttentionEntropyLoss(diversity)(maps, mask)
        torch.testing.assert_close(out, torch.stack(ref).mean())
    all_q = maps[0].mean(1).reshape(-1, 7)
    ref = torch.distributions.Categorical(probs=all_q).entropy().mean() / math.log(7)
    torch.testing.assert_close(AttentionEntropyLoss(0.0)(maps[:1]), ref)  # no mask: every query


def test_attention_entropy_bounds_head_averaging_and_collapse():
    uniform = torch.full((1, 2, 3, 8), 1 / 8)
    onehot = F.one_hot(torch.tensor(5), 8).float().expand(4, 2, 3, 8)  # every query of every image: key 5
    assert AttentionEntropyLoss(0.0)([uniform]).item() == pytest.approx(1.0)
    assert AttentionEntropyLoss(0.0)([onehot]).item() == pytest.approx(0.0, abs=1e-6)
    # two heads each sure of a DIFFERENT key: the averaged map is split in two, log 2 / log 8 = 1/3
    split = torch.stack([F.one_hot(torch.tensor(1), 8), F.one_hot(torch.tensor(6), 8)]).float()[None, :, None]
    assert AttentionEntropyLoss(0.0)([split]).item() == pytest.approx(1 / 3, abs=1e-6)
    # with the diversity term, one fixed key for everything (a sink) is no better than looking everywhere (0),
    # and sharp maps that differ between images are best (-1)
    assert AttentionEntropyLoss()([onehot]).item() == pytest.approx(0.0, abs=1e-6)
    assert AttentionEntropyLoss()([uniform]).item() == pytest.approx(0.0, abs=1e-6)
    varied = F.one_hot(torch.arange(8), 8).float()[:, None, None]  # image i looks at key i
    assert AttentionEntropyLoss()([varied]).item() == pytest.approx(-1.0, abs=1e-6)


def test_attention_entropy_gradient_sharpens_and_errors():
    logits = torch.randn(2, 2, 4, 6, requires_grad=True)
    loss = AttentionEntropyLoss()([logits.softmax(-1)])
    loss.backward()
    with torch.no_grad():
        after = AttentionEntropyLoss()([(logits - 0.5 * logits.grad).softmax(-1)])
    assert after < loss
    with pytest.raises(ValueError, match="no attention maps"):
        AttentionEntropyLoss()([])
    with pytest.raises(ValueError, match=r"\(B, heads, queries, keys\)"):
        AttentionEntropyLoss()([torch.rand(2, 4, 6)])
    with pytest.raises(ValueError, match="query_mask"):
        AttentionEntropyLoss()([torch.rand(2, 2, 4, 6)], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="diversity"):
        AttentionEntropyLoss(-1.0)


# ------------------------------------------------------------------------------------ word-map attention distillation


def _word_attention_reference(maps, probs, targets, tii, ignore, phrase=()):
    """Loop form of WordAttentionLoss: per query, KL(target || attention) weighted by max p - mean p; a word of a
    run of ``phrase`` words is taught the product of the run's maps (its weight stays its own)."""
    att = torch.stack([w.mean(1) for w in maps]).mean(0)
    num = den = 0.0
    for r in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[r, t])
            if y in ignore:
                continue
            p = probs[int(tii[r]), :, y]
            w = float(p.max() - p.mean())
            if y in phrase:
                s, e = t, t
                while s > 0 and int(targets[r, s - 1]) in phrase:
                    s -= 1
                while e + 1 < targets.shape[1] and int(targets[r, e + 1]) in phrase:
                    e += 1
                p = torch.stack([probs[int(tii[r]), :, int(targets[r, k])] for k in range(s, e + 1)]).prod(0)
            excess = (p - p.mean()).clamp_min(0)
            if w == 0:
                continue
            q = excess / excess.sum()
            a = att[r, t]
            kl = sum(float(qi) * math.log(float(qi) / float(ai)) for qi, ai in zip(q, a) if qi > 0)
            num += w * kl
            den += w
    return num / den


def test_word_attention_loss_matches_a_loop_reference_and_reads_each_rows_image():
    g = torch.Generator().manual_seed(0)
    B, r, T, L, V = 2, 3, 5, 6, 9
    probs = torch.rand(B, L, V, generator=g)
    probs[:, :, 4] = 0.7  # a word seen everywhere: weight 0
    targets = torch.randint(0, V, (B * r, T), generator=g)
    targets[0, :2] = 0  # pad
    tii = torch.arange(B).repeat_interleave(r)
    maps = [torch.randn(B * r, 2, T + 1, L, generator=g).softmax(-1) for _ in range(2)]  # one query more than T
    out = WordAttentionLoss(ignore_ids=(0,))(maps, probs, targets, tii)
    ref = _word_attention_reference([w[:, :, :T] for w in maps], probs, targets, tii, {0})
    assert out.item() == pytest.approx(ref, rel=1e-5)
    # each row reads its own image's map: swapping the images changes the loss, swapping them back in tii undoes it
    swapped = WordAttentionLoss(ignore_ids=(0,))(maps, probs.flip(0), targets, tii)
    assert abs(swapped.item() - out.item()) > 1e-3
    torch.testing.assert_close(WordAttentionLoss(ignore_ids=(0,))(maps, probs.flip(0), targets, 1 - tii), out)


def test_word_attention_phrases_are_taught_the_product_of_their_words_maps():
    g = torch.Generator().manual_seed(4)
    B, r, T, L, V = 2, 2, 7, 6, 9
    probs = torch.rand(B, L, V, generator=g) * 0.9 + 0.05
    targets = torch.tensor([[3, 5, 6, 1, 5, 2, 0], [5, 1, 6, 6, 5, 3, 4], [1, 2, 3, 5, 5, 5, 0], [6, 1, 1, 6, 5, 7, 8]])
    tii = torch.arange(B).repeat_interleave(r)
    maps = [torch.randn(B * r, 2, T, L, generator=g).softmax(-1)]
    phrase = (5, 6)
    for objective in ("map", "evidence"):
        plain = WordAttentionLoss(ignore_ids=(0,), objective=objective)(maps, probs, targets, tii)
        out = WordAttentionLoss(ignore_ids=(0,), objective=objective, phrase_ids=phrase)(maps, probs, targets, tii)
        assert abs(out.item() - plain.item()) > 1e-4
    out = WordAttentionLoss(ignore_ids=(0,), phrase_ids=phrase)(maps, probs, targets, tii)
    ref = _word_attention_reference(maps, probs, targets, tii, {0}, phrase=set(phrase))
    assert out.item() == pytest.approx(ref, rel=1e-5)
    # "red" lights both red objects, "circle" both circles: the phrase's map is on the red circle alone
    red, circle = torch.tensor([0.9, 0.9, 0.1, 0.1]), torch.tensor([0.1, 0.9, 0.9, 0.1])
    words = torch.stack([red, circle, torch.full((4,), 0.5)], 1)  # (L, 3): ids 0, 1 and a function word 2
    m = phrase_maps(words[None, :, torch.tensor([2, 0, 1, 2])].transpose(1, 2), torch.tensor([[2, 0, 1, 2]]), (0, 1))
    torch.testing.assert_close(m[0, 1], red * circle)
    torch.testing.assert_close(m[0, 2], red * circle)
    torch.testing.assert_close(m[0, 0], torch.full((4,), 0.5))
    assert int(m[0, 1].argmax()) == 1


def test_word_attention_loss_is_zero_at_the_target_and_ignores_flat_words_and_pads():
    L = 5
    p = torch.tensor([0.1, 0.9, 0.1, 0.5, 0.1])  # the word is at token 1, a little at token 3
    probs = torch.stack([p, torch.full((L,), 0.8)], dim=1)[None]  # (1, L, 2): word 0 localised, word 1 flat
    excess = (p - p.mean()).clamp_min(0)
    target = excess / excess.sum()
    at_target = target.clone()
    at_target[[0, 2, 4]] = 1e-9  # what the target gives no mass (a softmax is never exactly 0)
    maps = [torch.stack([at_target / at_target.sum(), torch.full((L,), 0.2)])[None, None]]  # (1, 1, 2, L)
    loss = WordAttentionLoss()(maps, probs, torch.tensor([[0, 1]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # the flat word's query (anything it looks at) and a pad target do not count
    logits = torch.randn(1, 1, 2, L, requires_grad=True)
    WordAttentionLoss(ignore_ids=(0,))([logits.softmax(-1)], probs, torch.tensor([[0, 1]])).backward()
    assert logits.grad is not None and logits.grad.abs().max() == 0


def test_word_attention_evidence_is_minus_log_the_words_probability_where_the_query_looks():
    g = torch.Generator().manual_seed(2)
    B, T, L, V = 3, 4, 6, 7
    probs = torch.rand(B, L, V, generator=g)
    targets = torch.randint(1, V, (B, T), generator=g)
    maps = [torch.randn(B, 2, T, L, generator=g).softmax(-1)]
    out = WordAttentionLoss(objective="evidence")(maps, probs, targets)
    att = maps[0].mean(1)
    num = den = 0.0
    for b in range(B):
        for t in range(T):
            p = probs[b, :, targets[b, t]]
            w = float(p.max() - p.mean())
            num += w * -math.log(float((att[b, t] * p).sum()))
            den += w
    assert out.item() == pytest.approx(num / den, rel=1e-5)
    with pytest.raises(ValueError, match="objective"):
        WordAttentionLoss(objective="kl")


@pytest.mark.parametrize("objective", ["map", "evidence"])
def test_word_attention_gradient_moves_the_peak_onto_the_word_and_errors(objective):
    g = torch.Generator().manual_seed(1)
    R, T, L, V = 4, 3, 16, 5
    probs = torch.full((R, L, V), 0.05)
    where = torch.randint(0, L, (R, V), generator=g)  # each image has every word at one token
    probs.scatter_(1, where[:, None, :], 0.95)
    targets = torch.randint(0, V, (R, T), generator=g)
    logits = torch.randn(R, 2, T, L, generator=g, requires_grad=True)
    loss_fn = WordAttentionLoss(objective=objective)
    opt = torch.optim.SGD([logits], lr=20.0)
    first = None
    for _ in range(30):
        loss = loss_fn([logits.softmax(-1)], probs, targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    peak = logits.detach().softmax(-1).mean(1).argmax(-1)  # (R, T)
    assert torch.equal(peak, where.gather(1, targets))
    with pytest.raises(ValueError, match="no attention maps"):
        loss_fn([], probs, targets)
    with pytest.raises(ValueError, match="rows, heads, queries, image tokens"):
        loss_fn([torch.rand(R, 2, T, L + 1)], probs, targets)
    with pytest.raises(ValueError, match="word_probs"):
        loss_fn([torch.rand(R, 2, T, L)], probs[0], targets)
    with pytest.raises(ValueError, match="no text_image_index"):
        loss_fn([torch.rand(2 * R, 2, T, L)], probs, targets.repeat(2, 1))


def test_caption_loss_check_labels_false_skips_the_host_read_the_training_module_does_not_need():
    """The training module's CaptionLoss does not re-check labels (the model's forward checked the ids they are
    cut from): no second host sync per step. With the check off, a bad label reaches cross_entropy itself."""
    from mmxattn.lit.module import MMXAttnModule

    assert MMXAttnModule(preset="mmx_tiny").caption_loss.check_labels is False
    logits, labels = _caption_batch()  # V = 11
    labels[1, 3] = 12
    with pytest.raises(IndexError):  # torch's own error (a device assert on CUDA), not the checked ValueError
        CaptionLoss(pad_id=0, check_labels=False)(logits, labels)
    labels[1, 3] = 4
    torch.testing.assert_close(CaptionLoss(0, check_labels=False)(logits, labels), CaptionLoss(0)(logits, labels))
