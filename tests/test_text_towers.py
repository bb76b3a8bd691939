"""The text side's towers: a caption's embedding does not depend on its padding, and cached constants built under
``torch.inference_mode`` do not stop the model from training afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmxattn

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_shapes"
CAPTIONS = [
    "a white star",
    "two shapes a large blue cross and a large white square",
    "a small red circle left of a green triangle",
]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return mmxattn.load(FIXTURE)


def _real_width(ids: torch.Tensor, pad: int) -> int:
    return int((ids != pad).sum(1).max())


@torch.no_grad()
def test_a_caption_embeds_the_same_at_every_pad_width_alone_or_batched(trained):
    """CLS carries the position code of index context_length whatever the ids' width, so trailing pad columns
    (dynamic padding to a batch's longest caption, ids cut from generate) change nothing."""
    m, pad, ctx = trained, trained.cfg.text.pad_id, trained.cfg.text.context_length
    full = m.tokenizer(CAPTIONS, context_length=ctx)  # (3, ctx)
    ref = m.encode_text(full)  # full width: what training sees
    for i in range(len(CAPTIONS)):
        n = _real_width(full[i : i + 1], pad)
        for width in sorted({n, n + 1, n + 3, ctx - 1, ctx}):
            if width > ctx:
                continue
            alone = m.encode_text(full[i : i + 1, :width])
            torch.testing.assert_close(alone[0], ref[i], rtol=0, atol=1e-6, msg=f"caption {i} at width {width}")
    # the shortest caption batched with longer ones, padded only to the batch's longest
    batch = full[:, : _real_width(full, pad)]
    torch.testing.assert_close(m.encode_text(batch), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.encode_text(batch[:1]), ref[:1], rtol=0, atol=1e-6)
    # strings go through the tokenizer at context_length: the same embedding again
    torch.testing.assert_close(m.encode_text(CAPTIONS), ref, rtol=0, atol=1e-6)


@torch.no_grad()
def test_generated_ids_score_the_same_as_the_same_ids_padded_to_context_length(trained):
    m, pad, ctx = trained, trained.cfg.text.pad_id, trained.cfg.text.context_length
    img = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    g = m.generate(img, max_new_tokens=6)
    assert g.shape[1] < ctx
    padded = F.pad(g, (0, ctx - g.shape[1]), value=pad)
    torch.testing.assert_close(m.similarity(img, g), m.similarity(img, padded), rtol=0, atol=1e-6)


@torch.no_grad()
def test_full_width_text_embedding_is_what_the_model_was_trained_with(trained):
    """At T = context_length (every training batch) the CLS position is T, as before the fix: trained
    checkpoints give exactly the same embeddings."""
    enc = trained.text
    ids = trained.tokenizer(CAPTIONS, context_length=enc.cfg.context_length)
    B, T = ids.shape
    x = enc.token_embedding(ids) + enc.positional_embedding[:T]
    x = torch.cat([x, (enc.cls_token + enc.positional_embedding[T]).expand(B, 1, -1)], dim=1)
    pad = torch.cat([ids == enc.cfg.pad_id, ids.new_zeros(B, 1, dtype=torch.bool)], dim=1)
    for blk in enc.blocks:
        x = blk(x, key_padding_mask=pad)
    want = enc.text_projection(enc.ln_final(x)[:, -1])
    got, states = enc(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert states.shape == (B, T, enc.cfg.width)


def test_the_model_trains_after_a_call_under_inference_mode():
    """The image-token projector caches its 2-D position code; one built under inference_mode must not be an
    inference tensor, which autograd refuses to save for a later training step."""
    torch.manual_seed(0)
    m = mmxattn.create_model("mmx_tiny")
    x = torch.randn(2, 3, 64, 64)
    ids = torch.randint(4, m.cfg.text.vocab_size, (2, 8))
    ids[:, 0] = m.cfg.text.bos_id
    with torch.inference_mode():
        m.eval()
        m.encode_image(x)
    assert m.image_proj._pos_cache and not any(p.is_inference() for p in m.image_proj._pos_cache.values())
    m.train()
    out = m(x, ids)
    (out.logits.sum() + out.image_embeds.sum()).backward()
    assert m.image_proj.pos_scale.grad is not None and torch.isfinite(m.image_proj.pos_scale.grad).all()
    # and inference mode still works with the cached code (built in another mode)
    with torch.inference_mode():
        m.eval()
        assert torch.isfinite(m.encode_image(x)).all()
