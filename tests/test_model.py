"""MMXAttn: the public API's contract over every model preset, text-side masking, inputs, retrieval."""

import dataclasses
import warnings

import pytest
import torch
from lit_helpers import record_preprocess_batches

import mmxattn
from mmxattn.capture import capture_attention
from mmxattn.presets import get_config, get_encoder_config


def _batch(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    s = c.vision.img_size
    images = torch.randn(B, 3, s, s, generator=g)
    T = c.text.context_length
    ids = torch.randint(3, c.text.vocab_size, (B, T), generator=g)
    ids[:, 0] = c.text.bos_id
    lengths = torch.randint(3, T, (B,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n] = c.text.eos_id
        ids[i, n + 1 :] = c.text.pad_id
    return images, ids


def _small(name):
    # the large presets at a reduced image size keep the contract test fast on a CPU; no drop-path, so that
    # "every parameter gets a gradient" is not left to chance
    if name in ("mmx_cat_t", "mmx_cat_s"):
        return mmxattn.create_model(
            name, img_size=112, text=dict(vocab_size=512, pad_id=0, bos_id=1, eos_id=2), drop_path_rate=0.0
        )
    return mmxattn.create_model(name, drop_path_rate=0.0)


@pytest.mark.parametrize("name", mmxattn.list_presets())
def test_preset_contract(name):
    torch.manual_seed(0)
    model = _small(name)
    images, ids = _batch(model)
    out = model(images, ids)
    B, T, V = ids.shape[0], ids.shape[1], model.cfg.text.vocab_size
    assert out.image_embeds.shape == (B, model.cfg.embed_dim) == out.text_embeds.shape
    assert out.logits.shape == (B, T - 1, V)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(B))
    assert all(torch.isfinite(t).all() for t in (out.image_embeds, out.text_embeds, out.logits))
    # every parameter receives a gradient from the three training signals
    itm = model.itm_logits(out.image_tokens, ids, out.text_states)
    loss = (out.image_embeds @ out.text_embeds.T).sum() * out.logit_scale + out.logits.square().mean() + itm.sum()
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    # state dict round trip
    clone = _small(name)
    clone.load_state_dict(model.state_dict(), strict=True)
    model.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(images, ids).logits, model(images, ids).logits)


def test_grad_checkpointing_changes_nothing():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny")
    images, ids = _batch(model)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        out = model(images, ids)
        (out.logits.square().mean() + (out.image_embeds * out.text_embeds).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_no_0d_parameters_and_0d_checkpoint_values_still_load(tmp_path):
    """FSDP refuses 0-d parameters, so one-element parameters (logit_scale, image_proj.pos_scale) have shape (1,);
    state dicts that stored them 0-d (older checkpoints and exports) still load, directly, under a prefix (as in a
    Lightning checkpoint) and through mmxattn.load's exported-directory path."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny")
    assert [n for n, p in model.named_parameters() if p.ndim == 0] == []
    assert model.get_logit_scale().shape == ()  # the output stays a 0-d tensor
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
        model.image_proj.pos_scale.fill_(0.25)
    old = {k: v.reshape(()) if v.shape == (1,) else v for k, v in model.state_dict().items()}
    assert old["logit_scale"].ndim == 0 and old["image_proj.pos_scale"].ndim == 0

    fresh = mmxattn.create_model("mmx_tiny")
    fresh.load_state_dict(old, strict=True)
    assert fresh.logit_scale.shape == (1,) and fresh.logit_scale.item() == 1.5
    assert fresh.image_proj.pos_scale.item() == 0.25

    wrapper = torch.nn.Module()
    wrapper.model = mmxattn.create_model("mmx_tiny")
    wrapper.load_state_dict({f"model.{k}": v for k, v in old.items()}, strict=True)
    assert wrapper.model.logit_scale.item() == 1.5

    from safetensors.torch import load_file, save_file

    weights = mmxattn.export(model, tmp_path / "exp") / "model.safetensors"
    save_file({k: old[k] for k in load_file(str(weights))}, str(weights))  # as an older export wrote it
    loaded = mmxattn.load(tmp_path / "exp")
    assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.item() == 1.5


def test_training_forward_compiles_as_one_graph():
    """torch.compile of the training forward (what ``MMXAttnModule(compile=True)`` compiles): no graph break, so
    the compiler sees the whole step (the eager-only input-value checks used to split it in three)."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").train()
    images, ids = _batch(model)
    index = torch.arange(images.shape[0]).repeat_interleave(2)
    ids = ids.repeat_interleave(2, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)  # a graph break raises
    torch.manual_seed(1)
    out = compiled(images, ids, index)
    torch.manual_seed(1)
    ref = model(images, ids, index)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="token ids must lie in"):  # eager calls still check values
        model(images, ids.clamp(max=0) - 1, index)


