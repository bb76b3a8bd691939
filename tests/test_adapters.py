"""timm / open_clip encoders behind the CAT encoder interface (mmxattn.vision.adapters): stage shapes and grids,
row-major patch tokens checked against the libraries' own token outputs, offline weight files, the layer-group
contract, and a whole MMXAttn model on each backend."""

import json

import pytest
import torch

import mmxattn
from mmxattn.config import CATConfig
from mmxattn.vision.adapters import (
    OpenCLIPVisualEncoder,
    TimmEncoder,
    build_adapter,
    freeze_layer_groups,
    layer_decay_scales,
)

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402


def _cfg(img_size=64):
    return CATConfig(img_size=img_size, num_classes=0, drop_path_rate=0.0)


def _check_groups(enc):
    groups = enc.layer_groups()
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(n for n, _ in enc.named_parameters()), "every parameter in exactly one group"
    assert all(groups), "no empty group"
    return groups


# ---------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize(
    "name, dims, grids",
    [
        ("resnet18", (64, 64, 128, 256, 512), [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]),
        ("convnext_atto", (40, 80, 160, 320), [(16, 24), (8, 12), (4, 6), (2, 3)]),
    ],
)
def test_timm_hierarchical_stages(name, dims, grids):
    torch.manual_seed(0)
    enc = build_adapter(f"timm:{name}", _cfg(), None)
    assert isinstance(enc, TimmEncoder) and enc.stage_dims == dims and enc.num_stages == len(dims)
    assert enc.grid_sizes(64, 96) == grids  # non-square: h and w must not swap
    x = torch.randn(2, 3, 64, 96)
    feats = enc.forward_features(x, stages=[-1, 1])  # order as requested
    assert [f.shape for f in feats] == [(2, 6, dims[-1]), (2, grids[1][0] * grids[1][1], dims[1])]
    # row-major: token i*w + j is the feature map's (i, j)
    maps = enc.model.forward_intermediates(x, indices=[1, len(dims) - 1], intermediates_only=True)
    torch.testing.assert_close(feats[0], maps[1].permute(0, 2, 3, 1).reshape(2, -1, dims[-1]))
    assert enc.mean == (0.485, 0.456, 0.406) and enc.norm is None and len(enc.layers) == len(dims)
    groups = _check_groups(enc)
    assert any(k in groups[0][0] for k in ("conv1", "stem"))  # input side first
    assert all("head" not in n and "fc." not in n for g in groups for n in g), "classifier removed"


def test_timm_tokens_follow_the_image():
    """A bright square in the top-right corner changes the top-right tokens most (row-major, not transposed)."""
    torch.manual_seed(0)
    enc = build_adapter("timm:resnet18", _cfg(), None).eval()
    blank = torch.zeros(1, 3, 64, 96)
    blob = blank.clone()
    blob[..., 4:16, 76:90] = 3.0  # rows 4..15 of 64, columns 76..89 of 96
    with torch.no_grad():
        a, b = (enc.forward_features(x, stages=[1])[0] for x in (blank, blob))  # (1, 16*24, 64)
    h, w = enc.grid_sizes(64, 96)[1]
    i, j = divmod(int((b - a).norm(dim=-1).argmax()), w)
    assert i < h // 3 and j > 2 * w // 3, f"largest change at token ({i}, {j}) of a {h}x{w} grid"


