"""CAT encoder against the official model: fixture outputs, official key names and parameter counts, the
dense-prediction (any size) rules against a straightforward re-implementation, attention capture, bad input and
checkpoint loading."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmxattn
import mmxattn.attention as attention_module
from mmxattn.presets import create_encoder
from mmxattn.vision import cat as cat_module
from mmxattn.vision import windows
from mmxattn.vision.cat import CATEncoder

REF = Path(__file__).resolve().parents[1].parent / "shared" / "cat_reference"
needs_ref = pytest.mark.skipif(not (REF / "cat_micro.safetensors").is_file(), reason=f"CAT fixture absent: {REF}")


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REF / "cat_micro.safetensors"))


@pytest.fixture(scope="module")
def micro(fixture) -> CATEncoder:
    enc = create_encoder("cat_micro").eval()
    enc.load_state_dict({k[len("model.") :]: v for k, v in fixture.items() if k.startswith("model.")}, strict=True)
    return enc


# ---- the official model ------------------------------------------------------------------------------------------
@needs_ref
@pytest.mark.parametrize("path", ["fused", "sdpa", "eager", "no_onednn", "unpacked", "sliced"])
def test_matches_official_fixture(micro, fixture, path, monkeypatch):
    if path == "unpacked":  # oneDNN without the cached packed weights
        monkeypatch.setattr(windows, "_PACKED", False)
    if path == "sdpa":  # every attention through SDPA (small CPU problems otherwise take the eager math)
        monkeypatch.setattr(attention_module, "_SMALL_CPU_EAGER", False)
    if path == "no_onednn":
        monkeypatch.setattr(windows, "_ONEDNN", False)
    if path == "sliced":  # memory-saving inference: every block of every stage runs slice by slice
        monkeypatch.setattr(cat_module, "_INFER_CHUNK_TOKENS", 100)
    x = fixture["input"]
    with torch.no_grad():
        if path == "eager":
            with mmxattn.eager_attention():
                stages, logits = micro.forward_features(x), micro(x)
        else:
            stages, logits = micro.forward_features(x), micro(x)
    for i, out in enumerate(stages):
        torch.testing.assert_close(out, fixture[f"stage{i}"], rtol=0, atol=1e-5, msg=f"stage {i} ({path})")
    torch.testing.assert_close(logits, fixture["logits"], rtol=0, atol=1e-5)


@needs_ref
def test_autograd_path_matches_fixture(micro, fixture):
    # with gradients on, the residual adds are out of place and the linears go through F.linear
    out = micro.forward_features(fixture["input"][:1].requires_grad_(True), stages=[-1])[0]
    torch.testing.assert_close(out.detach(), fixture["stage3"][:1], rtol=0, atol=1e-5)


def test_official_keys_and_param_counts():
    official = json.loads((REF / "cat_tiny_official_keys.json").read_text()) if REF.is_dir() else None
    counts = {"cat_t": 16_870_996, "cat_s": 37_294_258, "cat_b": 51_531_922}
    for name, n in counts.items():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            enc = create_encoder(name)
        assert sum(p.numel() for p in enc.parameters()) == n, name
        if name == "cat_t" and official is not None:
            assert {k: list(v.shape) for k, v in enc.state_dict().items()} == official


def test_init_and_no_weight_decay():
    enc = create_encoder("cat_pico")
    blk = enc.layers[0].pre_ipsa_blocks[0]
    assert blk.attn.qkv.bias.abs().max() == 0 and blk.norm1.weight.eq(1).all()
    assert 0.01 < blk.mlp.fc1.weight.std() < 0.03 and blk.mlp.fc1.weight.abs().max() <= 2.0
    nwd = enc.no_weight_decay()
    assert "ape" in nwd and "layers.0.pre_ipsa_blocks.0.attn.relative_position_bias_table" in nwd
    assert all(n == "ape" or n.endswith("relative_position_bias_table") for n in nwd)
    assert not enc.grad_checkpointing


# ---- any input size: the official dense-prediction rules, written out directly ------------------------------------
def _ref_block(block, x, p, cpsa):  # x (B, H, W, C), straight from SPEC.md
    B, H, W, C = x.shape
    Hp, Wp = math.ceil(H / p) * p, math.ceil(W / p) * p
    y = F.pad(block.norm1(x), (0, 0, 0, Wp - W, 0, Hp - H))
    win = y.view(B, Hp // p, p, Wp // p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p, C)
    if cpsa:
        nW = win.shape[0] // B
        t = block.attn(win.view(B, nW, p * p, C).permute(0, 3, 1, 2).reshape(B * C, nW, p * p))
        win = t.view(B, C, nW, p * p).permute(0, 2, 3, 1).reshape(-1, p * p, C)
    else:
        win = block.attn(win)
    y = win.view(B, Hp // p, Wp // p, p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)[:, :H, :W]
    x = x + y
    return x + block.mlp(block.norm2(x))


def _ref_forward(enc, img):
    ps = enc.cfg.patch_size
    img = F.pad(img, (0, -img.shape[3] % ps, 0, -img.shape[2] % ps))
    x = enc.patch_embed.proj(img)
    B, C, h, w = x.shape
    x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))
    g = enc.patch_grid
    ape = F.interpolate(enc.ape.reshape(1, g, g, C).permute(0, 3, 1, 2), size=(h, w), mode="bicubic")
    x = (x + ape.flatten(2).transpose(1, 2)).view(B, h, w, C)
    outs = []
    for i, stage in enumerate(enc.layers):
        p = enc.windows[i]
        for blocks in zip(stage.pre_ipsa_blocks, stage.cpsa_blocks, stage.post_ipsa_blocks):
            for j, block in enumerate(blocks):
                x = _ref_block(block, x, p, cpsa=j == 1)
        outs.append(x.flatten(1, 2))
        if stage.downsample is not None:
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = stage.downsample.reduction(stage.downsample.norm(x))
    return outs


@pytest.mark.parametrize("size", [(200, 260), (448, 448)])
def test_any_size_follows_dense_rules(size):
    torch.manual_seed(0)
    enc = create_encoder("cat_micro").eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        outs, ref = enc.forward_features(x), _ref_forward(enc, x)
    grids = enc.grid_sizes(*size)
    assert grids == (
        [(50, 65), (25, 33), (13, 17), (7, 9)] if size == (200, 260) else [(112, 112), (56, 56), (28, 28), (14, 14)]
    )
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.shape == (1, grids[i][0] * grids[i][1], enc.stage_dims[i])
        torch.testing.assert_close(o, r, rtol=0, atol=2e-5, msg=f"stage {i} at {size}")
    if size == (448, 448):  # the ape used is the bicubic resize of the 56x56 table, not the table itself
        pe = enc.position_embedding(112, 112)
        assert pe.shape == (1, 112, 112, 32) and not torch.equal(pe[:, :56, :56], enc.ape.view(1, 56, 56, 32))


def test_stages_argument_stops_early():
    enc = create_encoder("cat_pico").eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    enc.layers[2].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = enc.forward_features(x)
        picked = enc.forward_features(x, stages=[1, 0])
        last = enc.forward_features(x, stages=[-1])
    assert len(calls) == 2  # full and stages=[-1] reach the last stage; stages=[1, 0] does not
    assert torch.equal(picked[0], full[1]) and torch.equal(picked[1], full[0]) and torch.equal(last[0], full[2])
    with pytest.raises(ValueError, match=r"stages must be indices in \[-3, 3\)"):
        enc.forward_features(x, stages=[3])


def test_bias_cache_follows_weight_updates():
    torch.manual_seed(0)
    enc = create_encoder("cat_pico").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
        enc.load_state_dict({k: v + 0.5 if "bias_table" in k else v for k, v in enc.state_dict().items()})
        after = enc(x)
    fresh = create_encoder("cat_pico").eval()
    fresh.load_state_dict(enc.state_dict())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh(x).detach(), rtol=0, atol=1e-6)


# ---- attention maps ----------------------------------------------------------------------------------------------
def test_capture_records_ipsa_and_cpsa():
    enc = create_encoder("cat_micro").eval()
    with torch.no_grad(), mmxattn.capture_attention(enc) as maps:
        enc.forward_features(torch.randn(1, 3, 224, 224), stages=[0])
    ipsa, cpsa = maps["layers.0.pre_ipsa_blocks.0.attn"], maps["layers.0.cpsa_blocks.0.attn"]
    assert ipsa.shape == (64, 1, 49, 49)  # (B * windows, heads, p*p, p*p)
    assert cpsa.shape == (32, 1, 64, 64)  # (B * C, 1, windows, windows)
    for w in (ipsa, cpsa):
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_informative_errors():
    enc = create_encoder("cat_micro").eval()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(3, 224, 224\)"):
        enc(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        enc(torch.randn(1, 1, 224, 224))
    assert enc.min_input_size() == 25
    with pytest.raises(ValueError, match=r"too small; height and width must be >= 25 px"):
        enc(torch.randn(1, 3, 24, 100))
    with torch.no_grad():  # one stage-0 window is enough; later stages pad up to one window
        assert enc(torch.randn(1, 3, 25, 25)).shape == (1, 1000)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_encoder("cat_micro", img_size=222)


# ---- loading -----------------------------------------------------------------------------------------------------
@needs_ref
def test_load_pretrained_file_and_wrappers(fixture, tmp_path):
    enc = create_encoder("cat_micro").eval()
    enc.load_pretrained(REF / "cat_micro.safetensors")  # model.* kept and stripped, fixture tensors ignored
    with torch.no_grad():
        torch.testing.assert_close(enc(fixture["input"]), fixture["logits"], rtol=0, atol=1e-5)
    sd = {k[len("model.") :]: v for k, v in fixture.items() if k.startswith("model.")}
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    headless = create_encoder("cat_micro", num_classes=0)
    headless.load_pretrained(tmp_path / "ckpt.pth")  # head.* dropped silently
    assert torch.equal(headless.ape, sd["ape"])


@needs_ref
def test_weights_of_another_image_size_load_with_the_position_embedding_resized(fixture):
    """The official 224 px fixture loaded into a 448 px encoder: the same outputs as the 224 px model on 448 px
    images (which resizes its position embedding on the fly, as SPEC.md's dense-prediction rule says)."""
    big = create_encoder("cat_micro", img_size=448, num_classes=0).eval()
    big.load_pretrained(REF / "cat_micro.safetensors")
    assert big.ape.shape == (1, 112 * 112, 32)
    small = create_encoder("cat_micro", num_classes=0).eval()
    small.load_pretrained(REF / "cat_micro.safetensors")
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(big.forward_features(x), small.forward_features(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # an embedding of another width is still a shape error, named
    sd = {k[len("model.") :]: v for k, v in fixture.items() if k.startswith("model.")}
    with pytest.raises(ValueError, match=r"ape: expected \(1, 12544, 32\), given \(1, 3136, 16\)"):
        big.load_pretrained(dict(sd, ape=sd["ape"][..., :16]))


def test_load_pretrained_errors_and_key_map():
    src = create_encoder("cat_pico")
    sd = src.state_dict()
    enc = create_encoder("cat_pico")
    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"1 missing \(norm.weight\)"):
        enc.load_pretrained(missing)
    bad = dict(sd, **{"layers.0.downsample.reduction.weight": torch.zeros(64, 64)})
    with pytest.raises(
        ValueError, match=r"layers.0.downsample.reduction.weight: expected \(64, 128\), given \(64, 64\)"
    ):
        enc.load_pretrained(bad)
    with pytest.raises(ValueError, match=r"1 unexpected \(extra.weight\)"):
        enc.load_pretrained(dict(sd, **{"extra.weight": torch.zeros(1)}))
    enc.load_pretrained(dict(sd, **{"extra.weight": torch.zeros(1)}), strict=False)
    # an "older release" naming: stages.* instead of layers.*, and no relative_position_index buffers
    old = {k.replace("layers.", "stages."): v for k, v in sd.items() if "relative_position_index" not in k}
    with pytest.raises(ValueError, match="key_map"):
        enc.load_pretrained(old)
    enc.load_pretrained(old, key_map={"stages.": "layers."})
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in sd.items())
    create_encoder("cat_pico").load_pretrained(old, key_map=lambda k: k.replace("stages.", "layers."))


def test_load_pretrained_names_a_damaged_file_and_never_runs_a_pickle(tmp_path):
    enc = create_encoder("cat_pico")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("evil.pth", "empty.pth", "junk.safetensors"):
        with pytest.raises(ValueError, match=rf"cannot read .*{name.replace('.', '[.]')}"):
            enc.load_pretrained(tmp_path / name)
    assert not marker.exists()


def test_onednn_training_path_matches_f_linear(monkeypatch):
    enc = create_encoder("cat_pico").train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)

    def run():
        enc.zero_grad(set_to_none=True)
        x.grad = None
        out = enc(x)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in enc.named_parameters()}

    fast = run()
    monkeypatch.setattr(windows, "_ONEDNN", False)
    plain = run()
    torch.testing.assert_close(fast[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-6)
    for n, g in plain[2].items():
        torch.testing.assert_close(fast[2][n], g, rtol=1e-4, atol=1e-5, msg=n)


needs_onednn = pytest.mark.skipif(not windows._ONEDNN, reason="no oneDNN in this torch build")


def _cat_weights(enc: CATEncoder) -> list[torch.Tensor]:
    return [m.weight for m in enc.modules() if isinstance(m, torch.nn.Linear)]


@needs_onednn
def test_packed_weights_give_the_unpacked_results_and_follow_every_weight_change(monkeypatch):
    """No-grad CPU inference packs each weight once; loading a state dict, an optimiser step and an in-place edit
    must each be seen (a stale packed weight would give the old model's output), and the packed copies stay out
    of the module (state dict, deepcopy, pickling)."""
    import pickle

    monkeypatch.setattr(windows, "_PACK_KEEP_MAX_ROWS", 1 << 30)  # every call keeps its packed copy
    torch.manual_seed(0)
    enc = create_encoder("cat_pico", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)

    def unpacked() -> torch.Tensor:
        monkeypatch.setattr(windows, "_PACKED", False)
        try:
            with torch.no_grad():
                return enc(x)
        finally:
            monkeypatch.setattr(windows, "_PACKED", True)

    monkeypatch.setattr(windows, "_PACKED", True)
    with torch.no_grad():
        first = enc(x)
    assert all(w in windows._PACKED_CACHE for w in _cat_weights(enc))
    torch.testing.assert_close(first, unpacked(), rtol=0, atol=1e-6)

    other = create_encoder("cat_pico", num_classes=5)  # another initialisation
    enc.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = enc(x)
    assert (loaded - first).abs().max() > 1e-3
    torch.testing.assert_close(loaded, unpacked(), rtol=0, atol=1e-6)

    enc.train()
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    enc(x).square().sum().backward()
    opt.step()
    enc.eval()
    with torch.no_grad():
        stepped = enc(x)
    assert (stepped - loaded).abs().max() > 1e-3
    torch.testing.assert_close(stepped, unpacked(), rtol=0, atol=1e-6)

    with torch.no_grad():
        enc.layers[0].pre_ipsa_blocks[0].mlp.fc1.weight.mul_(3.0)
        edited = enc(x)
    assert (edited - stepped).abs().max() > 1e-4
    torch.testing.assert_close(edited, unpacked(), rtol=0, atol=1e-6)

    assert set(enc.state_dict()) == set(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(enc)(x), edited, rtol=0, atol=1e-6)
        torch.testing.assert_close(pickle.loads(pickle.dumps(enc))(x), edited, rtol=0, atol=1e-6)

    assert windows.set_packed_weights(False) is True
    try:
        assert len(windows._PACKED_CACHE) == 0
    finally:
        windows.set_packed_weights(True)


@needs_onednn
def test_only_small_calls_keep_packed_weights(monkeypatch):
    """Calls of at most _PACK_KEEP_MAX_ROWS rows keep a packed copy; larger ones pack for the call alone (large
    enough) or take the plain weight, keep nothing, and give the same results; a kept copy serves every call."""
    monkeypatch.setattr(windows, "_PACKED", True)
    monkeypatch.setattr(windows, "_PACK_PER_CALL_MIN_MACS", 0)
    torch.manual_seed(0)
    lin = windows.FastLinear(64, 96)
    x_small, x_mid, x_big = torch.randn(8, 64), torch.randn(600, 64), torch.randn(4000, 64)
    ref = {
        n: torch.nn.functional.linear(x, lin.weight, lin.bias) for n, x in (("s", x_small), ("m", x_mid), ("b", x_big))
    }
    packs = []
    real_pack = windows._PACKED_OP
    monkeypatch.setattr(windows, "_PACKED_OP", lambda w, rows: packs.append(rows) or real_pack(w, rows))
    with torch.no_grad():
        torch.testing.assert_close(lin(x_mid), ref["m"], rtol=0, atol=1e-5)  # plain weight: nothing packed
        assert packs == [] and lin.weight not in windows._PACKED_CACHE
        torch.testing.assert_close(lin(x_big), ref["b"], rtol=0, atol=1e-5)  # packed for this call only
        assert packs == [4000] and lin.weight not in windows._PACKED_CACHE
        torch.testing.assert_close(lin(x_small), ref["s"], rtol=0, atol=1e-5)  # kept
        assert packs == [4000, 8] and lin.weight in windows._PACKED_CACHE
        torch.testing.assert_close(lin(x_big), ref["b"], rtol=0, atol=1e-5)  # the kept copy serves it
        torch.testing.assert_close(lin(x_mid), ref["m"], rtol=0, atol=1e-5)
        assert packs == [4000, 8]
        lin.weight.mul_(-1)  # a stale kept copy is not used by a large call
        torch.testing.assert_close(lin(x_mid), -ref["m"] + 2 * lin.bias, rtol=0, atol=1e-5)
        torch.testing.assert_close(lin(x_big), -ref["b"] + 2 * lin.bias, rtol=0, atol=1e-5)


@needs_onednn
def test_training_steps_pack_no_weights(monkeypatch):
    # a training step's weights change every step: packing them would only hold stale copies
    monkeypatch.setattr(windows, "_PACKED", True)
    enc = create_encoder("cat_pico", num_classes=5).train()
    enc(torch.randn(2, 3, 64, 64)).sum().backward()
    assert not any(w in windows._PACKED_CACHE for w in _cat_weights(enc))


@needs_onednn
def test_inference_linear_is_nn_linear_with_a_packed_no_grad_path(monkeypatch):
    """InferenceLinear: no-grad CPU calls (packed oneDNN; MKL at one row) give F.linear's results for every row
    count, re-pack when the row count or the weight changes, and calls with autograd or under autocast are plain
    nn.Linear."""
    monkeypatch.setattr(windows, "_PACKED", True)
    monkeypatch.setattr(windows, "_INFERENCE_LINEAR_MIN_MACS", 0)
    torch.manual_seed(0)
    lin = windows.InferenceLinear(96, 300)
    plain = torch.nn.Linear(96, 300)
    plain.load_state_dict(lin.state_dict())
    assert set(lin.state_dict()) == {"weight", "bias"}
    for shape in [(1, 96), (8, 96), (3, 7, 96)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y = lin(x)
        *_, rows, mkl, dtype = windows._PACKED_CACHE[lin.weight][0]
        assert dtype is None  # fp32: the weight itself packed
        assert rows == x.numel() // 96  # packed for this call's row count
        assert mkl == (rows == 1 and windows._MKL_ONE_ROW)  # one row: MKL's packed GEMM
        torch.testing.assert_close(y, plain(x).detach(), rtol=0, atol=1e-5)
    strided = torch.randn(4, 9, 96)[:, ::2]  # a non-contiguous input (teacher-forced logits read h[:, :-1])
    with torch.no_grad():
        torch.testing.assert_close(lin(strided), plain(strided), rtol=0, atol=1e-5)
        lin.weight.mul_(-1)  # same row count as the last call: only the weight's version says "re-pack"
        plain.weight.mul_(-1)
        torch.testing.assert_close(lin(strided), plain(strided), rtol=0, atol=1e-5)

    x = torch.randn(8, 96, requires_grad=True)
    lin(x).square().sum().backward()  # autograd: F.linear, nothing cached for this call
    gx = x.grad.clone()
    x.grad = None
    plain(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast keeps F.linear's semantics

    monkeypatch.setattr(windows, "_INFERENCE_LINEAR_MIN_MACS", 1 << 20)
    small = windows.InferenceLinear(96, 300)
    with torch.no_grad():
        small(torch.randn(8, 96))  # 8 x 28800 multiply-adds: below the bound, F.linear
    assert small.weight not in windows._PACKED_CACHE


needs_bf16 = pytest.mark.skipif(
    not (windows._ONEDNN and windows._BF16_OK), reason="this CPU / torch build has no oneDNN bf16 kernels"
)


@needs_bf16
def test_cpu_bf16_autocast_runs_cat_and_inference_linears_in_bf16(monkeypatch):
    """Under CPU autocast to bf16, CAT's linears and InferenceLinear compute what autocast's F.linear computes (bf16
    in, bf16 out) through oneDNN with packed bf16 weights, re-packed when a weight changes; with autograd they are
    F.linear under autocast (bf16), and the lean LN -> MLP gives the plain modules' gradients."""
    monkeypatch.setattr(windows, "_PACKED", True)
    monkeypatch.setattr(windows, "_PACK_KEEP_MAX_ROWS", 1 << 30)  # every call keeps its packed copy
    torch.manual_seed(0)
    enc = create_encoder("cat_pico", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        full = enc(x)
        with bf16:
            fast = enc(x)
            monkeypatch.setattr(windows, "_ONEDNN", False)  # autocast's own F.linear everywhere
            ref = enc(x)
            monkeypatch.setattr(windows, "_ONEDNN", True)
    assert fast.dtype == ref.dtype == torch.bfloat16
    packed = [windows._PACKED_CACHE[w] for w in _cat_weights(enc)]
    assert all(key[-1] == torch.bfloat16 and w.dtype == torch.bfloat16 for key, w, _ in packed)
    scale = full.abs().max().item()
    torch.testing.assert_close(fast.float(), ref.float(), rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(fast.float(), full, rtol=0, atol=0.05 * scale)
    with torch.no_grad():
        enc.head.weight.mul_(-1)  # a stale bf16 copy would keep the old head
        with bf16:
            flipped = enc(x)
    torch.testing.assert_close(flipped.float() - enc.head.bias * 2, -fast.float(), rtol=0, atol=0.05 * scale)

    # with autograd: F.linear under autocast (bf16), and the lean LN -> MLP's gradients are the plain modules'
    enc.train()

    def grads(lean: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(windows, "_LEAN_MLP", lean)
        enc.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with bf16:
            out = enc(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    with bf16:
        assert enc.head(torch.randn(3, enc.head.in_features)).dtype == torch.bfloat16
    lean, plain = grads(True), grads(False)
    assert set(lean) == {n for n, p in enc.named_parameters() if p.requires_grad}
    for n, g in plain.items():
        torch.testing.assert_close(lean[n], g, rtol=0, atol=0.05 * g.abs().max().item() + 1e-6, msg=n)

    monkeypatch.setattr(windows, "_INFERENCE_LINEAR_MIN_MACS", 0)
    lin = windows.InferenceLinear(96, 300)
    for rows in (1, 8):
        h = torch.randn(rows, 96)
        with torch.no_grad(), bf16:
            y = lin(h)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y, F.linear(h, lin.weight, lin.bias), rtol=0.02, atol=0.02)
        key, w, _ = windows._PACKED_CACHE[lin.weight]
        assert key[-3:] == (rows, False, torch.bfloat16) and w.dtype == torch.bfloat16


def test_model_text_side_uses_inference_linears_and_generates_as_nn_linear(monkeypatch):
    model = mmxattn.create_model("mmx_tiny").eval()
    text_linears = [m for part in (model.text, model.decoder, model.pooler) for m in part.modules()]
    text_linears = [m for m in text_linears if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    assert text_linears and all(type(m) is windows.InferenceLinear for m in text_linears)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.text.token_embedding.weight.mul_(20)  # sharper logits: greedy choices are not near-ties
    monkeypatch.setattr(windows, "_INFERENCE_LINEAR_MIN_MACS", 0)  # the tiny model's calls take the packed path too
    packed = model.generate(images, max_new_tokens=8)
    monkeypatch.setattr(windows, "_ONEDNN", False)
    assert torch.equal(packed, model.generate(images, max_new_tokens=8))


def test_models_built_under_inference_mode_run_as_the_others():
    """Parameters made inside torch.inference_mode() are inference tensors without a version counter; the caches
    keyed on versions (relative position bias, packed weights) must step aside, not raise."""
    torch.manual_seed(0)
    ref_enc, ref_model = create_encoder("cat_pico", num_classes=5).eval(), mmxattn.create_model("mmx_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        enc = create_encoder("cat_pico", num_classes=5).eval()
        enc.load_state_dict(ref_enc.state_dict())
        model = mmxattn.create_model("mmx_tiny").eval()
        model.load_state_dict(ref_model.state_dict())
        assert enc.layers[0].pre_ipsa_blocks[0].attn.relative_position_bias_table.is_inference()
        out, ids = enc(x), model.generate(x, max_new_tokens=6)
    with torch.no_grad():
        torch.testing.assert_close(out, ref_enc(x), rtol=0, atol=1e-6)
    assert torch.equal(ids, ref_model.generate(x, max_new_tokens=6))


def test_sliced_inference_pads_like_the_whole_stream_and_keeps_capture_whole(monkeypatch):
    """A size that needs padding (valid mask) gives the same stages sliced or not; capture_attention turns
    slicing off so that every recorded map covers the whole input."""
    torch.manual_seed(0)
    enc = create_encoder("cat_micro", num_classes=0).eval()
    x = torch.randn(2, 3, 200, 264)
    with torch.no_grad():
        whole = enc.forward_features(x)
        old = cat_module.set_inference_chunk_tokens(50)
        try:
            sliced = enc.forward_features(x)
            with mmxattn.capture_attention(enc, which="layers.0.cpsa_blocks.0.attn") as maps:
                enc.forward_features(x, stages=[0])
        finally:
            assert cat_module.set_inference_chunk_tokens(old) == 50
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert maps["layers.0.cpsa_blocks.0.attn"].shape[0] == 2 * 32  # (B * C, ...): one map for the whole batch

    # a hooked stage is called as a module (its hooks see a live input); bf16 weights slice to the same result
    seen = []
    enc.layers[1].register_forward_hook(lambda m, inp, out: seen.append(inp[0].float().sum().item()))
    old = cat_module.set_inference_chunk_tokens(50)
    try:
        with torch.no_grad():
            hooked = enc.forward_features(x)
            enc16 = copy.deepcopy(enc).to(torch.bfloat16)
            sliced16 = enc16.forward_features(x.to(torch.bfloat16))
        cat_module.set_inference_chunk_tokens(0)
        with torch.no_grad():
            whole16 = enc16.forward_features(x.to(torch.bfloat16))
    finally:
        cat_module.set_inference_chunk_tokens(old)
    assert len(seen) == 3 and all(math.isfinite(v) for v in seen)  # the deep copy keeps the hook
    for a, b in zip(whole, hooked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(whole16, sliced16):  # bf16 rounding of the same computation (LN statistics in fp32 both ways)
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05 * a.float().abs().max().item())
    with pytest.raises(ValueError, match="chunk"):
        cat_module.set_inference_chunk_tokens(-1)


def test_high_resolution_inference_holds_no_stage_input_beside_its_stream(monkeypatch):
    """No-grad CPU inference hands each stage its input: the stem's output is freed once stage 0 has its own
    window-ordered stream (a 896 px CAT-T image: 12.8 MB); a stage called as a module (hooks) keeps it."""
    import weakref

    torch.manual_seed(0)
    enc = create_encoder("cat_pico", num_classes=0).eval()
    x = torch.randn(1, 3, 96, 96)
    stem_out: list = []
    alive_in_stage: list[bool] = []
    enc.patch_embed.register_forward_hook(lambda m, inp, out: stem_out.append(weakref.ref(out)))
    enc.layers[0].pre_ipsa_blocks[0].register_forward_pre_hook(
        lambda m, inp: alive_in_stage.append(stem_out[-1]() is not None)
    )
    with torch.no_grad():
        out = enc.forward_features(x)
        monkeypatch.setattr(cat_module, "_has_hooks", lambda m: True)
        called = enc.forward_features(x)
    assert alive_in_stage == [False, True]
    for a, b in zip(out, called):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encoder_compiles_for_inference_as_one_graph_that_is_reused():
    """torch.compile of the eval encoder: one graph (no graph break) that later calls reuse. The relative-position
    bias cache used to be guarded on, so every call recompiled (22 s per CAT-T call on the CPU), and a
    data-pointer check broke the graph."""
    torch.manual_seed(0)
    enc = create_encoder("cat_pico").eval()
    x = torch.randn(2, 3, 60, 68)  # padded windows in every stage
    torch._dynamo.reset()
    compiled = torch.compile(enc.forward_features, backend="eager", fullgraph=True)  # a graph break raises
    with torch.no_grad():
        ref = enc.forward_features(x)
        first = compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(x)
    for r, a, b in zip(ref, first, again):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, r, rtol=0, atol=1e-5)


def test_inference_slicing_is_for_the_cpu_only():
    """Slicing saves CPU RAM; on a GPU it only multiplies kernel launches (measured on an H200: CAT-T's bf16 eval
    forward at batch 32 took longer than a training step while it sliced), so other devices never slice."""
    block = create_encoder("cat_micro", num_classes=0).eval().layers[0].pre_ipsa_blocks[0]
    n = cat_module._INFER_CHUNK_TOKENS
    with torch.no_grad():
        assert cat_module._sliced(block, torch.empty(n // 16 + 1, 16, 32))  # a long stream on the CPU
        assert not cat_module._sliced(block, torch.empty(n // 16 + 1, 16, 32, device="meta"))
        assert not cat_module._sliced(block, torch.empty(n // 16, 16, 32))  # short enough


# ---- training memory: the lean LayerNorm -> MLP and per-stage checkpointing --------------------------------------
def _grads(enc, x):
    enc.zero_grad(set_to_none=True)
    x.grad = None
    out = enc(x)
    out.square().sum().backward()
    return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in enc.named_parameters()}


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("onednn", [True, False])
def test_lean_mlp_gives_the_plain_modules_results_and_gradients(monkeypatch, onednn):
    monkeypatch.setattr(windows, "_ONEDNN", onednn and windows._ONEDNN)
    torch.manual_seed(0)
    enc = create_encoder("cat_pico").eval()  # eval: no drop-path randomness; autograd still on
    x = torch.randn(2, 3, 60, 68, requires_grad=True)  # padded windows in every stage
    blk = enc.layers[0].pre_ipsa_blocks[0]
    out = blk.mlp.forward_normed(torch.randn(2, 5, 32, requires_grad=True), blk.norm2)
    assert type(out.grad_fn).__name__ == "_LeanLnMlpBackward"
    lean = _grads(enc, x)
    monkeypatch.setattr(windows, "_LEAN_MLP", False)
    plain = _grads(enc, x)
    torch.testing.assert_close(lean[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(lean[1], plain[1], rtol=1e-5, atol=1e-7)
    for n, g in plain[2].items():
        torch.testing.assert_close(lean[2][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_lean_mlp_keeps_half_the_mlp_activations(monkeypatch):
    torch.manual_seed(0)
    blk = create_encoder("cat_pico").layers[0].pre_ipsa_blocks[0]
    C, hidden = blk.mlp.fc1.in_features, blk.mlp.fc1.out_features
    x = torch.randn(4, 256, C, requires_grad=True)
    lean = _saved_bytes(lambda: blk.mlp.forward_normed(x, blk.norm2))
    monkeypatch.setattr(windows, "_LEAN_MLP", False)
    plain = _saved_bytes(lambda: blk.mlp.forward_normed(x, blk.norm2))
    per_value = x.numel() // C * 4  # bytes of one fp32 channel over all tokens
    # plain keeps LN2's input and output, fc1's output (GELU's input) and GELU's output; lean only x and fc1's output
    assert plain - lean >= (C + hidden) * per_value, (plain, lean)
    assert lean <= (C + hidden) * per_value + 4 * sum(
        p.numel() for p in (*blk.mlp.parameters(), *blk.norm2.parameters())
    )


def test_lean_mlp_under_bf16_autocast_follows_autocast(monkeypatch):
    monkeypatch.setattr(windows, "_ONEDNN", False)  # the plain path honours CPU autocast only through F.linear
    torch.manual_seed(0)
    blk = create_encoder("cat_pico").layers[0].pre_ipsa_blocks[0]
    x = torch.randn(2, 64, blk.mlp.fc1.in_features, requires_grad=True)
    params = [x, *blk.norm2.parameters(), *blk.mlp.parameters()]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = blk.mlp.forward_normed(x, blk.norm2)
        return out, torch.autograd.grad(out.float().square().sum(), params)

    lean_out, lean = run()
    monkeypatch.setattr(windows, "_LEAN_MLP", False)
    plain_out, plain = run()
    assert lean_out.dtype == plain_out.dtype == torch.bfloat16
    torch.testing.assert_close(lean_out, plain_out, rtol=0, atol=0)
    for a, b, p in zip(lean, plain, params):
        assert a.dtype == p.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * b.abs().max().item())


def test_lean_mlp_backward_recomputes_layer_norm_under_the_forward_autocast(monkeypatch):
    """autograd runs backward outside autocast, so the LayerNorm that backward recomputes must restore forward's
    autocast state. On CUDA a bf16 stream (CAT's stream is bf16 after a patch merging under autocast) with fp32
    LayerNorm weights is only valid under autocast: without it every bf16-mixed CAT training step crashed there."""
    monkeypatch.setattr(windows, "_ONEDNN", False)
    torch.manual_seed(0)
    blk = create_encoder("cat_pico").layers[0].pre_ipsa_blocks[0]
    x = torch.randn(2, 64, blk.mlp.fc1.in_features).bfloat16().requires_grad_()
    params = [x, *blk.norm2.parameters(), *blk.mlp.parameters()]
    seen: list[bool] = []
    layer_norm = torch.nn.functional.layer_norm

    def spy(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return layer_norm(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", spy)

    def run():
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = blk.mlp.forward_normed(x, blk.norm2)
        return out, torch.autograd.grad(out.float().square().sum(), params)  # backward outside autocast

    lean_out, lean = run()
    assert seen == [True, True]  # forward, and backward's recomputation
    monkeypatch.setattr(windows, "_LEAN_MLP", False)
    plain_out, plain = run()
    assert seen == [True]
    torch.testing.assert_close(lean_out, plain_out, rtol=0, atol=0)
    for a, b, p in zip(lean, plain, params):
        assert a.dtype == b.dtype == p.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * b.abs().max().item())


def test_an_mlp_ratio_that_leaves_no_mlp_is_a_config_error():
    from mmxattn.config import CATConfig

    for ratio in (0, -1.0, 0.001):
        with pytest.raises(ValueError, match="mlp_ratio"):
            CATConfig(embed_dim=16, depths=(1,), num_heads=(1,), mlp_ratio=ratio)
    with pytest.raises(ValueError, match="mlp_ratio"):
        create_encoder("cat_pico", mlp_ratio=0)


def test_checkpoint_stages_recompute_only_those_stages():
    from mmxattn.config import CATConfig

    with pytest.raises(ValueError, match="checkpoint_stages"):
        CATConfig(depths=(1, 1), num_heads=(1, 2), checkpoint_stages=(2,))
    cfg = CATConfig(
        embed_dim=16,
        depths=(1, 1, 1),
        num_heads=(1, 2, 4),
        img_size=64,
        window=4,
        num_classes=0,
        drop_path_rate=0.0,
        checkpoint_stages=[-3],
    )
    assert cfg.checkpoint_stages == (0,)
    torch.manual_seed(0)
    ck = CATEncoder(cfg)
    plain = CATEncoder(dataclasses.replace(cfg, checkpoint_stages=()))
    plain.load_state_dict(ck.state_dict())
    assert [s.grad_checkpointing for s in ck.layers] == [True, False, False] and not ck.grad_checkpointing
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    a, b = _grads(ck, x), _grads(plain, x)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-8)
    for n, g in b[2].items():
        torch.testing.assert_close(a[2][n], g, rtol=1e-6, atol=1e-8, msg=n)
    xs = torch.randn(2, 3, 64, 64, requires_grad=True)
    assert _saved_bytes(lambda: ck(xs)) < 0.7 * _saved_bytes(lambda: plain(xs))
    ck.set_grad_checkpointing(True)
    assert ck.grad_checkpointing
    ck.set_grad_checkpointing(False)
    assert not any(s.grad_checkpointing for s in ck.layers)
    assert mmxattn.create_model("mmx_cat_t").visual.layers[0].grad_checkpointing  # the preset's default


# ---- the convolutional stem (ours, stem="conv") --------------------------------------------------------------------
def test_conv_stem_sees_beyond_its_patch_and_keeps_the_token_grid():
    """A stem="conv" token depends on pixels outside its own 4x4 patch (receptive field 15 px), a patchify token
    does not; both give the same token grid for any input size, and the config rejects what the stem cannot do."""
    torch.manual_seed(0)
    encs = {stem: create_encoder("cat_pico", stem=stem).eval() for stem in ("patch", "conv")}
    x = torch.rand(1, 3, 64, 64)
    x2 = x.clone()
    x2[:, :, 20, 20] += 1.0  # one pixel in patch (5, 5), 3-4 px outside patch (4, 4) = pixels 16..19
    for stem, enc in encs.items():
        with torch.no_grad():
            a, b = enc.patch_embed(x), enc.patch_embed(x2)  # (1, 16, 16, C)
        changed = (a - b).abs().amax(-1)[0] > 1e-6
        assert changed[5, 5]
        if stem == "patch":
            assert changed.sum() == 1
        else:
            assert changed[4, 4] and changed[6, 6] and not changed[1, 1] and not changed[9, 9]
    for size in [(64, 64), (50, 70), (33, 97)]:
        with torch.no_grad():
            grids = {s: [t.shape for t in e.forward_features(torch.rand(2, 3, *size))] for s, e in encs.items()}
        assert grids["conv"] == grids["patch"]
    conv_keys = set(encs["conv"].state_dict()) - set(encs["patch"].state_dict())
    assert conv_keys and all(k.startswith("patch_embed.proj.") for k in conv_keys)
    with pytest.raises(ValueError, match="stem must be 'patch' or 'conv'"):
        create_encoder("cat_pico", stem="hybrid")
    with pytest.raises(ValueError, match="power of two"):
        create_encoder("cat_pico", stem="conv", patch_size=3, img_size=63)
    # the official weights fit only the patchify stem: strict loading names the stem's keys
    with pytest.raises(RuntimeError, match="patch_embed.proj"):
        encs["conv"].load_state_dict(encs["patch"].state_dict(), strict=True)


def test_inference_slices_are_even_where_a_divisor_allows():
    """Slices of one size (oneDNN keeps compiled kernels per shape): the largest divisor of the total from half the
    requested size up, else the requested size (a remainder slice then)."""
    even = cat_module._even_step
    assert even(50176, 8192) == 7168  # CAT-T's 896 px stage-0 tokens: 7 slices of 7168, not 6 of 8192 + 1024
    assert even(1024, 167) == 128 and even(64, 10) == 8
    assert even(101, 10) == 10  # prime: no divisor in [5, 10]
    assert even(30, 50) == 30 and even(7, 1) == 1


def test_wider_streams_slice_fewer_tokens(monkeypatch):
    """A slice holds about the same bytes at every width: 8192 tokens of a 64-channel stream, 4096 of a 128-channel
    one (its qkv and MLP intermediates are twice as wide)."""
    enc = create_encoder("cat_t", num_classes=0).eval()
    seen: dict[int, int] = {}
    real = cat_module._PreNormBlock._forward_sliced

    def spy(self, x, grid, valid, rows):
        seen[x.shape[-1]] = rows
        return real(self, x, grid, valid, rows)

    monkeypatch.setattr(cat_module._PreNormBlock, "_forward_sliced", spy)
    old = cat_module.set_inference_chunk_tokens(500)
    try:
        with torch.no_grad():
            enc.forward_features(torch.randn(1, 3, 224, 224), stages=[1])  # 3136 and 784 tokens: both sliced
    finally:
        cat_module.set_inference_chunk_tokens(old)
    assert seen == {64: 500, 128: 250}