def test_text_embedding_ignores_padding():
    """The CLS state must not see pad tokens, wherever the padding starts (open_clip's CLS-mask bug)."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    _, ids = _batch(model, B=4)
    before = model.encode_text(ids)
    with torch.no_grad():
        model.text.token_embedding.weight[model.cfg.text.pad_id] += 5.0  # pads now look very different
        model.text.positional_embedding[-3:-1] += 5.0  # and so do late positions (pads in every row)
    after = model.encode_text(ids)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_text_states_are_causal():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    _, ids = _batch(model, B=1)
    other = ids.clone()
    other[0, 5:] = 7
    _, a = model.text(ids)
    _, b = model.text(other)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_decoder_cross_attention_reads_every_image_token():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model)
    with capture_attention(model, which="decoder.*cross_attn") as maps:
        model(images, ids)
    L = model.num_image_tokens
    assert L == 8 * 8 + 4 * 4  # stages -2 and -1 of cat_pico (64 px: 16x16, 8x8, 4x4 token grids)
    for w in maps.values():
        assert w.shape == (2, model.cfg.text.heads, ids.shape[1], L)


def test_bad_inputs_raise_clear_errors():
    model = mmxattn.create_model("mmx_tiny")
    images, ids = _batch(model)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(images, ids[:1])
    bad = ids.clone()
    bad[0, 1] = model.cfg.text.vocab_size
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model(images, bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(images[:, :1], ids)
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokenizer"):
        model.encode_text(["a red circle"])
    with pytest.raises(ValueError, match="vocab_size"):
        mmxattn.create_model("mmx_tiny", vocab_size=20, tokenizer=type("T", (), {"vocab_size": 21})())


def test_vision_override_can_name_another_encoder_preset_and_bad_fields_are_named():
    # the encoder of a model preset swapped for another encoder preset, with a field of its own on top
    cfg = get_config("mmx_tiny", vision={"preset": "cat_shapes", "window": 2})
    shapes = get_encoder_config("cat_shapes")
    assert (cfg.vision.embed_dim, cfg.vision.num_heads, cfg.vision.window) == (shapes.embed_dim, shapes.num_heads, 2)
    assert cfg.vision.num_classes == 0  # the model never reads a classification head
    assert get_config("mmx_tiny", vision="cat_shapes").vision == dataclasses.replace(shapes, num_classes=0)
    model = mmxattn.create_model("mmx_tiny", vision={"preset": "cat_shapes"})
    assert model.visual.cfg.embed_dim == shapes.embed_dim
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['embed'\].*CATConfig"):
        get_config("mmx_tiny", vision={"embed": 3})
    with pytest.raises(ValueError, match=r"\['widht'\].*TextConfig"):
        get_config("mmx_tiny", text={"widht": 3})
    with pytest.raises(KeyError, match="unknown encoder preset 'nope'"):
        get_config("mmx_tiny", vision={"preset": "nope"})
    with pytest.raises(TypeError, match="vision= takes a CATConfig or a dict"):
        get_config("mmx_tiny", vision=3)


def test_several_captions_per_image_forward_equals_repeating_the_images():
    """forward(images, ids, text_image_index) encodes each image once and decodes every caption against its
    image: the same embeddings and logits as repeating the images row by row."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=5)
    tii = torch.tensor([0, 0, 1, 2, 2])  # images 0 and 2 have two captions, image 1 one; 3 images in the batch
    out = model(images[:3], ids, tii)
    ref = model(images[:3][tii], ids)
    assert out.image_embeds.shape == (3, model.cfg.embed_dim) and out.text_embeds.shape[0] == 5
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds)
    torch.testing.assert_close(out.image_embeds, ref.image_embeds[[0, 2, 3]], rtol=1e-5, atol=1e-6)
    # training mode with the decoder's gradient checkpointing: the shared-image path (keys/values gathered per
    # caption, see test_attention) gives the decoder the same gradients as the repeated images
    model.train()
    model.decoder.grad_checkpointing = True
    grads = []
    for shared in (True, False):
        model.zero_grad()
        o = model(images[:3], ids, tii) if shared else model(images[:3][tii], ids)
        (o.logits.square().mean() + o.text_embeds.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.decoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()
    with pytest.raises(ValueError, match=r"text_image_index must be an integer tensor of shape \(5,\)"):
        model(images[:3], ids, tii[:4])
    with pytest.raises(ValueError, match="must index the 3 images"):
        model(images[:3], ids, torch.tensor([0, 1, 2, 3, 0]))


def test_retrieve_and_rerank():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=5)
    sim = model.similarity(images, ids)
    r = model.retrieve(images, ids, k=3)
    assert r.i2t_indices.shape == (5, 3) and r.t2i_indices.shape == (5, 3)
    torch.testing.assert_close(r.i2t_scores, sim.topk(3, dim=1).values)
    torch.testing.assert_close(r.t2i_scores, sim.T.topk(3, dim=1).values)
    # re-ranking every candidate with the decoder's likelihood = sorting by caption_logprob
    rr = model.retrieve(images, ids, k=5, rerank=5, rerank_with="lm")
    with torch.no_grad():
        tokens = model.encode_image_tokens(images)
        lp = torch.stack([model.caption_logprob(tokens[i : i + 1].expand(5, -1, -1), ids) for i in range(5)])
    torch.testing.assert_close(rr.i2t_scores, lp.sort(dim=1, descending=True).values, atol=1e-5, rtol=1e-5)
    assert torch.equal(rr.t2i_indices, lp.T.argsort(dim=1, descending=True))
    itm = model.retrieve(images, ids, k=2, rerank=4, rerank_with="itm")
    assert itm.i2t_indices.shape == (5, 2)
    with pytest.raises(ValueError, match="rerank_with"):
        model.retrieve(images, ids, k=2, rerank=2, rerank_with="bleu")
    # gallery-normalised ranking: the inverted softmax at the model's temperature, each way
    scale = float(model.get_logit_scale())
    gn = model.retrieve(images, ids, k=3, gallery_norm=True)
    torch.testing.assert_close(gn.i2t_scores, (scale * sim).log_softmax(0).topk(3, dim=1).values)
    torch.testing.assert_close(gn.t2i_scores, (scale * sim).log_softmax(1).T.topk(3, dim=1).values)
    assert torch.equal(gn.i2t_indices, (scale * sim).log_softmax(0).topk(3, dim=1).indices)


