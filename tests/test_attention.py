"""The attention primitive: fused == eager, and both == torch.nn.MultiheadAttention given the same weights."""

import contextlib

import pytest
import torch
from torch import nn

from mmxattn.attention import (
    Attention,
    KVCache,
    StaticKVCache,
    eager_attention,
    fused_attention_enabled,
    set_fused_attention,
    set_small_cpu_eager,
)


@contextlib.contextmanager
def sdpa_only():
    """Every fused call goes to SDPA, also the small CPU problems that would otherwise take the eager math."""
    old = set_small_cpu_eager(False)
    try:
        yield
    finally:
        set_small_cpu_eager(old)


def _run(attn: Attention, *args, eager: bool, **kw) -> torch.Tensor:
    if eager:
        with eager_attention():
            return attn(*args, **kw)
    with sdpa_only():
        return attn(*args, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("case", ["plain", "causal", "padding", "bias", "all"])
def test_fused_equals_eager(cross, case):
    B, L, S, D, H = 3, 7, 9 if cross else 7, 32, 4
    attn = Attention(D, H, kv_dim=24 if cross else None).eval()
    x = torch.randn(B, L, D)
    ctx = torch.randn(B, S, 24) if cross else None
    kw = {}
    if case in ("causal", "all") and not cross:
        kw["is_causal"] = True
    if case in ("padding", "all"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, -4:] = True
        kw["key_padding_mask"] = kpm
    if case in ("bias", "all"):
        kw["attn_bias"] = torch.randn(H, L, S)
    args = (x,) if ctx is None else (x, ctx)
    out_fused = _run(attn, *args, eager=False, **kw)
    out_eager = _run(attn, *args, eager=True, **kw)
    torch.testing.assert_close(out_fused, out_eager, atol=1e-5, rtol=1e-5)
    # the mask really changes the result (the test would pass trivially otherwise)
    if kw:
        assert not torch.allclose(out_fused, _run(attn, *args, eager=False))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("case", ["plain", "causal", "padding", "bias", "all", "fully_masked"])
def test_small_cpu_no_grad_path_equals_sdpa_and_skips_it(cross, case, monkeypatch):
    """No-grad CPU attention over few scores takes the eager path instead of SDPA (faster there); it must give
    SDPA's result for every mask kind, and larger, one-query or autograd calls keep SDPA."""
    import mmxattn.attention as attention_module

    B, L, S, D, H = 3, 7, 9 if cross else 7, 32, 4
    attn = Attention(D, H, kv_dim=24 if cross else None).eval()
    x = torch.randn(B, L, D)
    args = (x, torch.randn(B, S, 24)) if cross else (x,)
    kw = {}
    if case in ("causal", "all") and not cross:
        kw["is_causal"] = True
    if case in ("padding", "all", "fully_masked"):
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, : (S if case == "fully_masked" else 4)] = True
        kw["key_padding_mask"] = kpm
    if case in ("bias", "all"):
        kw["attn_bias"] = torch.randn(H, L, S)
    sdpa_out = _run(attn, *args, eager=False, **kw)
    eager_out = _run(attn, *args, eager=True, **kw)

    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    with torch.no_grad():
        small_out = attn(*args, **kw)
    assert calls == []  # the matmul path ran
    assert torch.isfinite(small_out).all()
    torch.testing.assert_close(small_out, sdpa_out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small_out, eager_out.detach(), atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        attn(x[:, :1], *args[1:])  # one query (a decoding step)
        monkeypatch.setattr(attention_module, "_SMALL_CPU_SCORES", B * H * L * S - 1)  # too many scores
        attn(*args, **kw)
        monkeypatch.setattr(attention_module, "_SMALL_CPU_SCORES", B * H * L * S)
        monkeypatch.setattr(attention_module, "_SMALL_CPU_KEYS", S - 1)  # too many keys
        attn(*args, **kw)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("cross", [False, True, "grouped"])
@pytest.mark.parametrize("case", ["plain", "causal", "padding", "bias", "all"])
def test_small_cpu_training_path_equals_sdpa_in_values_and_gradients(cross, case, monkeypatch):
    """With autograd on, CPU attention over few keys takes the eager math too (SDPA's CPU kernel is slower in
    forward + backward there): output and every gradient (queries, context, bias, weights) must be SDPA's, and
    many keys, many scores or the switch send it back to SDPA."""
    import mmxattn.attention as attention_module

    B, L, S, D, H = 4, 7, 9 if cross else 7, 32, 4
    attn = Attention(D, H, kv_dim=24 if cross else None).train()
    x = torch.randn(B, L, D)
    ctx = torch.randn(B // 2 if cross == "grouped" else B, S, 24) if cross else None
    kw = {}
    if cross == "grouped":
        kw["context_index"] = 2
    if case in ("causal", "all") and not cross:
        kw["is_causal"] = True
    if case in ("padding", "all") and cross != "grouped":  # the grouped block takes no masks
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -2:] = True
        # key 0 stays visible: a query row that sees no key has a constant output, which the eager math gives a
        # zero gradient and SDPA (its finite "minus infinity" absorbs the scores) a spurious one
        kpm[2, 1:4] = True
        kw["key_padding_mask"] = kpm
    bias = torch.randn(H, L, S) if case in ("bias", "all") and cross != "grouped" else None
    g = torch.randn(B, L, D)

    def fwd_bwd() -> tuple[torch.Tensor, list[torch.Tensor]]:
        attn.zero_grad()
        leaves = [t.clone().requires_grad_(True) for t in (x, ctx, bias) if t is not None]
        it = iter(leaves)
        xx = next(it)
        cc = next(it) if ctx is not None else None
        bb = next(it) if bias is not None else None
        args = (xx, cc) if cross else (xx,)
        out = attn(*args, attn_bias=bb, **kw)
        out.backward(g)
        return out.detach(), [t.grad for t in leaves] + [p.grad.clone() for p in attn.parameters()]

    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    with sdpa_only():
        ref_out, ref_grads = fwd_bwd()
    assert len(calls) == 1
    out, grads = fwd_bwd()
    assert len(calls) == 1  # the eager math ran
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any(float(t.abs().sum()) > 0 for t in grads)

    monkeypatch.setattr(attention_module, "_SMALL_CPU_KEYS", S - 1)  # too many keys
    fwd_bwd()
    monkeypatch.setattr(attention_module, "_SMALL_CPU_KEYS", S)
    monkeypatch.setattr(attention_module, "_SMALL_CPU_TRAIN_SCORES", B * H * L * S - 1)  # too many scores
    fwd_bwd()
    assert len(calls) == 3


def _copy_to_mha(attn: Attention, mha: nn.MultiheadAttention, cross: bool) -> None:
    with torch.no_grad():
        if cross:
            D = attn.q.weight.shape[0]
            mha.q_proj_weight.copy_(attn.q.weight)
            mha.k_proj_weight.copy_(attn.kv.weight[:D])
            mha.v_proj_weight.copy_(attn.kv.weight[D:])
            mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        else:
            mha.in_proj_weight.copy_(attn.qkv.weight)
            mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_matches_torch_multihead_attention(eager, cross):
    B, L, D, H = 2, 6, 32, 4
    S, kdim = (10, 20) if cross else (L, D)
    attn = Attention(D, H, kv_dim=kdim if cross else None).eval()
    mha = nn.MultiheadAttention(D, H, batch_first=True, kdim=kdim, vdim=kdim).eval()
    _copy_to_mha(attn, mha, cross)
    x = torch.randn(B, L, D)
    ctx = torch.randn(B, S, kdim) if cross else x
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -3:] = True
    causal = None if cross else torch.ones(L, L, dtype=torch.bool).triu(1)
    ref, ref_w = mha(x, ctx, ctx, key_padding_mask=kpm, attn_mask=causal, average_attn_weights=False)
    args = (x, ctx) if cross else (x,)
    ours = _run(attn, *args, eager=eager, key_padding_mask=kpm, is_causal=not cross)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_causal_pass():
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 8, 32)
    full = attn(x, is_causal=True)
    cache = KVCache()
    steps = [attn(x[:, :3], is_causal=True, cache=cache)]  # a prompt of 3, then one token at a time
    for t in range(3, 8):
        steps.append(attn(x[:, t : t + 1], is_causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 8
    # a chunk of several new tokens after a prefix needs the offset causal mask
    cache2 = KVCache()
    a = attn(x[:, :5], is_causal=True, cache=cache2)
    b = attn(x[:, 5:], is_causal=True, cache=cache2)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eager", [False, True])
def test_static_kv_cache_equals_growing_cache(eager):
    """Fixed buffers written at a device position (what CUDA-graph decoding replays) give the full causal pass:
    a prompt of 3, then single tokens; the unwritten tail of the buffer and stale contents never leak in."""
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 8, 32)
    full = _run(attn, x, eager=eager, is_causal=True)
    pos = torch.zeros(1, dtype=torch.long)
    cache = StaticKVCache(pos, capacity=10)
    for _ in range(2):  # the second pass reuses the buffers: stale keys before pos, garbage after it
        steps = []
        for a, b in [(0, 3), *((t, t + 1) for t in range(3, 8))]:
            steps.append(_run(attn, x[:, a:b], eager=eager, is_causal=True, cache=cache))
            pos.add_(b - a)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        assert cache.k.shape == (2, 4, 10, 8) and int(pos) == 8
        cache.k[:, :, 8:] = 1e4
        cache.v[:, :, 8:] = 1e4
        pos.zero_()
    cache.reset()
    assert not cache.k.any() and not cache.v.any()
    with pytest.raises(ValueError, match="batch 2"):
        attn(torch.randn(3, 1, 32), is_causal=True, cache=cache)
    with pytest.raises(ValueError, match="causal"):
        attn(x[:, :1], cache=StaticKVCache(pos, 10))


def test_cross_attention_cache_projects_context_once():
    attn = Attention(16, 2, kv_dim=8).eval()
    ctx = torch.randn(2, 5, 8)
    calls = []
    attn.kv.register_forward_hook(lambda *a: calls.append(1))
    cache = KVCache()
    outs = [attn(torch.randn(2, 1, 16), ctx, cache=cache) for _ in range(4)]
    assert len(calls) == 1 and len(outs) == 4
    q = torch.randn(2, 1, 16)
    torch.testing.assert_close(attn(q, cache=cache), attn(q, ctx))


@pytest.mark.parametrize("eager", [False, True])
def test_context_index_equals_repeated_context_and_projects_once(eager):
    """Several query rows sharing one context row (one image, several captions): same outputs and gradients as
    repeating the context, with the key/value projection run over the unrepeated context."""
    attn = Attention(16, 2, kv_dim=8)
    ctx = torch.randn(3, 5, 8, requires_grad=True)
    x = torch.randn(5, 4, 16, requires_grad=True)
    idx = torch.tensor([0, 0, 2, 1, 2])
    rows = []
    attn.kv.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    outs, grads = [], []
    for shared in (False, True):
        for t in (ctx, x, *attn.parameters()):
            t.grad = None
        kw = {"context_index": idx} if shared else {}
        y = _run(attn, x, ctx if shared else ctx[idx], eager=eager, **kw)
        y.square().sum().backward()
        outs.append(y)
        grads.append([ctx.grad.clone(), x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    assert rows == [5, 3]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"context_index must be \(5,\)"):
        attn(x, ctx, context_index=idx[:4])
    with pytest.raises(ValueError, match="self-attention"):
        Attention(16, 2)(x, context_index=idx)


def test_fully_masked_rows_stay_finite_and_paths_agree():
    attn = Attention(16, 2).eval()
    x = torch.randn(1, 4, 16)
    kpm = torch.ones(1, 4, dtype=torch.bool)
    outs = [_run(attn, x, eager=e, key_padding_mask=kpm) for e in (False, True)]
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_global_switch_and_errors():
    assert fused_attention_enabled()
    set_fused_attention(False)
    try:
        assert not fused_attention_enabled()
    finally:
        set_fused_attention(True)
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)
    attn = Attention(16, 2)
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        attn(torch.randn(4, 16))
    with pytest.raises(ValueError, match="self-attention"):
        attn(torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(torch.randn(1, 3, 16), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        Attention(16, 2, kv_dim=8)(torch.randn(1, 3, 16))


def test_env_var_selects_eager_path():
    import subprocess
    import sys

    code = "import mmxattn.attention as a; print(a.fused_attention_enabled())"
    env = {"MMXATTN_EAGER_ATTENTION": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gradients_match_between_paths():
    attn = Attention(16, 2, attn_drop=0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    bias = torch.randn(2, 5, 5)
    g = []
    for eager in (False, True):
        x.grad = None
        _run(attn, x, eager=eager, attn_bias=bias, is_causal=True).square().sum().backward()
        g.append(x.grad.clone())
    torch.testing.assert_close(g[0], g[1], atol=1e-5, rtol=1e-5)
