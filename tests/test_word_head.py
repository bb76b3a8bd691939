"""The word-presence head and its multiple-instance loss: against a loop reference, the gradient's selection, the
column sampling of large vocabularies, the training module's ``word_weight`` and ``MMXAttn.word_maps``."""

import math

import pytest
import torch
import torch.nn.functional as F
from lit_helpers import data_linked

import mmxattn
from mmxattn.data.datamodule import ShapesDataModule
from mmxattn.lit.module import MMXAttnModule
from mmxattn.losses import WordPresenceLoss


def _captions(n_images: int, per_image: int, vocab: int, length: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n_images * per_image, length), generator=g)
    ids[:, 0] = 1  # bos
    ids[:, -2] = 2  # eos
    ids[:, -1] = 0  # pad
    tii = torch.arange(n_images).repeat_interleave(per_image)
    return ids, tii


def test_word_presence_loss_equals_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    b, n_tok, d, v = 3, 5, 8, 20
    tokens = torch.randn(b, n_tok, d, generator=g)
    head = torch.nn.Linear(d, v).requires_grad_(False)
    ids, tii = _captions(b, 2, v)
    got = WordPresenceLoss(ignore_ids=(0, 1, 2, 3))(tokens, head, ids, tii)
    terms = []
    for i in range(b):
        words = set(ids[tii == i].flatten().tolist())
        for w in range(4, v):
            score = max(float(tokens[i, t] @ head.weight[w] + head.bias[w]) for t in range(n_tok))
            target = 1.0 if w in words else 0.0
            terms.append(F.binary_cross_entropy_with_logits(torch.tensor(score), torch.tensor(target)))
    torch.testing.assert_close(got, torch.stack(terms).mean())
    # one caption row per image needs no index; rows and images must then agree
    torch.testing.assert_close(
        WordPresenceLoss((0, 1, 2, 3))(tokens, head, ids[::2]),
        WordPresenceLoss((0, 1, 2, 3))(tokens, head, ids[::2], torch.arange(b)),
    )
    with pytest.raises(ValueError, match="caption rows for 3 images"):
        WordPresenceLoss()(tokens, head, ids)
    with pytest.raises(ValueError, match="image_tokens"):
        WordPresenceLoss()(tokens[0], head, ids, tii)


def test_word_presence_gradient_reaches_each_words_best_token_only():
    """The readout selects: a token that is no word's best gets no gradient, and the loss pulls the best token of
    a present word up and of an absent word down."""
    g = torch.Generator().manual_seed(2)
    b, n_tok, d, v = 2, 16, 4, 6
    tokens = torch.randn(b, n_tok, d, generator=g, requires_grad=True)
    head = torch.nn.Linear(d, v)
    ids, tii = _captions(b, 1, v, length=4, seed=3)
    WordPresenceLoss(ignore_ids=(0, 1, 2, 3))(tokens, head, ids, tii).backward()
    best = head(tokens).argmax(1)[:, 4:]  # (B, words scored)
    for i in range(b):
        chosen = set(best[i].tolist())
        for t in range(n_tok):
            has_grad = bool(tokens.grad[i, t].abs().sum() > 0)
            assert has_grad == (t in chosen), (i, t, chosen)


def test_large_vocabularies_score_every_present_word_and_random_negatives():
    loss = WordPresenceLoss(ignore_ids=(0, 1, 2), max_words=12)
    ids, tii = _captions(4, 2, 40, length=5)
    present = loss.present(ids, 4, 40, tii)
    cols = loss.columns(present)
    assert cols.numel() == 12 and not set(cols.tolist()) & {0, 1, 2}
    assert set(present.any(0).nonzero().flatten().tolist()) - {0, 1, 2} <= set(cols.tolist())
    # more present words than max_words: all of them still count (positives are never dropped)
    few = WordPresenceLoss(ignore_ids=(0, 1, 2), max_words=3)
    assert set(few.columns(present).tolist()) == set(present.any(0).nonzero().flatten().tolist()) - {0, 1, 2}
    # small vocabularies: every column but the ignored ones
    assert WordPresenceLoss((0,), max_words=None).columns(present).tolist() == list(range(1, 40))
    with pytest.raises(ValueError, match="max_words"):
        WordPresenceLoss(max_words=0)