@pytest.mark.parametrize("how", ["itm", "lm", "pmi"])
def test_pair_scores_project_each_image_once_and_equal_the_repeated_images(how):
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=4)
    rows = torch.tensor([2, 0, 2, 2])  # pair p: image rows[p] with caption p; image 2 in three pairs, 1 and 3 in none
    with torch.no_grad():
        tokens = model.encode_image_tokens(images)
        _, states = model.text(ids)
        kv_rows = []
        hook = model.decoder.blocks[0].cross_attn.kv.register_forward_hook(
            lambda m, i, o: kv_rows.append(i[0].shape[0])
        )
        got = model.pair_scores(tokens, rows, ids, states, how)
        hook.remove()
        if how == "itm":
            ref = model.itm_logits(tokens[rows], ids, states).log_softmax(-1)[:, 1]
        else:
            ref = model.caption_logprob(tokens[rows], ids, states, normalize=how == "lm")
    assert kv_rows == [2]  # two distinct images, not four pairs
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rerank_with"):
        model.pair_scores(tokens, rows, ids, states, "bleu")


def test_pmi_rerank_subtracts_the_caption_prior_for_image_queries_only():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=6, seed=3)
    with torch.no_grad():
        tokens = model.encode_image_tokens(images)
        # (image, caption) total log-likelihoods by brute force, one image at a time
        total = torch.stack(
            [model.caption_logprob(tokens[i : i + 1].expand(6, -1, -1), ids, normalize=False) for i in range(6)]
        )
        norm = torch.stack([model.caption_logprob(tokens[i : i + 1].expand(6, -1, -1), ids) for i in range(6)])
    lengths = (ids[:, 1:] != model.cfg.text.pad_id).sum(1)
    torch.testing.assert_close(norm * lengths, total, atol=1e-4, rtol=1e-5)
    # the prior is the mean likelihood over the reference images (evenly spaced: 0, 2.5 -> 2 or 3 ..., 5)
    ref = torch.linspace(0, 5, 3).round().long()
    prior = torch.logsumexp(total[ref], 0) - torch.log(torch.tensor(3.0))
    torch.testing.assert_close(model.caption_log_prior(tokens[ref], ids), prior, atol=1e-4, rtol=1e-5)
    r = model.retrieve(images, ids, k=6, rerank=6, rerank_with="pmi", prior_images=3)
    pmi = total - prior  # (image, caption)
    torch.testing.assert_close(r.i2t_scores, pmi.sort(dim=1, descending=True).values, atol=1e-4, rtol=1e-5)
    assert torch.equal(r.i2t_indices, pmi.argsort(dim=1, descending=True))
    # images ranked for a caption: the prior is common to all of them, so the order is the likelihood's
    assert torch.equal(r.t2i_indices, total.T.argsort(dim=1, descending=True))


def test_evaluator_pmi_rerank_matches_retrieve():
    from mmxattn.evaluation import EvalAccumulator

    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=8, seed=5)
    acc = EvalAccumulator(model, rerank=8, rerank_with="pmi", captions=False, grounding=False, prior_images=3)
    acc.update(
        {
            "images": images,
            "ref_ids": ids,
            "ref_image_index": torch.arange(8),
            "image_ids": list(range(8)),
            "references": [["x"]] * 8,
        }
    )
    out = acc.compute()
    r = model.retrieve(images, ids, k=8, rerank=8, rerank_with="pmi", prior_images=3)
    truth = torch.arange(8)[:, None]
    for k in (1, 5):  # every candidate re-ranked: the evaluator's recall is the one of retrieve's full order
        assert out[f"i2t_r{k}_rerank"] == pytest.approx((r.i2t_indices[:, :k] == truth).any(1).float().mean().item())
        assert out[f"t2i_r{k}_rerank"] == pytest.approx((r.t2i_indices[:, :k] == truth).any(1).float().mean().item())
    with pytest.raises(ValueError, match="rerank_with"):
        EvalAccumulator(model, rerank_with="bleu")


