"""Box conversions between the model's normalised boxes and pixel boxes, through MONAI's box utilities.

Conventions (the same everywhere in the package):
    * ``xyxy``: ``[x0, y0, x1, y1]``, x = column, y = row, *pixel edges*: a box that covers exactly the
      pixels of columns ``0..W-1`` is ``[0, 0, W, H]``. This is MONAI's ``"xyxy"`` mode and the format of
      the stored box labels (DESIGN.md section 7).
    * ``cxcywh``: ``[cx, cy, w, h]``, the same box given by centre and size (MONAI's ``"ccwh"`` mode).
    * The model predicts ``cxcywh`` normalised to ``[0, 1]`` by the side of the square model input frame
      (see :mod:`anatomy_vlm.model.preprocess`), so ``xyxy_input = cxcywh_to_xyxy(pred) * input_size``.

All functions keep the autograd graph (losses use them) and accept any leading batch shape ``(..., 4)``.
"""

from __future__ import annotations

import torch
from monai.data.box_utils import convert_box_mode

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh"]


def _convert(boxes: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have a last dimension of 4, got shape {tuple(boxes.shape)}")
    flat = boxes.reshape(-1, 4)
    out = convert_box_mode(flat, src_mode=src, dst_mode=dst)
    return out.reshape(boxes.shape)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` ``[cx, cy, w, h]`` -> ``[x0, y0, x1, y1]`` (MONAI ``ccwh`` -> ``xyxy``), differentiable."""
    return _convert(boxes, "ccwh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` ``[x0, y0, x1, y1]`` -> ``[cx, cy, w, h]`` (MONAI ``xyxy`` -> ``ccwh``), differentiable."""
    return _convert(boxes, "xyxy", "ccwh")
