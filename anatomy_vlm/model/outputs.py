"""Typed model outputs (in the style of transformers' ``DetrObjectDetectionOutput``).

Shapes use ``B`` = batch, ``Q`` = number of anatomy queries (``anatomy.NUM_REGIONS`` = 29; query ``i``
is the region with id ``i + 1``), ``D`` = region-embedding dimension, ``S`` = mask side (256: the model
input frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .boxes import box_cxcywh_to_xyxy

__all__ = ["AnatomyOutput", "MaskOutput"]


@dataclass
class AnatomyOutput:
    """What :class:`anatomy_vlm.model.AnatomyVLM` returns.

    Attributes:
        boxes: ``(B, Q, 4)`` float, ``[cx, cy, w, h]`` in ``[0, 1]``, normalised by the side of the square
            model input frame (multiply by 256 for input-frame pixel edges; map to the original image with
            :meth:`anatomy_vlm.model.preprocess.Letterbox.boxes_to_original`).
        presence_logits: ``(B, Q)`` float logits that region ``i`` is visible in the image
            (``sigmoid`` gives the score reported with each box).
        region_embeddings: ``(B, Q, D)`` float, one token per region for the language stage (not normalised).
        global_embedding: ``(B, D)`` float pooled image feature, or ``None`` when the decoder has none.
        masks: ``(B, Q, S, S)`` float mask logits in the input frame (one independent mask per region, so
            overlapping regions stay separate), or ``None`` unless masks were asked for.
        mask_iou: ``(B, Q)`` float, the mask decoder's own quality estimate per mask, or ``None``.
        aux_outputs: Intermediate boxes for auxiliary losses, each an :class:`AnatomyOutput` with only
            ``boxes`` and ``presence_logits`` set: one per earlier decoder layer (``num_layers - 1``, first
            layer first; none when the decoder's ``aux_outputs`` is off), then, with a box refiner, the
            decoder's own final boxes and every refinement stage but the last (``boxes`` is the last).
        aligned_regions: ``(B, Q, J)`` unit region embeddings in the joint image-text space (with an
            aligner and masks), or ``None``.
        aligned_image: ``(B, J)`` unit image embedding in the joint space, or ``None``.
    """

    boxes: torch.Tensor
    presence_logits: torch.Tensor
    region_embeddings: torch.Tensor | None = None
    global_embedding: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    mask_iou: torch.Tensor | None = None
    aux_outputs: tuple[AnatomyOutput, ...] = ()
    aligned_regions: torch.Tensor | None = None
    aligned_image: torch.Tensor | None = None

    @property
    def boxes_xyxy(self) -> torch.Tensor:
        """``(B, Q, 4)`` ``[x0, y0, x1, y1]`` in ``[0, 1]`` of the input frame (MONAI ``xyxy`` mode)."""
        return box_cxcywh_to_xyxy(self.boxes)

    @property
    def mask_logits(self) -> torch.Tensor | None:
        """Alias of ``masks`` (the name :class:`anatomy_vlm.losses.AnatomyCriterion` looks for)."""
        return self.masks

    @property
    def scores(self) -> torch.Tensor:
        """``(B, Q)`` presence probabilities, ``sigmoid(presence_logits)``."""
        return self.presence_logits.sigmoid()


@dataclass
class MaskOutput:
    """What :class:`anatomy_vlm.model.mask_head.BoxPromptMaskHead` returns.

    Attributes:
        masks: ``(B, K, S, S)`` float mask logits in the input frame, one per box prompt
            (``S`` = 256, the decoder's native size, unless another ``output_size`` was asked for).
        iou: ``(B, K)`` float, the mask decoder's predicted IoU of each mask.
    """

    masks: torch.Tensor
    iou: torch.Tensor
