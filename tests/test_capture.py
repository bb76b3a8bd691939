"""capture_attention: records post-softmax weights by layer name, only inside the block, and never silently empty."""

import pytest
import torch
from torch import nn

from mmxattn.attention import Attention
from mmxattn.capture import attention_layer_names, capture_attention


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention(16, 2)
        self.cross_attn = Attention(16, 4, kv_dim=8)

    def forward(self, x, ctx):
        return self.cross_attn(self.self_attn(x, is_causal=True), ctx)


def test_records_named_post_softmax_weights():
    m = Toy().eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    expected = m(x, ctx)
    with capture_attention(m) as maps:
        out = m(x, ctx)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # eager path inside gives the same output
    assert set(maps) == {"self_attn", "cross_attn"}
    assert maps["self_attn"].shape == (2, 2, 5, 5)
    assert maps["cross_attn"].shape == (2, 4, 5, 7)
    for w in maps.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    # causal: no weight above the diagonal
    assert maps["self_attn"].triu(1).abs().max() == 0
    # the weights are the real ones: recompute the cross-attention output from them
    with torch.no_grad():
        h = m.self_attn(x, is_causal=True)
        v = m.cross_attn.kv(ctx)[..., 16:].view(2, 7, 4, 4).transpose(1, 2)
        rebuilt = m.cross_attn.proj((maps["cross_attn"] @ v).transpose(1, 2).reshape(2, 5, 16))
    assert h.shape == (2, 5, 16)
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-5)


def test_selection_by_name_and_nothing_kept_outside():
    m = Toy().eval()
    with capture_attention(m, which="cross") as maps:
        m(torch.randn(1, 3, 16), torch.randn(1, 4, 8))
    assert list(maps) == ["cross_attn"]
    assert all(mod._recorder is None for mod in m.modules() if isinstance(mod, Attention))
    n = len(maps["cross_attn"])
    m(torch.randn(1, 3, 16), torch.randn(1, 4, 8))  # outside the block: nothing recorded
    assert len(maps.calls["cross_attn"]) == 1 and len(maps["cross_attn"]) == n


def test_repeated_calls_are_kept_and_stackable():
    m = Toy().eval()
    with capture_attention(m, which=["cross_attn"]) as maps:
        for _ in range(3):
            m(torch.randn(1, 1, 16), torch.randn(1, 4, 8))
    assert len(maps.calls["cross_attn"]) == 3
    assert maps.stacked("cross_attn").shape == (1, 4, 3, 4)


def test_errors_are_clear():
    m = Toy()
    with pytest.raises(ValueError, match="selects no attention layer.*self_attn"):
        with capture_attention(m, which="nope"):
            pass
    with pytest.raises(RuntimeError, match="none of the 2 selected"):
        with capture_attention(m):
            pass  # the model never ran
    assert all(mod._recorder is None for mod in m.modules() if isinstance(mod, Attention))
    assert attention_layer_names(m) == ["self_attn", "cross_attn"]


def test_keep_grad_records_the_weights_with_their_graph():
    """keep_grad=True: a loss on the recorded weights trains the attention's projections (the attention entropy
    penalty of mmxattn.losses rests on this); by default the weights are detached."""
    m = Toy().train()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    with capture_attention(m, which="cross_attn") as plain:
        m(x, ctx)
    assert plain["cross_attn"].grad_fn is None
    with capture_attention(m, which="cross_attn", keep_grad=True) as maps:
        m(x, ctx)
    w = maps["cross_attn"]
    assert w.grad_fn is not None
    # d(sum of squared weights)/d(query projection) exists and is not zero; the value projection takes no part
    (w**2).sum().backward()
    assert m.cross_attn.q.weight.grad.abs().sum() > 0
    kv = m.cross_attn.kv.weight.grad
    assert kv[:16].abs().sum() > 0 and kv[16:].abs().sum() == 0  # keys yes, values no
    with pytest.raises(ValueError, match="keep_grad"):
        with capture_attention(m, keep_grad=True, to_cpu=True):
            pass


def test_an_overlapping_nested_capture_fails_without_touching_the_outer_one():
    m = Toy()
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 4, 8)
    with capture_attention(m) as outer:
        with pytest.raises(RuntimeError, match="nested capture"):
            with capture_attention(m, which="cross_attn"):
                pass
        m(x, ctx)  # the outer capture still records both layers
    assert set(outer) == {"self_attn", "cross_attn"}
    assert all(mod._recorder is None for mod in m.modules() if isinstance(mod, Attention))
    with capture_attention(m, which="self_attn") as again:  # nothing left behind: a later capture works
        m(x, ctx)
    assert set(again) == {"self_attn"}