def test_preprocess_takes_every_documented_input_alike(tmp_path):
    """A (B, 3, H, W) tensor inside a list gives all B images; PIL images of any mode go through the same
    conversion as files (alpha on white, 16-bit rescaled), numpy arrays through the transform; an empty input
    fails clearly; pixels come out in the model's dtype."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    s = model.cfg.vision.img_size
    x = torch.randn(3, 3, s, s)
    assert torch.equal(model.preprocess([x]), x)
    assert torch.equal(model.preprocess([x[:2], x[2]]), x)
    for empty in ([], (), torch.empty(0, 3, s, s)):
        with pytest.raises(ValueError, match="empty"):
            model.preprocess(empty)
    with pytest.raises(TypeError, match=r"images\[1\].*int"):
        model.preprocess([x[0], 5])

    rgba = np.zeros((s, s, 4), np.uint8)
    rgba[..., 0] = 200  # red, but the left half fully transparent: white there once composited
    rgba[:, s // 2 :, 3] = 255
    ramp = (np.arange(s * s, dtype=np.uint16).reshape(s, s) * 16).astype(np.uint16)
    for name, img in (("rgba.png", Image.fromarray(rgba, "RGBA")), ("i16.png", Image.fromarray(ramp))):
        img.save(tmp_path / name)
        from_path = model.preprocess(str(tmp_path / name))
        torch.testing.assert_close(model.preprocess(img), from_path, rtol=0, atol=0)
        torch.testing.assert_close(model.preprocess(Image.open(tmp_path / name)), from_path, rtol=0, atol=0)
    white = model.preprocess(Image.new("RGB", (s, s), "white"))
    torch.testing.assert_close(model.preprocess(Image.fromarray(rgba, "RGBA"))[..., : s // 4], white[..., : s // 4])
    arr = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
    torch.testing.assert_close(model.preprocess(arr), model.preprocess(Image.fromarray(arr)))

    model.to(torch.bfloat16)  # paths, PIL images and fp32 tensors all reach a bf16 model in its dtype
    assert model.preprocess(str(tmp_path / "rgba.png")).dtype == torch.bfloat16
    assert model.encode_image(x[:1]).dtype == torch.bfloat16
    assert model.generate([str(tmp_path / "rgba.png")], max_new_tokens=2).shape[0] == 1


def test_texts_use_the_models_context_length_and_id_dtype_errors_say_dtype():
    from mmxattn.text.tokenizer import WordTokenizer

    model = mmxattn.create_model("mmx_tiny")  # context_length 16
    words = [f"w{i}" for i in range(model.cfg.text.vocab_size - len(WordTokenizer.SPECIALS))]
    model.tokenizer = WordTokenizer([*WordTokenizer.SPECIALS, *words], context_length=32)
    assert model.tokenizer.vocab_size == model.cfg.text.vocab_size
    emb = model.encode_text(["w1 w2 w3", "w4"])
    assert emb.shape == (2, model.cfg.embed_dim)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        model.encode_text(torch.ones(1, 5, dtype=torch.uint8))


def test_retrieve_reranks_by_the_trained_score_and_warns_on_an_untrained_itm_head():
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=4)
    lm = model.retrieve(images, ids, k=3, rerank=4, rerank_with="lm")
    itm = model.retrieve(images, ids, k=3, rerank=4, rerank_with="itm")
    default = model.retrieve(images, ids, k=3, rerank=4)
    torch.testing.assert_close(default.i2t_scores, itm.i2t_scores)  # nothing known: the head, as before
    model.rerank_with_default, model.itm_trained = "lm", False  # what load() sets for an itm_weight 0 run
    default = model.retrieve(images, ids, k=3, rerank=4)
    torch.testing.assert_close(default.i2t_scores, lm.i2t_scores)
    assert torch.equal(default.t2i_indices, lm.t2i_indices)
    with pytest.warns(UserWarning, match="never trained"):
        model.retrieve(images, ids, k=3, rerank=4, rerank_with="itm")
    with pytest.warns(UserWarning, match="one image is its own prior"):
        one = model.retrieve(images[:1], ids, k=2, rerank=3, rerank_with="pmi")
    torch.testing.assert_close(
        one.i2t_scores, model.retrieve(images[:1], ids, k=2, rerank=3, rerank_with="lm").i2t_scores
    )
    for bad in (dict(k=0), dict(k=-1), dict(k=2, rerank=-3)):
        with pytest.raises(ValueError, match="k must be|rerank must be"):
            model.retrieve(images, ids, **bad)


_FIELDS = ("i2t_indices", "i2t_scores", "t2i_indices", "t2i_scores")


def _gallery_files(model, tmp_path, n, seed=0):
    """``n`` small PNG files of random pixels (what a folder gallery holds), their paths."""
    import numpy as np
    from PIL import Image

    s = model.cfg.vision.img_size
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (s + 5, s, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("gallery_norm", [False, True])
@pytest.mark.parametrize("rerank_with", [None, "itm", "lm", "pmi"])
def test_retrieve_one_direction_equals_that_direction_of_both(rerank_with, gallery_norm):
    """direction="i2t" / "t2i" gives exactly the fields "both" gives, the other side None; images ranked for texts
    keep only the tokens of images that can be candidates (here 3 texts x top 2 of 9 images, streamed 2 at a time)."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=9, seed=2)
    ids = ids[:3]
    kw = dict(k=2, rerank=0 if rerank_with is None else 2, rerank_with=rerank_with, gallery_norm=gallery_norm)
    kw.update(batch_size=2, prior_images=3)
    both = model.retrieve(images, ids, **kw)
    assert torch.equal(both.i2t_scores, model.retrieve(images, ids, direction="both", **kw).i2t_scores)
    read = []  # rows of the image tokens re-ranking reads

    def pair_scores(image_tokens, *args):
        read.append(image_tokens.shape[0])
        return type(model).pair_scores(model, image_tokens, *args)

    model.pair_scores = pair_scores
    for direction in ("i2t", "t2i"):
        read.clear()
        one = model.retrieve(images, ids, direction=direction, **kw)
        for f in _FIELDS:
            if f.startswith(direction):
                assert torch.equal(getattr(one, f), getattr(both, f)), (direction, f)
            else:
                assert getattr(one, f) is None, (direction, f)
        if rerank_with is None:
            assert read == []
        elif direction == "t2i":  # the candidates (at most 3 texts x 2), not the 9 images
            assert read and max(read) <= 6, read
        else:  # every image is a query
            assert read and max(read) == 9


