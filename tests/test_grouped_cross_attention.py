"""Cross-attention where each context row is read by r consecutive query rows (one image, r captions): the int form
of ``context_index`` attends the r rows as one query block. It must agree with the gather path and with repeating
the context, in outputs, gradients and captured attention weights."""

import pytest
import torch

import mmxattn.attention as attention_module
from mmxattn.attention import Attention, uniform_repeats
from mmxattn.capture import capture_attention
from mmxattn.text.towers import MultimodalDecoder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_uniform_repeats_finds_the_layout_and_nothing_else():
    assert uniform_repeats(torch.arange(4).repeat_interleave(3), 4) == 3
    assert uniform_repeats(torch.arange(4), 4) == 1
    for idx, n in [
        (torch.tensor([0, 0, 1, 2, 2, 2]), 3),  # unequal counts
        (torch.tensor([0, 1, 0, 1]), 2),  # interleaved, not consecutive
        (torch.tensor([1, 1, 0, 0]), 2),  # consecutive but not in context order
        (torch.arange(3).repeat_interleave(2), 4),  # rows do not divide evenly
    ]:
        out = uniform_repeats(idx, n)
        assert isinstance(out, torch.Tensor) and torch.equal(out, idx)
    assert uniform_repeats(None, 3) is None


@pytest.mark.parametrize("train", [False, True])
def test_grouped_equals_gather_and_repeated_context(train):
    N, r, L, S = 4, 3, 6, 10
    attn = Attention(32, 4, kv_dim=24).train(train)
    ctx = torch.randn(N, S, 24, requires_grad=True)
    x = torch.randn(N * r, L, 32, requires_grad=True)
    idx = torch.arange(N).repeat_interleave(r)
    outs, grads = [], []
    for how in ("repeat", "gather", "grouped"):
        for t in (ctx, x, *attn.parameters()):
            t.grad = None
        if how == "repeat":
            y = attn(x, ctx[idx])
        else:
            y = attn(x, ctx, context_index=idx if how == "gather" else r)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([ctx.grad.clone(), x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-5)
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the no-grad CPU path (eager matmuls for small problems) too
        torch.testing.assert_close(attn(x, ctx, context_index=r), attn(x, ctx, context_index=idx), atol=1e-6, rtol=1e-5)


def test_grouped_rejects_counts_that_do_not_fit():
    attn = Attention(16, 2, kv_dim=8)
    with pytest.raises(ValueError, match="context_index=2"):
        attn(torch.randn(5, 3, 16), torch.randn(3, 4, 8), context_index=2)
    with pytest.raises(ValueError, match="context_index=2"):
        attn(torch.randn(6, 3, 16), torch.randn(2, 4, 8), context_index=2)


def _decoder() -> MultimodalDecoder:
    from mmxattn.config import TextConfig

    cfg = TextConfig(vocab_size=50, width=32, heads=4, layers=1, decoder_layers=2, context_length=8)
    return MultimodalDecoder(cfg, ctx_width=24)


def test_decoder_takes_the_grouped_path_and_captures_per_caption_maps(monkeypatch):
    dec = _decoder().eval()
    N, r, T, S = 3, 2, 5, 7
    img = torch.randn(N, S, 24)
    x = torch.randn(N * r, T, 32)
    idx = torch.arange(N).repeat_interleave(r)
    seen = []
    blk_attn = dec.blocks[0].cross_attn
    blk_attn.kv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    queries = []

    def recording_sdpa(q, k, v, *a, **kw):
        queries.append((tuple(q.shape), k.shape[2]))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(attention_module, "_SMALL_CPU_EAGER", False)  # SDPA, not the small problems' eager math
    grouped = dec(x, img, image_index=idx)
    assert seen == [N]  # keys/values projected once per image
    # each cross-attention ran one block of r * T queries per image (self-attention: one row per caption)
    assert [qs for qs, s in queries if s == S] == [(N, 4, r * T, 8)] * len(dec.blocks)
    torch.testing.assert_close(grouped, dec(x, img[idx]), atol=1e-6, rtol=1e-5)
    # under capture_attention the block runs the eager math, still grouped (keys/values once per image), and
    # records one (rows, heads, T, S) map per caption, as without grouping
    seen.clear()
    with capture_attention(dec) as maps:
        dec(x, img, image_index=idx)
    assert seen == [N]
    with capture_attention(dec) as ref:
        dec(x, img[idx])
    cross = [k for k in maps if "cross_attn" in k]
    assert cross
    for k in cross:
        assert maps[k].shape == (N * r, 4, T, S)
        torch.testing.assert_close(maps[k], ref[k], atol=1e-6, rtol=1e-5)


def test_grouped_maps_recorded_with_their_graph_give_the_ungrouped_gradients():
    """A loss on the recorded maps (keep_grad, as the attention losses use them) and on the output: the same
    gradients through the grouped block as through repeated contexts."""
    dec = _decoder().train()
    N, r, T, S = 3, 3, 4, 6
    img = torch.randn(N, S, 24, requires_grad=True)
    x = torch.randn(N * r, T, 32, requires_grad=True)
    idx = torch.arange(N).repeat_interleave(r)
    target = torch.randn(N * r, 4, T, S).softmax(-1)
    grads = []
    for grouped in (True, False):
        for t in (img, x, *dec.parameters()):
            t.grad = None
        with capture_attention(dec, which="blocks.*.cross_attn", keep_grad=True) as maps:
            y = dec(x, img, image_index=idx) if grouped else dec(x, img[idx])
        loss = y.square().mean() + sum((w - target).square().sum() for w in maps.values())
        loss.backward()
        grads.append([img.grad.clone(), x.grad.clone()] + [p.grad.clone() for p in dec.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
