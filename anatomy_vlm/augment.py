"""Training augmentation for a frozen encoder: augmented copies of each training image, encoded once.

With the encoder frozen, training runs on cached embeddings, so augmentation cannot happen per step.
Instead each training image gets ``copies`` augmented versions (a fixed, seeded draw per image and
copy), each encoded once and cached like any image. The copies widen what the decoder sees: the
geometry (rotation, scale, shift, shear: patient position and magnification), the grey mapping (gamma,
a random monotone tone curve: exposure and processing), sharpness and noise. Masks go through the same
spatial transform (nearest neighbour) and the boxes are re-derived from the warped masks, so labels
stay exact; a region pushed out of the image by the shift loses its box (absent), as it would in a
real film.

The transforms are MONAI's dictionary transforms, seeded per copy (:func:`augment_sample`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
)

from .model.query_mask_head import mask_boxes

__all__ = ["AUGMENT_VERSION", "augment_sample", "copy_seed", "augmented_digest"]

#: Bump when the transforms change: part of every cached augmented embedding's key.
AUGMENT_VERSION = 2


def _transforms(height: int, width: int) -> Compose:
    return Compose([
        RandAffined(keys=["image", "masks"], prob=1.0, rotate_range=(math.radians(12.0),),
                    scale_range=(0.2, 0.2), shear_range=(0.04, 0.04),
                    translate_range=(0.1 * height, 0.1 * width), mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandAdjustContrastd(keys="image", prob=0.8, gamma=(0.6, 1.6)),
        RandHistogramShiftd(keys="image", prob=0.5, num_control_points=(5, 9)),
        RandGaussianSmoothd(keys="image", prob=0.5, sigma_x=(0.3, 1.6), sigma_y=(0.3, 1.6)),
        RandGaussianNoised(keys="image", prob=0.5, std=0.02),
    ])


def copy_seed(image_digest: str, copy: int, seed: int = 0) -> int:
    """The seed of augmented copy ``copy`` of an image (stable across runs and machines)."""
    h = hashlib.sha1(f"{image_digest}/{copy}/{seed}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def augmented_digest(image_digest: str, copy: int, seed: int = 0) -> str:
    """Embedding-cache key of an augmented copy (changes with the transforms' version)."""
    return hashlib.sha1(f"augment/{AUGMENT_VERSION}/{image_digest}/{copy}/{seed}".encode()).hexdigest()


def augment_sample(sample: dict[str, Any], seed: int) -> dict[str, Any]:
    """One augmented copy of a reader sample that has masks (the demo's); ``seed`` fixes the draw.

    Returns a new sample: ``image`` float32 ``(H, W)`` in [0, 1] (min-max of the original first),
    ``masks`` bool ``(K, H, W)``, ``boxes`` from the masks, ``present`` = mask not empty, ``valid`` as given.

    Raises:
        ValueError: the sample has no masks (boxes alone cannot follow a rotation exactly).
    """
    if sample.get("masks") is None:
        raise ValueError(f"{sample.get('id')}: augmentation needs region masks (this sample has only boxes)")
    img = np.asarray(sample["image"], np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    masks = np.asarray(sample["masks"]).astype(np.float32)
    H, W = img.shape
    t = _transforms(H, W)
    t.set_random_state(seed=seed)
    out = t({"image": img[None], "masks": masks})
    image = np.clip(np.asarray(out["image"])[0], 0.0, 1.0).astype(np.float32)
    warped = np.asarray(out["masks"]) > 0.5
    boxes = mask_boxes(torch.from_numpy(warped)).numpy().astype(np.float32)  # zeros where empty
    present = warped.reshape(warped.shape[0], -1).any(1)
    res = dict(sample)
    res.update(image=image, masks=warped, boxes=boxes, present=present,
               valid=np.asarray(sample.get("valid", sample["present"]), bool).copy())
    res["id"] = f"{sample.get('id')}#aug"
    return res