def test_retrieve_gallery_norm_warns_where_a_direction_has_one_item_to_normalise_over():
    """gallery_norm ranks images for a text by log p(text | image), a softmax over the TEXTS: with one text (the
    CLI's usual text-to-image search) every image scores 0 and the order is arbitrary, which is warned about as the
    one-image case of the other direction is; with several texts, or one image ranked by t2i only, nothing warns."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=4, seed=3)
    with pytest.warns(UserWarning, match="with one text every image scores 0"):
        one = model.retrieve(images, ids[:1], k=4, gallery_norm=True, direction="t2i")
    assert torch.equal(one.t2i_scores, torch.zeros(1, 4))  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.retrieve(images, ids[:2], k=4, gallery_norm=True, direction="t2i")
        model.retrieve(images[:1], ids[:2], k=4, gallery_norm=True, direction="t2i")  # texts over one image: fine
        model.retrieve(images, ids[:1], k=4, gallery_norm=True, direction="i2t")  # over the 4 images


@pytest.mark.parametrize("rerank", [0, 3])
def test_retrieve_preprocesses_the_gallery_a_batch_at_a_time(tmp_path, monkeypatch, rerank):
    """A gallery of files (and a batched tensor straddling two batches) is preprocessed batch_size images at a
    time, to the same pixels as all at once: the result is the one of the preprocessed tensor at that batch size,
    and a batch of all ranks alike (scores to float rounding: pooled embeddings are computed per batch)."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=3, seed=4)
    gallery = [*_gallery_files(model, tmp_path, 2), images, *_gallery_files(model, tmp_path, 2, seed=1)[1:]]
    pixels = model.preprocess(gallery)  # (6, 3, H, W), all at once
    assert pixels.shape[0] == 6
    counts = record_preprocess_batches(model, monkeypatch)
    kw = dict(k=3, rerank=rerank, rerank_with="lm")
    got = model.retrieve(gallery, ids, batch_size=2, **kw)
    assert counts == [2, 2, 2]
    ref = model.retrieve(pixels, ids, batch_size=2, **kw)
    for f in _FIELDS:
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    counts.clear()
    whole = model.retrieve(gallery, ids, batch_size=6, **kw)
    assert counts == [6]
    for f in _FIELDS:
        if f.endswith("indices"):
            assert torch.equal(getattr(got, f), getattr(whole, f)), f
        else:
            torch.testing.assert_close(getattr(got, f), getattr(whole, f), rtol=0, atol=1e-5)


def test_retrieve_names_a_bad_image_in_the_middle_of_the_gallery(tmp_path):
    """Preprocessed batch by batch, a bad item is still named by its place in the whole gallery (or its path)."""
    from mmxattn.data.robust import BadImageError

    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=3)
    paths = _gallery_files(model, tmp_path, 5)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="missing.png: file not found"):
        model.retrieve([*paths[:3], missing, paths[4]], ids, batch_size=2)
    with pytest.raises(TypeError, match=r"images\[3\]: expected .* got int"):
        model.retrieve([*paths[:3], 5, paths[4]], ids, batch_size=2)
    with pytest.raises(TypeError, match=r"images\[1\]: expected .* got int"):  # after a tensor of 3 images
        model.retrieve([images, 5], ids, batch_size=2)
    odd = torch.randn(3, model.cfg.vision.img_size // 2, model.cfg.vision.img_size // 2)
    with pytest.raises(ValueError, match="different sizes"):  # alone in its batch, refused as in one batch
        model.retrieve([images[0], images[1], odd], ids, batch_size=2)
    with pytest.raises(ValueError, match="empty list"):
        model.retrieve([], ids)


def test_running_top_k_is_the_stable_ranking_of_the_whole_score_matrix():
    """Each text's candidate images, merged block by block as the gallery streams past, are the top n of one
    stable descending sort of the whole matrix: equal scores in gallery order whatever the block sizes (so the batch
    size never reorders duplicates), NaN first as topk ranks it, fewer than n while the gallery is smaller."""
    from mmxattn.model import _RunningTopK

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (10, 7), generator=g).float()  # (images, texts): many ties
    scores[3, 2] = float("nan")
    scores[[1, 4, 8], 5] = float("nan")  # text 5: NaN at and beyond the n-th place
    for n in (1, 3, 10, 12):
        ref_v, ref_i = scores.T.sort(dim=1, descending=True, stable=True)
        ref_v, ref_i = ref_v[:, :n], ref_i[:, :n]
        for blocks in ([10], [1] * 10, [3, 3, 4], [4, 1, 5]):
            top = _RunningTopK(n)
            first = 0
            for b in blocks:
                top.add(first, scores[first : first + b])
                first += b
            assert torch.equal(top.indices, ref_i), (n, blocks)
            torch.testing.assert_close(top.values, ref_v, equal_nan=True)
    assert _RunningTopK(2).n == 2 and top.values.shape == (7, 10)  # n above the gallery: the whole gallery
    # a larger gallery in uneven blocks, where most blocks add little to a query's top n (the filtered merge)
    scores = torch.randint(0, 40, (300, 50), generator=g).float()
    scores[torch.rand(300, 50, generator=g) < 0.01] = float("nan")
    ref_v, ref_i = scores.T.sort(dim=1, descending=True, stable=True)
    for n, b in ((5, 7), (1, 64), (20, 3)):
        top, first = _RunningTopK(n), 0
        while first < 300:
            top.add(first, scores[first : first + b])
            first += b
        assert torch.equal(top.indices, ref_i[:, :n]), (n, b)
        torch.testing.assert_close(top.values, ref_v[:, :n], equal_nan=True)


