"""How a grey radiograph of any size becomes the model's square input, and how results map back.

The contract is LiteMedSAM's own inference preprocessing (bowang-lab MedSAM, LiteMedSAM branch:
``resize_longest_side`` + min-max + ``pad_image``), so the pretrained encoder sees what it was trained on:

1. ``(H, W)`` grey pixels (row 0 at the top, higher = more attenuation, as
   :class:`anatomy_vlm.io.Radiograph` holds them) are min-max scaled to ``[0, 1]``
   (a constant image becomes all zeros).
2. The longest side is resized to ``input_size`` (256) keeping the aspect ratio:
   ``h = int(H * s + 0.5)``, ``w = int(W * s + 0.5)`` with ``s = input_size / max(H, W)``; bilinear with
   antialiasing (close to OpenCV's ``INTER_AREA`` used by MedSAM when shrinking).
3. Zero padding at the bottom and the right to ``input_size x input_size``; the image sits at the top-left.
4. The grey channel is repeated to 3 channels. No mean/std normalisation (LiteMedSAM uses none).

The mapping back is exact per axis: an input-frame x (pixel edges) is ``x * W / w`` in the original image,
a y is ``y * H / h``. :class:`Letterbox` records ``(H, W)`` and ``(h, w)`` and does these conversions for
boxes and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["INPUT_SIZE", "Letterbox", "letterbox", "preprocess_radiograph"]

INPUT_SIZE = 256
"""Side of LiteMedSAM's square input (its TinyViT is built for 256 and returns a 64x64 embedding)."""


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one image's longest-side resize + bottom/right pad.

    Attributes:
        original_size: ``(H, W)`` of the original image.
        resized_size: ``(h, w)`` of the resized image inside the input frame (top-left aligned).
        input_size: Side of the square input frame.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int = INPUT_SIZE

    @classmethod
    def for_size(cls, height: int, width: int, input_size: int = INPUT_SIZE) -> Letterbox:
        """The letterbox MedSAM uses for an ``height x width`` image."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        s = input_size / max(height, width)
        h = max(1, min(input_size, int(height * s + 0.5)))
        w = max(1, min(input_size, int(width * s + 0.5)))
        return cls((int(height), int(width)), (h, w), int(input_size))

    @property
    def scale_xy(self) -> tuple[float, float]:
        """``(sx, sy)``: input-frame pixels per original pixel along x (columns) and y (rows)."""
        return self.resized_size[1] / self.original_size[1], self.resized_size[0] / self.original_size[0]

    def boxes_to_original(self, boxes_xyxy: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Input-frame ``[x0, y0, x1, y1]`` pixel edges -> original-image pixel edges, clipped to the image."""
        sx, sy = self.scale_xy
        H, W = self.original_size
        if isinstance(boxes_xyxy, torch.Tensor):
            div = boxes_xyxy.new_tensor([sx, sy, sx, sy])
            hi = boxes_xyxy.new_tensor([W, H, W, H])
            return torch.minimum((boxes_xyxy / div).clamp(min=0), hi)
        b = np.asarray(boxes_xyxy, np.float64) / np.array([sx, sy, sx, sy])
        return np.clip(b, 0, np.array([W, H, W, H], np.float64))

    def boxes_to_input(self, boxes_xyxy: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Original-image ``[x0, y0, x1, y1]`` pixel edges -> input-frame pixel edges."""
        sx, sy = self.scale_xy
        if isinstance(boxes_xyxy, torch.Tensor):
            return boxes_xyxy * boxes_xyxy.new_tensor([sx, sy, sx, sy])
        return np.asarray(boxes_xyxy, np.float64) * np.array([sx, sy, sx, sy])

    def masks_to_original(self, masks: torch.Tensor) -> torch.Tensor:
        """``(..., S, S)`` masks or logits in the input frame -> ``(..., H, W)`` on the original grid.

        Crops the padding, then resizes bilinearly (threshold logits at 0 / probabilities at 0.5 *after*
        this call). ``S`` may differ from ``input_size`` (e.g. 64x64 logits): the crop scales with it.
        """
        lead, (S1, S2) = masks.shape[:-2], masks.shape[-2:]
        h = max(1, round(self.resized_size[0] * S1 / self.input_size))
        w = max(1, round(self.resized_size[1] * S2 / self.input_size))
        x = masks[..., :h, :w].reshape(-1, 1, h, w).float()
        x = F.interpolate(x, size=self.original_size, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *self.original_size)


def letterbox(image: torch.Tensor | np.ndarray, input_size: int = INPUT_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """Turn one grey image into the model input. See the module docstring for the exact steps.

    Args:
        image: ``(H, W)`` grey pixels, any real dtype (a ``(1, H, W)`` array is accepted too).
        input_size: Side of the square input (256 for LiteMedSAM).

    Returns:
        ``(x, box)``: ``x`` float32 ``(3, input_size, input_size)`` in ``[0, 1]``; ``box`` the
        :class:`Letterbox` that maps input-frame coordinates back to the original grid.
    """
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"expected a 2D grey image (H, W), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    box = Letterbox.for_size(t.shape[0], t.shape[1], input_size)
    h, w = box.resized_size
    if (h, w) != tuple(t.shape):
        t = F.interpolate(t[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        t = t.clamp(0, 1)
    x = torch.zeros(3, input_size, input_size, dtype=torch.float32)
    x[:, :h, :w] = t
    return x, box


def preprocess_radiograph(radiograph, input_size: int = INPUT_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """:func:`letterbox` for an :class:`anatomy_vlm.io.Radiograph` (or anything with ``.pixels``)."""
    return letterbox(getattr(radiograph, "pixels", radiograph), input_size)