@pytest.fixture(scope="module")
def shapes_batch(tmp_path_factory):
    dm = ShapesDataModule(
        train_size=16, val_size=8, test_size=8, batch_size=16, num_workers=0, train_captions_per_image=2,
        cache_dir=str(tmp_path_factory.mktemp("shapes")),
    )  # fmt: skip
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def test_module_word_weight_adds_the_term_and_training_lowers_it(shapes_batch):
    dm, batch = shapes_batch
    kw = dict(preset="mmx_tiny", img_size=64, itm_weight=0.0, **data_linked(dm))
    with pytest.raises(ValueError, match="word_weight"):
        MMXAttnModule(word_weight=-1.0, **kw)
    plain = MMXAttnModule(**kw)
    assert plain.model.word_head is None and "word" not in plain.compute_losses(batch)[1]
    torch.manual_seed(0)
    mod = MMXAttnModule(word_weight=2.0, **kw)
    assert mod.model.cfg.word_head and isinstance(mod.model.word_head, torch.nn.Linear)
    opt = torch.optim.AdamW(mod.parameters(), lr=3e-3)
    words = []
    for step in range(15):
        loss, terms, _ = mod.compute_losses(batch)
        if step == 0:
            h = mod.hparams
            rest = h.contrastive_weight * terms["contrastive"] + h.caption_weight * terms["caption"]
            torch.testing.assert_close(loss, rest + 2.0 * terms["word"])
        words.append(terms["word"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert words[-1] < 0.7 * words[0], words
    # "<unk>" is never a target, also without a Trainer (no setup()): its id comes from the model's tokenizer
    mod.model.tokenizer = dm.tokenizer
    unk = dm.tokenizer.unk_id
    ids = batch["ids"].clone()
    ids[:, 2] = torch.where(ids[:, 2] == dm.pad_id, ids[:, 2], unk)  # some captions now hold "<unk>"
    with torch.no_grad():
        _, terms, _ = mod.compute_losses(dict(batch, ids=ids))
        out = mod.model(batch["images"], ids, batch.get("text_image_index"))
        ignore = (dm.pad_id, dm.bos_id, dm.eos_id, unk)
        want = WordPresenceLoss(ignore)(out.image_tokens, mod.model.word_head, ids, batch.get("text_image_index"))
        scored_unk = WordPresenceLoss(ignore[:3])(
            out.image_tokens, mod.model.word_head, ids, batch.get("text_image_index")
        )
    torch.testing.assert_close(terms["word"], want)
    assert not torch.allclose(want, scored_unk)
    # a model built with the head but trained without the term keeps it frozen (nothing would train it)
    frozen = MMXAttnModule(overrides={"word_head": True}, **kw)
    assert not any(p.requires_grad for p in frozen.model.word_head.parameters())


def test_word_maps_and_export_round_trip(shapes_batch, tmp_path):
    dm, batch = shapes_batch
    torch.manual_seed(0)
    model = mmxattn.create_model(
        "mmx_tiny", word_head=True, img_size=64,
        text=dict(vocab_size=dm.vocab_size, pad_id=dm.pad_id, bos_id=dm.bos_id, eos_id=dm.eos_id),
    ).eval()  # fmt: skip
    model.tokenizer = dm.tokenizer
    images = batch["images"][:3]
    with torch.no_grad():
        maps, present = model.word_maps(images, ["circle", "red"])
        grids = model.visual.grid_sizes(64, 64)
        h, w = grids[model.stages[-1]]
        assert maps.shape == (3, 2, h, w) and present.shape == (3, 2)
        assert ((maps >= 0) & (maps <= 1)).all()
        torch.testing.assert_close(present, maps.flatten(2).amax(-1))
        # the maps are the word head's sigmoid at every token, other stages max-pooled onto the last one's grid
        ids = torch.tensor([dm.tokenizer(["circle"])[0][1].item(), dm.tokenizer(["red"])[0][1].item()])
        logits = model.word_logits(model.encode_image_tokens(images))[..., ids]
        torch.testing.assert_close(present, logits.amax(1).sigmoid())
        torch.testing.assert_close(model.word_maps(images, ids)[0], maps)
    with pytest.raises(ValueError, match="not one token"):
        model.word_maps(images, ["red circle"])
    with pytest.raises(ValueError, match="not one token"):
        model.word_maps(images, ["zebra"])
    out = mmxattn.export(model, tmp_path / "m")
    again = mmxattn.load(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.word_maps(images, ["circle", "red"])[0], maps)
    no_head = mmxattn.create_model("mmx_tiny", text=dict(vocab_size=dm.vocab_size))
    with pytest.raises(RuntimeError, match="word_head"):
        no_head.word_logits(torch.zeros(1, 4, no_head.cfg.text.width))


def test_word_head_stage_reads_the_stages_own_tokens(shapes_batch, tmp_path):
    """``word_head_stage``: the head reads one read stage's encoder tokens (its channel width, its grid), before
    the projection; the training loss, the maps and a saved model all use those tokens."""
    dm, batch = shapes_batch
    text = data_linked(dm)
    with pytest.raises(ValueError, match="needs word_head"):
        mmxattn.create_model("mmx_tiny", word_head_stage=0, image_stages=(0, -1), text=text)
    with pytest.raises(ValueError, match="no deeper than the deepest of image_stages"):
        mmxattn.create_model("mmx_tiny", word_head=True, word_head_stage=1, image_stages=(0,), text=text)
    torch.manual_seed(0)
    # the decoder reads stages 1 and 2 (mmx_tiny's), the word head stage 0: a stage only the word head reads
    model = mmxattn.create_model("mmx_tiny", word_head=True, word_head_stage=0, img_size=64, text=text).eval()
    assert model.stages == (1, 2)
    model.tokenizer = dm.tokenizer
    c0 = model.visual.stage_dims[0]
    assert c0 != model.cfg.text.width and model.word_head.in_features == c0
    torch.testing.assert_close(model.word_head.bias, torch.full_like(model.word_head.bias, -2.944439))
    images = batch["images"][:3]
    with torch.no_grad():
        raw = model.visual.forward_features(images, stages=(0,))[0]  # the encoder's own stage-0 tokens
        torch.testing.assert_close(model.encode_word_tokens(images), raw)
        out = model(images, batch["ids"][:3])
        torch.testing.assert_close(out.word_tokens, raw)
        torch.testing.assert_close(out.image_tokens, model.encode_image_tokens(images))  # stages 1 and 2
        maps, present = model.word_maps(images, ["circle", "red"])
        h, w = model.visual.grid_sizes(64, 64)[0]
        assert maps.shape == (3, 2, h, w) and h * w == raw.shape[1]
        ids = torch.tensor([dm.tokenizer(["circle"])[0][1].item(), dm.tokenizer(["red"])[0][1].item()])
        want = model.word_head(raw)[..., ids]  # (B, L0, K), token-major: row-major over the stage-0 grid
        torch.testing.assert_close(maps, want.sigmoid().transpose(1, 2).reshape(3, 2, h, w))
        torch.testing.assert_close(present, want.amax(1).sigmoid())
    again = mmxattn.load(mmxattn.export(model, tmp_path / "m")).eval()
    assert again.cfg.word_head_stage == 0
    with torch.no_grad():
        torch.testing.assert_close(again.word_maps(images, ["circle", "red"])[0], maps)

    # the module (here the decoder reads stage 0 too): its word term is the loss on those tokens; word-only
    # steps leave the projection alone
    kw = dict(preset="mmx_tiny", img_size=64, itm_weight=0.0, overrides={"image_stages": (0, -1)}, **data_linked(dm))
    with pytest.raises(ValueError, match="needs word_weight"):
        MMXAttnModule(word_head_stage=0, **kw)
    torch.manual_seed(0)
    mod = MMXAttnModule(word_weight=1.0, word_head_stage=0, word_only_steps=5, **kw)
    mod.model.tokenizer = dm.tokenizer
    ids, tii = batch["ids"], batch.get("text_image_index")
    ignore = (dm.pad_id, dm.bos_id, dm.eos_id, dm.tokenizer.unk_id)
    with torch.no_grad():
        tokens = mod.model.encode_word_tokens(batch["images"])
        want = WordPresenceLoss(ignore)(tokens, mod.model.word_head, ids, tii)
        torch.testing.assert_close(mod.eval().compute_losses(batch)[1]["word"], want)
        torch.testing.assert_close(mod.train().compute_losses(batch)[1]["word"], want)  # the word-only phase
    before = {n: p.detach().clone() for n, p in mod.model.named_parameters()}
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    loss, terms, _ = mod.train().compute_losses(batch)
    assert set(terms) == {"word"}
    loss.backward()
    opt.step()
    changed = {n for n, p in mod.model.named_parameters() if not torch.equal(p, before[n])}
    assert "word_head.weight" in changed and any(n.startswith("visual.") for n in changed)
    assert not any(n.startswith(("image_proj.", "text.", "decoder.", "pooler.")) for n in changed), changed


def test_word_context_adds_what_the_word_head_sees_to_every_image_token(shapes_batch, tmp_path):
    """``word_context``: every image token the decoder and pooler read gets Linear(V, W) of the word head's
    probabilities there (stage-0 maps max-pooled onto the read stages' grids), detached from the head; a no-op at
    initialisation; carried by a saved model."""
    dm, batch = shapes_batch
    text = data_linked(dm)
    with pytest.raises(ValueError, match="word_context=True needs word_head"):
        mmxattn.create_model("mmx_tiny", word_context=True, text=text)
    kw = dict(preset="mmx_tiny", img_size=64, itm_weight=0.0, **data_linked(dm))
    with pytest.raises(ValueError, match="word_context=True needs word_weight"):
        MMXAttnModule(word_context=True, **kw)
    torch.manual_seed(0)
    model = mmxattn.create_model(
        "mmx_tiny", word_head=True, word_head_stage=0, word_context=True, img_size=64, text=text
    ).eval()
    plain = mmxattn.create_model("mmx_tiny", word_head=True, word_head_stage=0, img_size=64, text=text).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("word_context.")})
    images, ids = batch["images"][:3], batch["ids"][:3]
    with torch.no_grad():
        # zero-initialised: the same tokens as without the context
        torch.testing.assert_close(model.encode_image_tokens(images), plain.encode_image_tokens(images))
        torch.nn.init.normal_(model.word_context.weight, std=0.5)
        # reference: stage-0 probabilities (16x16 grid) max-pooled in 2x2 / 4x4 blocks onto stages 1 and 2
        probs = model.word_head(model.visual.forward_features(images, stages=(0,))[0]).sigmoid()  # (B, 256, V)
        v = probs.shape[-1]
        grid = probs.reshape(3, 16, 16, v)
        pooled = [grid.reshape(3, 16 // k, k, 16 // k, k, v).amax((2, 4)).reshape(3, -1, v) for k in (2, 4)]
        want = plain.encode_image_tokens(images) + torch.cat(pooled, 1) @ model.word_context.weight.T
        got = model.encode_image_tokens(images)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, plain.encode_image_tokens(images))
        out = model(images, ids)
        torch.testing.assert_close(out.image_tokens, got)  # training and inference read the same tokens
        torch.testing.assert_close(out.image_embeds, model.encode_image(images))
    # the caption and retrieval losses train the context's Linear, never the word head through it
    model.train()
    out = model(images, ids)
    (out.logits.square().mean() + out.image_embeds.sum()).backward()
    assert model.word_context.weight.grad.abs().sum() > 0
    assert model.word_head.weight.grad is None
    # a saved model keeps the context
    model.eval()
    again = mmxattn.load(mmxattn.export(model, tmp_path / "m")).eval()
    assert again.cfg.word_context
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image_tokens(images), model.encode_image_tokens(images))
    # without word_head_stage the head reads the projected tokens, and each token gets its own probabilities
    flat = mmxattn.create_model("mmx_tiny", word_head=True, word_context=True, img_size=64, text=text).eval()
    with torch.no_grad():
        torch.nn.init.normal_(flat.word_context.weight, std=0.5)
        raw = flat._project(flat._stage_features(images, flat.stages), images)
        torch.testing.assert_close(
            flat.encode_image_tokens(images), raw + flat.word_head(raw).sigmoid() @ flat.word_context.weight.T
        )
        torch.testing.assert_close(flat.encode_word_tokens(images), raw)
    # a word stage coarser than a read stage: its maps are repeated onto the finer grid (stage 2's 4x4 onto 8x8)
    deep = mmxattn.create_model(
        "mmx_tiny", word_head=True, word_head_stage=2, word_context=True, img_size=64, text=text
    ).eval()
    with torch.no_grad():
        torch.nn.init.normal_(deep.word_context.weight, std=0.5)
        feats = deep._stage_features(images, deep.stages)
        p2 = deep.word_head(feats[1]).sigmoid()  # (B, 16, V) on stage 2's 4x4 grid
        v = p2.shape[-1]
        p1 = p2.reshape(3, 4, 4, v).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(3, 64, v)
        want = deep._project(feats, images) + torch.cat([p1, p2], 1) @ deep.word_context.weight.T
        torch.testing.assert_close(deep.encode_image_tokens(images), want)