@pytest.mark.parametrize("gallery_norm", [False, True])
@pytest.mark.parametrize("rerank", [0, 3])
def test_retrieve_never_holds_an_images_by_texts_score_matrix(gallery_norm, rerank):
    """The gallery streams past in batches and no (images x texts) tensor is ever made (every op's output shape is
    recorded, 11 images x 13 texts in batches of 4), yet the rankings equal the whole matrix's: cosine or the
    inverted softmax over the whole gallery (metrics.gallery_normalized_scores), from the model's own embeddings."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmxattn.metrics import gallery_normalized_scores

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.add(tuple(t.shape))
            return out

    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    images, _ = _batch(model, B=11, seed=5)
    _, ids = _batch(model, B=13, seed=6)
    kw = dict(k=2, rerank=rerank, rerank_with="lm", gallery_norm=gallery_norm, prior_images=3)
    with Shapes() as rec:
        got = model.retrieve(images, ids, batch_size=4, **kw)
    assert rec.seen, "nothing recorded"
    full = [s for s in rec.seen if 11 in s and 13 in s]
    assert not full, f"retrieve made (images x texts) tensors: {full}"
    if rerank == 0:  # the first-stage ranking against the whole matrix, computed here from the embeddings
        with torch.no_grad():
            img, txt = model.encode_image(images), model.encode_text(ids)
            scale = float(model.get_logit_scale())
        by_image, by_text = img @ txt.T, (img @ txt.T).T  # (11, 13), (13, 11)
        if gallery_norm:
            by_image, by_text = gallery_normalized_scores(img, txt, scale)
            by_text = by_text.T
        for scores, f in ((by_image, "i2t"), (by_text, "t2i")):
            ref = scores.topk(2, dim=1)
            assert torch.equal(getattr(got, f + "_indices"), ref.indices), f
            torch.testing.assert_close(getattr(got, f + "_scores"), ref.values, rtol=1e-5, atol=1e-5)
    whole = model.retrieve(images, ids, batch_size=11, **kw)  # one block: the same answer
    for f in _FIELDS:
        if f.endswith("indices"):
            assert torch.equal(getattr(got, f), getattr(whole, f)), f
        else:
            torch.testing.assert_close(getattr(got, f), getattr(whole, f), rtol=0, atol=1e-5)


def test_retrieve_direction_must_be_a_known_one():
    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=2)
    for bad in ("image-to-text", "T2I", None):
        with pytest.raises(ValueError, match=r"direction must be one of \('both', 'i2t', 't2i'\)"):
            model.retrieve(images, ids, direction=bad)


def test_vision_pretrained_that_fits_nothing_fails_and_a_partial_one_warns(tmp_path):
    from safetensors.torch import save_file

    src = mmxattn.create_model("mmx_tiny").visual.state_dict()
    prefixed = {f"backbone.{k}": v.contiguous() for k, v in src.items()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(ValueError, match="none of its keys fit the CAT encoder"):
        mmxattn.create_model("mmx_tiny", vision_pretrained=str(tmp_path / "prefixed.safetensors"))
    part = {k: v.contiguous() for k, v in src.items() if k.startswith("layers.0.")}
    save_file(part, str(tmp_path / "part.safetensors"))
    with pytest.warns(UserWarning, match=r"tensors loaded; \d+ keep their initialisation"):
        m = mmxattn.create_model("mmx_tiny", vision_pretrained=str(tmp_path / "part.safetensors"))
    for k, v in part.items():
        torch.testing.assert_close(m.visual.state_dict()[k], v)


def test_a_saved_model_loads_without_the_encoder_file_it_started_from(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = mmxattn.create_model("mmx_tiny").visual.state_dict()
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in src.items()}, str(weights))
    model = mmxattn.create_model("mmx_tiny", vision_pretrained=str(weights))
    with torch.no_grad():
        model.visual.layers[0].downsample.reduction.weight.mul_(2)  # "fine-tuned" after loading the file
    exported = mmxattn.export(model, tmp_path / "exp")
    weights.unlink()
    again = mmxattn.load(exported)
    torch.testing.assert_close(again.visual.state_dict(), model.visual.state_dict())


@pytest.mark.parametrize("stages", [(0,), (1,), (0, 1)])
def test_every_trainable_parameter_gets_a_gradient_whatever_stages_are_read(stages):
    """DDP waits for every parameter that requires grad: encoder parts no read stage reaches (the stages after the
    deepest read one, and that stage's patch merging) must be frozen."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", image_stages=stages, drop_path_rate=0.0)
    images, ids = _batch(model)
    out = model(images, ids)
    itm = model.itm_from_decoder(out.decoder_states, ids)
    loss = out.logits.square().mean() + out.image_embeds.sum() + out.text_embeds.sum() + out.logit_scale + itm.sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    deepest = model.visual.layers[max(stages)]
    assert deepest.downsample is None or not any(p.requires_grad for p in deepest.downsample.parameters())


def test_preprocess_takes_raw_pixel_tensors_alpha_arrays_and_tiny_files_as_pil_images_are_taken(tmp_path):
    """uint8 pixel tensors go through the transform like the same PIL image (the float-tensor error points
    there); numpy arrays with alpha are composited on white as PIL images are; a readable file of a few pixels is
    taken as the same PIL image is; an empty image is named."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    s = model.cfg.vision.img_size
    rgb = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
    from_pil = model.preprocess(Image.fromarray(rgb))
    raw = torch.from_numpy(rgb).permute(2, 0, 1)
    torch.testing.assert_close(model.preprocess(raw), from_pil, rtol=0, atol=0)
    torch.testing.assert_close(model.preprocess(torch.stack([raw, raw])), torch.cat([from_pil, from_pil]))
    with pytest.raises(ValueError, match="model.preprocess"):
        model.encode_image(raw[None])

    rgba = np.random.default_rng(1).integers(0, 256, (s, s, 4), dtype=np.uint8)
    rgba[:, : s // 2, 3] = 0  # left half transparent
    from_pil = model.preprocess(Image.fromarray(rgba, "RGBA"))
    pixel = 1 / 255 / min(model.transform.std)  # one grey level, normalised
    torch.testing.assert_close(model.preprocess(rgba), from_pil, rtol=0, atol=0)  # uint8: PIL's own compositing
    torch.testing.assert_close(model.preprocess(rgba.astype(np.float32) / 255), from_pil, rtol=0, atol=pixel * 1.01)
    la = np.stack([rgb[..., 0], rgba[..., 3]], axis=-1)
    torch.testing.assert_close(model.preprocess(la), model.preprocess(Image.fromarray(la, "LA")), rtol=0, atol=0)

    tiny = Image.fromarray(rgb[:6, :6])
    tiny.save(tmp_path / "tiny.png")
    torch.testing.assert_close(model.preprocess(str(tmp_path / "tiny.png")), model.preprocess(tiny), rtol=0, atol=0)
    with pytest.raises(ValueError, match="empty image"):
        model.preprocess(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match=r"images\[1\]: an empty uint8 pixel tensor \(0, 3, 8, 8\)"):
        model.preprocess([raw, torch.zeros(0, 3, 8, 8, dtype=torch.uint8)])


def test_preprocess_normalises_as_the_encoder_states_and_as_an_export_records(tmp_path):
    """A backbone with its own normalisation (timm ViT: mean/std 0.5) is fed pixels normalised its way, before and
    after export + load (preprocess used ImageNet's statistics while the export recorded the encoder's)."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    model = mmxattn.create_model(
        "mmx_tiny",
        vision_backend="timm:vit_tiny_patch16_224.augreg_in21k",
        vision_pretrained=None,
        image_stages=(-1,),
        vision={"img_size": 64},
    ).eval()
    assert tuple(model.visual.mean) != (0.485, 0.456, 0.406)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    live = model.preprocess(img)
    mean = torch.tensor(model.visual.mean).view(3, 1, 1)
    std = torch.tensor(model.visual.std).view(3, 1, 1)
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(live[0], (pixels - mean) / std, rtol=0, atol=1e-5)
    model.transform = None
    mmxattn.export(model, tmp_path / "exp")
    torch.testing.assert_close(mmxattn.load(tmp_path / "exp").preprocess(img), live, rtol=0, atol=0)