def test_timm_vit_patch_tokens_match_timm():
    torch.manual_seed(0)
    enc = build_adapter("timm:vit_tiny_patch16_224", _cfg(64), None).eval()
    assert enc.stage_dims == (192,) * 12 and enc.grid_sizes(64, 64) == [(4, 4)] * 12 and enc.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last, mid = enc.forward_features(x, stages=[-1, 5])
        ref = enc.model.forward_features(x)  # timm: (B, 1 + 16, 192), final norm applied, class token first
    assert last.shape == mid.shape == (2, 16, 192)
    torch.testing.assert_close(enc.norm(last), ref[:, 1:])  # class token dropped, timm's token order kept
    assert enc.no_weight_decay() == {"model.pos_embed", "model.cls_token"}
    with pytest.raises(ValueError, match="64x64"):
        enc.forward_features(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"stages must be indices in \[-12, 12\)"):
        enc.forward_features(x, stages=[12])
    with pytest.raises(ValueError, match="twice"):
        enc.forward_features(x, stages=[11, -1])
    groups = _check_groups(enc)
    assert len(groups) == 13 and "model.pos_embed" in groups[0] and "model.norm.weight" in groups[-1]
    assert all(n.startswith("model.blocks.3.") for n in groups[4])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_local_weight_file(tmp_path, suffix):
    torch.manual_seed(1)
    src = timm.create_model("resnet18", num_classes=10)  # a classifier of its own: dropped on load
    path = tmp_path / f"resnet18{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    torch.manual_seed(2)
    enc = build_adapter("timm:resnet18", _cfg(), str(path))
    own = enc.model.state_dict()
    assert set(own) == {k for k in sd if not k.startswith("fc.")}
    for k, v in own.items():
        torch.testing.assert_close(v, sd[k], msg=k)

    # a file that does not fit: the error names the missing key
    del sd["layer2.0.conv1.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match=r"missing.*layer2\.0\.conv1\.weight"):
        build_adapter("timm:resnet18", _cfg(), str(bad))


def test_timm_vit_weights_resampled_to_img_size(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = build_adapter("timm:vit_tiny_patch16_224", _cfg(96), str(path))  # 4x4 -> 6x6 patch grid
    own = enc.model.state_dict()
    assert own["pos_embed"].shape == (1, 1 + 36, 192)
    torch.testing.assert_close(own["pos_embed"][:, 0], src.pos_embed[:, 0].detach())  # class slot kept
    torch.testing.assert_close(own["blocks.7.mlp.fc1.weight"], src.blocks[7].mlp.fc1.weight.detach())
    assert enc.forward_features(torch.randn(1, 3, 96, 96), stages=[-1])[0].shape == (1, 36, 192)


def test_grid_probe_leaves_training_state_alone():
    enc = build_adapter("timm:resnet18", _cfg(), None).train()
    before = enc.model.bn1.running_mean.clone()
    assert enc.grid_sizes(64, 80)[-1] == (2, 3)
    assert enc.training and enc.model.bn1.training
    torch.testing.assert_close(enc.model.bn1.running_mean, before)
    assert int(enc.model.bn1.num_batches_tracked) == 0


def test_grad_checkpointing_changes_nothing():
    torch.manual_seed(0)
    enc = build_adapter("timm:vit_tiny_patch16_224", _cfg(64), None)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(ckpt)
        enc.forward_features(x, stages=[3, -1])[1].square().mean().backward()
        grads.append(enc.model.blocks[2].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_layer_group_helpers():
    enc = build_adapter("timm:convnext_atto", _cfg(), None)
    groups = enc.layer_groups()
    scales = layer_decay_scales(enc, 0.5, prefix="visual.")
    assert scales[f"visual.{groups[-1][0]}"] == 1.0 and scales[f"visual.{groups[0][0]}"] == 0.5 ** (len(groups) - 1)
    freeze_layer_groups(enc, 2)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-2] + groups[-1])


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_specs_and_files(tmp_path):
    with pytest.raises(ValueError, match="'foo:bar'"):
        build_adapter("foo:bar", _cfg(), None)
    with pytest.raises(ValueError, match="'resnet_does_not_exist'"):
        build_adapter("timm:resnet_does_not_exist", _cfg(), None)
    with pytest.raises(ValueError, match="'ViT-Nope-99'"):
        build_adapter("open_clip:ViT-Nope-99", _cfg(), None)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_adapter("timm:resnet18", _cfg(), missing)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_adapter("open_clip:ViT-B-32", _cfg(), missing)
    with pytest.raises(ValueError, match="not_a_tag.*tags"):
        build_adapter("open_clip:ViT-B-32", _cfg(), "not_a_tag")


# ---------------------------------------------------------------------------------------------------- open_clip
_TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def test_open_clip_local_dir(tmp_path):
    """The fully offline open_clip path: a folder with open_clip_config.json and the CLIP weights."""
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": _TINY_CLIP}))
    torch.manual_seed(0)
    clip = open_clip.create_model(f"local-dir:{tmp_path}", force_image_size=64)
    sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    torch.manual_seed(1)
    enc = build_adapter(f"open_clip:local-dir:{tmp_path}", _cfg(64), None).eval()
    assert isinstance(enc, OpenCLIPVisualEncoder)
    assert enc.stage_dims == (64, 64) and enc.grid_sizes(64, 64) == [(8, 8), (8, 8)]
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    for k, v in enc.model.state_dict().items():
        torch.testing.assert_close(v, sd[f"visual.{k}"], msg=k)
    assert "visual.proj" in sd and enc.model.proj is None  # the projection is not part of the encoder
    # patch tokens = open_clip's own token output (ln_post applied, class token dropped)
    x = torch.randn(2, 3, 64, 64)
    clip.visual.output_tokens = True
    with torch.no_grad():
        _, ref = clip.eval().visual(x)  # (B, 64, 64)
        last, first = enc.forward_features(x, stages=[-1, 0])
    torch.testing.assert_close(enc.norm(last), ref)
    assert first.shape == (2, 64, 64)
    groups = _check_groups(enc)
    assert len(groups) == 3 and "model.positional_embedding" in groups[0] and "model.ln_post.weight" in groups[-1]
    assert enc.no_weight_decay() == {"model.positional_embedding", "model.class_embedding"}


def test_open_clip_named_model_with_weight_file(tmp_path):
    cfg_file = tmp_path / "mmxtest-tiny-vit.json"
    cfg_file.write_text(json.dumps(_TINY_CLIP))
    open_clip.add_model_config(cfg_file)
    torch.manual_seed(0)
    clip = open_clip.create_model("mmxtest-tiny-vit")  # 32 px, 4x4 patch grid
    path = tmp_path / "clip.pth"
    torch.save(clip.state_dict(), path)
    enc = build_adapter("open_clip:mmxtest-tiny-vit", _cfg(48), str(path))  # resized to 6x6 on load
    own = enc.model.state_dict()
    assert own["positional_embedding"].shape == (1 + 36, 64)
    torch.testing.assert_close(
        own["transformer.resblocks.1.mlp.c_fc.weight"], clip.visual.transformer.resblocks[1].mlp.c_fc.weight.detach()
    )
    assert enc.forward_features(torch.randn(1, 3, 48, 48))[1].shape == (1, 36, 64)


# ---------------------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize(
    "backend, stages, frozen",
    [("timm:convnext_atto", (1, 2), "visual.model.stages.3."), ("timm:vit_tiny_patch16_224", (-2, -1), None)],
)
def test_mmxattn_on_adapter(backend, stages, frozen):
    torch.manual_seed(0)
    model = mmxattn.create_model("mmx_tiny", vision_backend=backend, image_stages=stages, drop_path_rate=0.0)
    c = model.cfg
    images = torch.randn(2, 3, c.vision.img_size, c.vision.img_size)
    ids = torch.randint(3, c.text.vocab_size, (2, c.text.context_length))
    ids[:, 0], ids[:, -1] = c.text.bos_id, c.text.eos_id
    out = model(images, ids)
    grids = model.visual.grid_sizes(c.vision.img_size, c.vision.img_size)
    assert out.image_tokens.shape[1] == sum(grids[s][0] * grids[s][1] for s in stages) == model.num_image_tokens
    loss = (out.image_embeds @ out.text_embeds.T).sum() * out.logit_scale + out.logits.square().mean()
    loss = loss + model.itm_logits(out.image_tokens, ids, out.text_states).sum()
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    if frozen:  # the stages after the last one read are frozen (DDP would wait for their gradients)
        assert frozen_names and all(n.startswith(frozen) for n in frozen_names)
    else:
        assert not frozen_names


def test_open_clip_timm_tower(tmp_path):
    """open_clip models whose tower is a timm trunk (SigLIP, ConvNeXt CLIP) come back as a TimmEncoder over the
    trunk, with the open_clip preprocessing constants."""
    vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear", "image_size": 64}
    cfg = {"model_cfg": {**_TINY_CLIP, "vision_cfg": vision}, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    enc = build_adapter(f"open_clip:local-dir:{tmp_path}", _cfg(64), None)
    assert isinstance(enc, TimmEncoder) and enc.mean == enc.std == (0.5, 0.5, 0.5)
    assert enc.stage_dims == (192,) * 12 and enc.forward_features(torch.randn(1, 3, 64, 64))[-1].shape == (1, 16, 192)
