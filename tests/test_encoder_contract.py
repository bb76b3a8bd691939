"""One contract over every encoder preset (timm style): shapes, finiteness, gradients reach every parameter,
state-dict round trip, gradient checkpointing changes nothing."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from mmxattn.presets import ENCODER_PRESETS, create_encoder, list_encoder_presets

# The ImageNet sizes run at 64 px to stay fast on 2 cores (grids 16, 8, 4, 2: windows 7, 7, 4, 2).
SMALL = {name: 64 for name, fields in ENCODER_PRESETS.items() if fields.get("img_size", 224) > 64}


@functools.cache
def _built(name: str):
    torch.manual_seed(0)
    size = SMALL.get(name)
    return create_encoder(name, drop_path_rate=0.1, **({"img_size": size} if size else {}))


def _build(name: str):
    return copy.deepcopy(_built(name))  # initialising 50M parameters costs more than the tests themselves


def _empty_like(enc):
    with torch.device("meta"):  # no init: every tensor comes from the state dict
        clone = create_encoder(enc.cfg)
    return clone.to_empty(device="cpu")


def _input(enc, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, enc.cfg.in_chans, enc.cfg.img_size, enc.cfg.img_size, generator=g)


@pytest.mark.parametrize("name", list_encoder_presets())
def test_forward_shapes_finite_and_round_trip(name):
    enc = _build(name).eval()
    x = _input(enc)
    with torch.no_grad():
        feats = enc.forward_features(x)
        out = enc(x)
    grids = enc.grid_sizes(*x.shape[2:])
    assert len(feats) == enc.num_stages == len(enc.stage_dims)
    for f, (h, w), c in zip(feats, grids, enc.stage_dims):
        assert f.shape == (2, h * w, c) and torch.isfinite(f).all()
    width = enc.cfg.num_classes or enc.stage_dims[-1]
    assert out.shape == (2, width) and torch.isfinite(out).all()

    clone = _empty_like(enc)
    clone.load_state_dict(enc.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), out)


def _loss_and_grads(enc, x):
    torch.manual_seed(123)  # drop-path draws the same masks in both runs
    enc.zero_grad(set_to_none=True)
    out = enc(x)
    feats = enc.forward_features(x, stages=[0])[0]
    (out.square().mean() + feats.square().mean()).backward()
    return out.detach(), {n: p.grad for n, p in enc.named_parameters()}


@pytest.mark.parametrize("name", list_encoder_presets())
def test_gradients_and_checkpointing(name):
    enc = _build(name).train()
    x = _input(enc)
    out, grads = _loss_and_grads(enc, x)
    assert torch.isfinite(out).all()
    no_grad = [n for n, g in grads.items() if g is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(g).all() for g in grads.values())

    enc.set_grad_checkpointing(True)
    assert enc.grad_checkpointing
    out_ckpt, grads_ckpt = _loss_and_grads(enc, x)
    assert torch.equal(out, out_ckpt)
    for n, g in grads.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=0, atol=0, msg=n)