def test_similarity_and_retrieve_score_in_eval_mode_and_keep_the_callers_mode():
    """A model left in train mode (dropout, drop-path) gives the same scores as in eval mode, call after call, and
    stays in train mode; bad batch sizes and empty word or text lists are named."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", vision={"drop_path_rate": 0.5})
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    images, ids = _batch(model, B=3)
    model.eval()
    ref_sim, ref = model.similarity(images, ids), model.retrieve(images, ids, k=2, rerank=2, rerank_with="lm")
    model.train()
    for _ in range(2):
        torch.testing.assert_close(model.similarity(images, ids), ref_sim, rtol=0, atol=1e-6)
        got = model.retrieve(images, ids, k=2, rerank=2, rerank_with="lm")
        torch.testing.assert_close(got.i2t_scores, ref.i2t_scores, rtol=0, atol=1e-5)
        assert torch.equal(got.t2i_indices, ref.t2i_indices)
    assert model.training and all(m.training for m in model.modules())
    for bad in ({"batch_size": 0}, {"prior_images": 0, "rerank": 2, "rerank_with": "pmi"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.retrieve(images, ids, **bad)
    with pytest.raises(ValueError, match="empty list"):
        model.encode_text([])
    with pytest.raises(ValueError, match="at least one word"):
        mmxattn.create_model("mmx_tiny", word_head=True).word_maps(images, torch.empty(0, dtype=torch.long))
    with pytest.warns(UserWarning, match="gallery_norm"):
        model.retrieve(images[:1], ids, k=1, gallery_norm=True)


def test_weight_caches_are_cleared_after_edits_through_data():
    """Edits through ``param.data`` bypass the version counter the no-grad caches check;
    ``mmxattn.clear_weight_caches(model)`` makes the next call use the new weights."""
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny").eval()
    other = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model)
    with torch.no_grad():
        model.encode_image(images), model.encode_text(ids)  # caches filled
        for p, q in zip(model.parameters(), other.parameters()):
            p.data.copy_(q.data)
        mmxattn.clear_weight_caches(model)
        torch.testing.assert_close(model.encode_image(images), other.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(ids), other.encode_text(ids), rtol=0, atol=1e-6)


def test_non_finite_pixels_are_an_error_in_inference_and_named_by_their_place():
    """A NaN image used to rank first for every text in retrieve (and with gallery_norm turn every image's scores
    to NaN); encode_image, similarity and captions returned NaN or empty output without a word."""
    import numpy as np

    model = mmxattn.create_model("mmx_tiny").eval()
    images, ids = _batch(model, B=5)
    images[3, 0, 1, 2] = float("nan")
    images[4, 2] = float("inf")
    for call in (
        lambda: model.encode_image(images),
        lambda: model.similarity(images, ids),
        lambda: model.generate(images, max_new_tokens=2),
    ):
        with pytest.raises(ValueError, match="NaN or infinite pixel values in images 3, 4;"):
            call()
    with pytest.raises(ValueError, match="NaN or infinite pixel values in image 3;"):  # its number in the gallery
        model.retrieve(images, ids, batch_size=2)  # (streamed: the batch of images 2 and 3 stops it)
    with pytest.raises(ValueError, match=r"images\[1\]: NaN or infinite pixel values in images 2, 3 of it"):
        model.preprocess([images[0], images[1:]])
    bad = np.random.default_rng(0).random((20, 20, 3)).astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"images\[1\]: a float array with NaN"):
        model.preprocess([images[0].numpy().transpose(1, 2, 0).clip(0, 1), bad])
    # training passes (train mode, gradients on) leave it to the loop's non-finite loss check: no host sync there
    model.train()
    assert not torch.isfinite(model.encode_image(images)).all()
    loss_input = model(images, ids)  # the training forward never checks
    assert not torch.isfinite(loss_input.image_embeds).all()


def test_numpy_images_out_of_range_empty_and_generators_of_inputs():
    """Float arrays are pixels in [0, 1]: 0..255 floats were read as near-white pixels (cosine 0.92 to the same
    image as uint8). Empty arrays and empty id batches are named; generators of images or texts are taken."""
    import numpy as np

    model = mmxattn.create_model("mmx_tiny").eval()
    rng = np.random.default_rng(0)
    s = model.cfg.vision.img_size
    u8 = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)  # at the model's size: no resampling to tell them apart
    with pytest.raises(ValueError, match=r"images\[0\]: float arrays are pixels in \[0, 1\].*give them as uint8"):
        model.preprocess(u8.astype(np.float32))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        model.preprocess(u8.astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(model.preprocess(u8.astype(np.float32) / 255), model.preprocess(u8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"images\[0\]: an empty array \(0, 40, 3\)"):
        model.preprocess(np.zeros((0, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"texts: an empty batch of token ids \(0, 16\)"):
        model.encode_text(torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="rerank_with must be one of"):  # a typo is named even without re-ranking
        model.retrieve(torch.zeros(1, 3, 32, 32), torch.ones(1, 4, dtype=torch.long), rerank_with="lml")
    from pathlib import Path

    model = mmxattn.load(Path(__file__).resolve().parent / "fixtures" / "tiny_shapes")  # has a tokenizer
    images = _batch(model, B=5, seed=2)[0]
    texts = ["a red circle", "two blue squares", "a small green star"]
    ref = model.retrieve(images, texts, k=2, batch_size=2)
    got = model.retrieve((x for x in images), (t for t in texts), k=2, batch_size=2)
    for f in _FIELDS:
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    torch.testing.assert_close(model.preprocess(x for x in images[:2]), model.preprocess(images[:2]))
    assert model.caption(x for x in images[:2]) == model.caption(images[:2])
    with pytest.raises(ValueError, match="empty list"):
        model.retrieve((x for x in []), texts)


def _tiny_shapes():
    from pathlib import Path

    return mmxattn.load(Path(__file__).resolve().parent / "fixtures" / "tiny_shapes")


def test_texts_with_unknown_words_warn_once_naming_them_and_empty_texts_are_errors():
    """The word tokenizer reads words outside its vocabulary as <unk>, which matches nothing: similarity, retrieve,
    encode_text and the forward scored such texts without a word. Each call now warns once, naming (up to 5 of) the
    words and counting the texts, at the caller's line. An empty text (training rejects empty captions) is an error
    naming its place."""
    model = _tiny_shapes()
    images = _batch(model, B=2)[0]
    texts = ["a purple hexagon", "a red circle", "zzz qqq"]
    calls = {
        "similarity": lambda t: model.similarity(images, t),
        "retrieve": lambda t: model.retrieve(images, t, k=1, rerank=1),
        "encode_text": lambda t: model.encode_text(t),
        "forward": lambda t: model.eval()(images[:1].expand(1 if isinstance(t, str) else len(t), -1, -1, -1), t),
    }
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(texts)
        assert len(caught) == 1, (name, [str(w.message) for w in caught])
        msg = str(caught[0].message)
        assert msg.startswith("texts: 2 of 3 text(s) have words the tokenizer does not know"), (name, msg)
        assert "'hexagon', 'zzz', 'qqq'" in msg and "<unk>" in msg, (name, msg)
        assert caught[0].filename == __file__, (name, caught[0].filename)  # the caller's line, not the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.similarity(images, ["A red circle.", "two blue squares"])  # known words (normalised): no warning
    with pytest.warns(UserWarning, match=r"1 of 1 text\(s\).*'u1', 'u2', 'u3', 'u4', 'u5' and 2 more"):
        model.encode_text("u1 u2 u3 u4 u5 u6 u1 u7")
    for bad, where in (([""], 0), (["a red circle", "  \t"], 1), ("", 0)):
        for call in calls.values():
            with pytest.raises(ValueError, match=rf"texts\[{where}\]: an empty text"):
                call(bad)


def test_un_normalised_float_pixels_are_an_error_in_inference_and_named_by_their_place():
    """0..255 float pixels ran as if normalised (model.caption(torch.rand(1, 3, 64, 64) * 255) captioned them).
    Values beyond +-20 (normalised pixels lie within about [-3, 3]) are an error saying how to fix it, found by the
    same single reduction as NaN / inf (which keep their message); training passes stay unchecked."""
    model = _tiny_shapes()
    s = model.cfg.vision.img_size
    raw = torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(0))
    images = (raw - 0.5) / 0.25  # normalised: about [-2, 2]
    images[2] = raw[2] * 255
    for call in (
        lambda: model.caption(raw[:1] * 255),
        lambda: model.encode_image(images),
        lambda: model.similarity(images, ["a red circle"]),
        lambda: model.generate(images, max_new_tokens=2),
    ):
        with pytest.raises(
            ValueError, match=r"images: pixel values from .* in image \d+ look like un-normalised 0\.\.255"
        ):
            call()
    with pytest.raises(ValueError, match=r"in image 2 look like .*uint8 pixel tensors through model\.preprocess"):
        model.retrieve(images, ["a red circle"], batch_size=2)  # named by its place in the gallery
    with pytest.raises(ValueError, match=r"images\[1\]: pixel values from .* in image 1 of it"):
        model.preprocess([images[0], images[1:]])
    images[3, 0, 0, 0] = -25.0
    with pytest.raises(ValueError, match=r"in images 2, 3 look like"):
        model.encode_image(images)
    images[1, 0, 0, 0] = float("nan")  # NaN / inf keep their message, whatever else is wrong
    with pytest.raises(ValueError, match="NaN or infinite pixel values in image 1;"):
        model.encode_image(images)
    ok = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1)).clamp(-3.3, 3.3) * 6
    model.encode_image(ok)  # wide but within +-20: taken
    u8 = (raw[:1] * 255).to(torch.uint8)  # the fix the message names: uint8 pixels, through preprocess
    assert model.caption(model.preprocess(u8)) == model.caption(u8) and model.caption(u8)[0]
    model.train()  # training passes leave it to the loop (no host sync there)
    model.encode_image(images[2:3])
    ids = model.tokenizer(["a red circle"] * 4, context_length=model.cfg.text.context_length)
    model(images, ids)
