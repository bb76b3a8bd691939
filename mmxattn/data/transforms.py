"""Image transforms (torchvision.transforms.v2) for training and evaluation, and a paired horizontal flip that
keeps captions and boxes true of the flipped image.

Defaults are chosen for captions that talk about position:
  * no horizontal flip unless asked: a flipped image makes "left"/"right" false. With ``flip=True`` the
    flip is paired: the image, its boxes and its captions (``swap_left_right``) flip together.
  * no random crop unless asked (``crop_scale``): cropping moves objects across "top left"/"in the middle",
    can cut small shapes out, and at 64 px even a 0.8 crop loses a fifth of an object's pixels. For natural
    images a conservative ``crop_scale=(0.8, 1.0)`` is reasonable; boxes are cropped with the image.
  * no colour jitter: captions name colours.
Train and eval otherwise share resize (shorter side) -> centre crop -> float in [0, 1] -> normalise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "swap_left_right",
    "to_uint8_chw",
    "ImageTextTransform",
    "build_transforms",
    "normalize_batch",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# OpenAI CLIP's normalisation (also open_clip's OPENAI_DATASET_MEAN/STD), for open_clip visual towers.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_SWAP = {"left": "right", "right": "left"}


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: every word "left" <-> "right" (word positions do not change, so
    groundings stay valid). "left of", "on the left", "in the top left" all mirror correctly this way."""
    return " ".join(_SWAP.get(w, w) for w in caption.split(" "))


def to_uint8_chw(image: Any) -> torch.Tensor:
    """PIL image (any mode), numpy array (H, W) / (H, W, C) or tensor (C, H, W) / (H, W, C) -> (3, H, W)
    tv_tensors.Image. Grey is repeated to 3 channels, alpha dropped (as PIL's convert("RGB") does). Float input
    must already be in [0, 1]; uint8 is kept as uint8."""
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return F.pil_to_tensor(image).as_subclass(tv_tensors.Image)  # (3, H, W) uint8
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"image: numpy arrays must be (H, W) or (H, W, 1|3|4) (HWC), got shape {image.shape}")
        if not image.flags.writeable:  # np.asarray of a PIL image: torch.from_numpy warns it cannot protect it
            image = image.copy()
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"image: tensors must be (C, H, W) or (H, W, C), got shape {tuple(image.shape)}")
        # channels-first unless only the last dim looks like channels
        t = image if image.shape[0] in (1, 3, 4) or image.shape[2] not in (1, 3, 4) else image.permute(2, 0, 1)
        if t.shape[0] not in (1, 3, 4):
            raise ValueError(f"image: expected 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"image: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"image: expected uint8 or float pixels, got dtype {t.dtype}")
    return t.contiguous().as_subclass(tv_tensors.Image)


