"""Image transforms: output contract, normalisation, input types, and the paired flip (image, boxes, captions)."""

import numpy as np
import PIL.Image
import pytest
import torch

from mmxattn.data.shapes import ShapesDataset
from mmxattn.data.shapes_render import PALETTE
from mmxattn.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    build_transforms,
    normalize_batch,
    swap_left_right,
)


@pytest.fixture(scope="module")
def samples():
    ds = ShapesDataset("val", size=40, img_size=64, seed=11)
    return [ds[i] for i in range(len(ds))]


def _core_colour(img_chw: torch.Tensor, box, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> int:
    """Nearest palette colour of the centre of ``box`` in a normalised (3, H, W) image."""
    x = img_chw * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]  # back to [0, 1]
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, 0.1 * (x1 - x0), 0.1 * (y1 - y0)
    core = x[:, int(cy - hh) : int(np.ceil(cy + hh)), int(cx - hw) : int(np.ceil(cx + hw))]
    rgb = core.reshape(3, -1).mean(1).numpy()
    return int(np.argmin(np.linalg.norm(PALETTE / 255 - rgb, axis=1)))


def test_output_dtype_shape_and_normalisation():
    tf = build_transforms(64, train=False)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:32] = 255
    out = tf(img)
    assert out.dtype == torch.float32 and out.shape == (3, 64, 64) and type(out) is torch.Tensor
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    torch.testing.assert_close(out[:, 0, :4], ((1 - mean) / std).expand(3, 4))
    torch.testing.assert_close(out[:, 40, :4], ((0 - mean) / std).expand(3, 4))
    clip = build_transforms(32, train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(img)
    assert clip.shape == (3, 32, 32)


def test_clip_constants_match_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert OPENAI_CLIP_MEAN == pytest.approx(OPENAI_DATASET_MEAN)
    assert OPENAI_CLIP_STD == pytest.approx(OPENAI_DATASET_STD)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_pil_modes_become_rgb(mode):
    rgb = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else PIL.Image.fromarray(np.full((20, 30), 300, np.uint16))
    out = build_transforms(16, train=False)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_array_and_tensor_layouts_agree():
    tf = build_transforms(24, train=False)
    hwc = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    ref = tf(hwc)
    torch.testing.assert_close(tf(torch.from_numpy(hwc).permute(2, 0, 1)), ref)  # CHW uint8
    torch.testing.assert_close(tf(torch.from_numpy(hwc)), ref)  # HWC uint8
    torch.testing.assert_close(tf(torch.from_numpy(hwc).permute(2, 0, 1).float() / 255), ref)  # float in [0, 1]
    grey = tf(hwc[:, :, 0])
    torch.testing.assert_close(
        grey[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], grey[1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    )
    with pytest.raises(ValueError, match="image"):
        tf(np.zeros((24, 24, 5), np.uint8))
    with pytest.raises(TypeError, match="image"):
        tf([[0, 1]])


def test_read_only_arrays_give_the_same_pixels_without_torchs_not_writable_warning():
    """np.asarray(PIL image) is read-only: torch.from_numpy on it warned "The given NumPy array is not writable"
    (once per process, hence a fresh one here). The pixels equal a writable copy's, and the output is writable."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import warnings, numpy as np, PIL.Image\n"
        "from mmxattn.data.transforms import build_transforms, to_uint8_chw\n"
        "warnings.simplefilter('error')\n"
        "img = PIL.Image.new('RGB', (20, 12), (200, 30, 90))\n"
        "build_transforms(16, train=False)(np.asarray(img))\n"
        "to_uint8_chw(np.asarray(img.convert('RGBA')))\n"
        "to_uint8_chw(np.asarray(img.convert('L')))\n"
        "print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "not writable" not in r.stderr
    from mmxattn.data.transforms import to_uint8_chw

    rng = np.random.default_rng(0)
    for shape in [(5, 7, 3), (5, 7, 4), (5, 7, 1), (5, 7), (1, 1, 3), (1, 1, 4)]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        ro = a.copy()
        ro.flags.writeable = False
        got, want = to_uint8_chw(ro), to_uint8_chw(a)
        assert torch.equal(got, want) and got.is_contiguous(), shape
        assert not np.shares_memory(got.numpy(), ro), shape  # torch may write to it: never the caller's array
    flipped = np.asarray(PIL.Image.new("RGB", (4, 3)))[::-1]  # read-only and negatively strided
    assert to_uint8_chw(flipped).shape == (3, 3, 4)


def test_no_flip_by_default(samples):
    train, evaluate = build_transforms(64, train=True), build_transforms(64, train=False, flip=True)
    torch.manual_seed(0)
    for s in samples[:20]:
        a, b = train(s), evaluate(s)
        assert torch.equal(a["image"], b["image"]) and a["captions"] == s["captions"]
        np.testing.assert_array_equal(a["boxes"], s["boxes"])


def test_flip_swaps_image_boxes_and_captions_consistently(samples):
    flip = build_transforms(64, train=True, flip=True, flip_p=1.0)
    plain = build_transforms(64, train=False)
    n_rel = 0
    for s in samples:
        f, p = flip(s), plain(s)
        assert f["flipped"] and torch.equal(f["image"], p["image"].flip(-1))
        assert f["captions"] == [swap_left_right(c) for c in s["captions"]] and f["caption"] in f["captions"]
        # the flipped boxes still hold their objects' colours in the flipped image
        for box, (_, colour, _) in zip(f["boxes"], s["labels"]):
            assert _core_colour(f["image"], box) == colour
        np.testing.assert_allclose(f["boxes"][:, 0], 64 - s["boxes"][:, 2], atol=1e-5)
        # a "left of" caption about objects a, b becomes "right of", and the flipped centres agree
        for cap, ground in zip(f["captions"], s["groundings"]):
            words = cap.split()
            if "right" in words and "of" in words and len(ground) == 2 and "on" not in words:
                (pa, a), (pb, b) = ground
                if pa[0] < words.index("right") < pb[0]:
                    centre = (f["boxes"][:, 0] + f["boxes"][:, 2]) / 2
                    assert centre[a] > centre[b], cap
                    n_rel += 1
    assert n_rel > 0


def test_swap_left_right():
    assert swap_left_right("a red circle left of a blue square") == "a red circle right of a blue square"
    assert swap_left_right("a star in the top right") == "a star in the top left"
    assert (
        swap_left_right("a circle to the left of a cross on the right")
        == "a circle to the right of a cross on the left"
    )
    for c in ("two triangles above a circle", "a small red circle left of a large star"):
        assert swap_left_right(swap_left_right(c)) == c


def test_resize_and_crop_move_boxes(samples):
    s = samples[0]
    big = dict(s, image=np.kron(s["image"], np.ones((2, 2, 1), np.uint8)), boxes=s["boxes"] * 2)  # 128 px
    out = build_transforms(64, train=False)(big)
    assert out["image"].shape == (3, 64, 64)
    np.testing.assert_allclose(out["boxes"], s["boxes"], atol=1e-4)
    torch.manual_seed(0)
    crop = build_transforms(48, train=True, crop_scale=(0.8, 1.0))(s)
    assert crop["image"].shape == (3, 48, 48)
    assert (crop["boxes"] >= 0).all() and (crop["boxes"] <= 48).all()


def test_dataset_applies_the_sample_transform():
    ds = ShapesDataset("val", size=3, transform=build_transforms(64, train=False))
    s = ds[0]
    assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
    ds_img = ShapesDataset("val", size=3, transform=lambda im: im.mean())
    assert isinstance(ds_img[0]["image"], np.floating)


def test_bad_arguments():
    with pytest.raises(ValueError, match="flip_p"):
        build_transforms(64, train=True, flip=True, flip_p=2.0)
    with pytest.raises(ValueError, match="crop_scale"):
        build_transforms(64, train=True, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="std"):
        build_transforms(64, train=True, std=(0.2, 0.2))


def test_normalize_batch_equals_per_sample_transform(samples):
    tf = build_transforms(64, train=False)
    imgs = np.stack([s["image"] for s in samples[:6]])  # (B, H, W, 3) uint8
    ref = torch.stack([tf(im) for im in imgs])
    torch.testing.assert_close(normalize_batch(torch.from_numpy(imgs)), ref)
    torch.testing.assert_close(normalize_batch(torch.from_numpy(imgs).permute(0, 3, 1, 2)), ref)
    with pytest.raises(ValueError, match="images"):
        normalize_batch(torch.zeros(2, 5, 5))