def test_word_context_logprob_input_lets_attention_logits_sum_log_probabilities(shapes_batch, tmp_path):
    """``word_context_input="logprob"``: the context's Linear reads max(log p, -8) / 8 + 1 instead of p (so an
    attention logit linear in it is a weighted sum of log-probabilities: a product of maps); the probabilities the
    model returns (the word-attention teacher's) are unchanged; the choice is saved with the model."""
    dm, batch = shapes_batch
    text = data_linked(dm)
    with pytest.raises(ValueError, match="word_context_input"):
        mmxattn.create_model("mmx_tiny", word_head=True, word_context=True, word_context_input="log", text=text)
    kw = dict(word_head=True, word_head_stage=0, word_context=True, img_size=64, text=text)
    torch.manual_seed(0)
    prob = mmxattn.create_model("mmx_tiny", **kw).eval()
    logp = mmxattn.create_model("mmx_tiny", word_context_input="logprob", **kw).eval()
    logp.load_state_dict(prob.state_dict())
    p = torch.tensor([1.0, math.exp(-2.0), math.exp(-4.0), math.exp(-8.0), 1e-9, 0.0])
    torch.testing.assert_close(logp._context_input(p), torch.tensor([1.0, 0.75, 0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(prob._context_input(p), p)
    images, ids = batch["images"][:3], batch["ids"][:3]
    with torch.no_grad():
        torch.nn.init.normal_(prob.word_context.weight, std=0.5)
        logp.word_context.weight.copy_(prob.word_context.weight)
        base = prob._project(prob._stage_features(images, prob.stages), images)
        probs = prob.word_probs_per_image_token(prob.encode_word_tokens(images), images)
        feat = probs.log().clamp_min(-8.0) / 8.0 + 1.0
        torch.testing.assert_close(logp.encode_image_tokens(images), base + feat @ logp.word_context.weight.T)
        assert not torch.allclose(logp.encode_image_tokens(images), prob.encode_image_tokens(images))
        torch.testing.assert_close(logp(images, ids).word_probs, prob(images, ids).word_probs)
    again = mmxattn.load(mmxattn.export(logp, tmp_path / "m")).eval()
    assert again.cfg.word_context_input == "logprob"
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image_tokens(images), logp.encode_image_tokens(images))