class ImageTextTransform:
    """Callable on an image (returns a float (3, H, W) tensor) or on a data-set sample dict (returns the dict
    with ``image`` transformed, ``boxes`` moved with it, and on a flip ``caption``/``captions`` mirrored).

    Boxes come back as the type they came in (numpy float32 or tensor), in pixels of the OUTPUT image. A shapes
    ``scene`` is mirrored with the flip and set to None by a random crop (its captions' regions no longer hold).
    The flip draws from torch's RNG, which DataLoader seeds per worker. An image that already has the output
    size skips resizing (the shapes data set at its native size pays only for dtype + normalise).
    """

    accepts_sample = True  # ShapesDataset passes the whole sample

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip_p: float = 0.0,
        crop: v2.Transform | None = None,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC,
    ) -> None:
        self.img_size = int(img_size)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.flip_p = float(flip_p)
        self.crop = crop  # random geometry (train); None = deterministic resize + centre crop
        self.resize = v2.Compose(
            [v2.Resize(img_size, interpolation=interpolation, antialias=True), v2.CenterCrop(img_size)]
        )

    def _geometry(self, img: torch.Tensor, boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.crop is None and tuple(img.shape[-2:]) == (self.img_size, self.img_size):
            return img, boxes  # already the right size: skip v2's dispatch (half the per-sample cost at 64 px)
        t = self.crop if self.crop is not None else self.resize
        if boxes is None:
            return t(img), None
        bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(img.shape[-2:]))
        img, bb = t(img, bb)
        return img, bb.as_subclass(torch.Tensor)

    def _finish(self, img: torch.Tensor) -> torch.Tensor:
        img = F.to_dtype(img.as_subclass(torch.Tensor), torch.float32, scale=True)
        return F.normalize(img, self.mean, self.std)  # (3, S, S) float32

    def __call__(self, x: Any) -> Any:
        if not isinstance(x, dict):
            img, _ = self._geometry(to_uint8_chw(x), None)
            if self.flip_p > 0 and torch.rand(()) < self.flip_p:
                img = img.flip(-1)
            return self._finish(img)
        sample = dict(x)
        boxes_in = sample.get("boxes")
        boxes = None if boxes_in is None else torch.as_tensor(np.asarray(boxes_in, np.float32)).reshape(-1, 4)
        img, boxes = self._geometry(to_uint8_chw(sample["image"]), boxes)
        if self.crop is not None and "scene" in sample:
            sample["scene"] = None  # a crop moves objects out of their thirds; a resize keeps what captions say
        if self.flip_p > 0 and torch.rand(()) < self.flip_p:
            img = img.flip(-1)  # (3, H, W): mirror the width axis
            if boxes is not None:
                w = img.shape[-1]
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if "caption" in sample:
                sample["caption"] = swap_left_right(sample["caption"])
            if "captions" in sample:
                sample["captions"] = [swap_left_right(c) for c in sample["captions"]]
            if sample.get("scene") is not None:
                sc = sample["scene"]
                sample["scene"] = dataclasses.replace(sc, cx=tuple(sc.img_size - x for x in sc.cx))
            sample["flipped"] = True
        sample["image"] = self._finish(img)
        if boxes is not None:
            sample["boxes"] = boxes.numpy() if isinstance(boxes_in, np.ndarray) else boxes
        return sample

    def __repr__(self) -> str:
        return (
            f"ImageTextTransform(img_size={self.img_size}, crop={self.crop}, mean={self.mean}, std={self.std}, "
            f"flip_p={self.flip_p})"
        )


def build_transforms(
    img_size: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip: bool = False,
    flip_p: float = 0.5,
    crop_scale: tuple[float, float] | None = None,
    interpolation: str = "bicubic",
) -> ImageTextTransform:
    """Transform for training (``train=True``) or evaluation. Output: float32 (3, img_size, img_size),
    normalised with ``mean``/``std`` (ImageNet by default; OPENAI_CLIP_MEAN/STD for open_clip towers).

    ``flip``: paired horizontal flip with probability ``flip_p`` (train only; see the module docstring).
    ``crop_scale``: train only, RandomResizedCrop over this area fraction; None = no crop.
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean}, std={std}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {tuple(modes)}, got {interpolation!r}")
    mode = modes[interpolation]
    crop = None
    if train and crop_scale is not None:
        lo, hi = crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        crop = v2.RandomResizedCrop(img_size, scale=(lo, hi), interpolation=mode, antialias=True)
    return ImageTextTransform(img_size, mean, std, flip_p if (train and flip) else 0.0, crop, mode)


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 batch (B, H, W, 3) or (B, 3, H, W) -> normalised float32 (B, 3, H, W).

    The cheap path for the shapes data set at its native size: keep images uint8 through the DataLoader
    (``transform=None``, 4x less to copy between processes) and normalise the whole batch at once, which
    costs far less than the per-sample transform (benchmarks/data_speed.py)."""
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"images: expected (B, H, W, 3) or (B, 3, H, W), got shape {tuple(images.shape)}")
    channels_last = images.shape[1] != 3
    shape = (1, 1, 1, 3) if channels_last else (1, 3, 1, 1)
    # one fused multiply-add per element: (x / 255 - mean) / std == x * scale + shift
    div = 255.0 if images.dtype == torch.uint8 else 1.0
    scale = torch.tensor([1.0 / (div * s) for s in std], device=images.device).view(shape)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(shape)
    x = torch.addcmul(shift, images.float(), scale)
    return x.permute(0, 3, 1, 2).contiguous() if channels_last else x  # (B, 3, H, W)
