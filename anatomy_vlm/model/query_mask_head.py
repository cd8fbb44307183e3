"""Masks for all 29 regions at once: region queries dotted with per-pixel features (MaskFormer style)
on LiteMedSAM's pretrained upscaler, gated by each region's box.

Why not SAM's box-prompted decoder per region? Its two-way transformer updates the 64x64 image
tokens *per prompt* and then upsamples them per prompt, so 29 prompts cost 29 full decoder passes
(about 84 ms each here, 2.4 s per image) and fine-tuning it on 29 prompts per image does not fit a
CPU budget. Here the expensive part runs once per image:

    pixels = refine([upscale(embedding + no_mask_embed), image])   (B, 32, 256, 256)   once per image
    w_k    = hyper(region_embedding_k)                              (B, 29, 32)
    logit_k(p) = <w_k, pixels(p)> + a_k * (2 * softbox_k(p) - 1)   (B, 29, 256, 256)

``upscale`` and ``hyper`` start from LiteMedSAM's mask decoder (``output_upscaling`` and the first
``output_hypernetworks_mlps``; ``no_mask_embed`` from its prompt encoder); ``refine`` is a small
residual conv that sees the letterboxed image, for sharp edges at the input resolution. ``softbox_k`` is
the region's (detached) box as a soft indicator (edges about 1 px wide) and ``a_k`` a learned per-region
weight: the box tells a lung zone where its band of the lung is, which no pixel feature can. Overlapping
regions stay separate masks (one logit map per region).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import NUM_REGIONS
from .encoder import _strict_load, build_litemedsam_part, load_litemedsam_state, sub_state
from .preprocess import INPUT_SIZE

__all__ = ["QueryMaskHead", "mask_boxes", "soft_boxes"]


def soft_boxes(boxes_xyxy: torch.Tensor, size: int, edge: float = 1.0) -> torch.Tensor:
    """``(B, K, 4)`` ``[x0, y0, x1, y1]`` input-frame pixel edges -> ``(B, K, size, size)`` soft
    indicators in [0, 1] (a pixel centre half a pixel inside an edge -> 0.88; ``edge`` sets the
    transition width in px)."""
    c = torch.arange(size, dtype=boxes_xyxy.dtype, device=boxes_xyxy.device) + 0.5
    x0, y0, x1, y1 = (boxes_xyxy[..., i, None] for i in range(4))
    gx = torch.sigmoid((c - x0) / edge * 4) * torch.sigmoid((x1 - c) / edge * 4)  # (B, K, S)
    gy = torch.sigmoid((c - y0) / edge * 4) * torch.sigmoid((y1 - c) / edge * 4)
    return gy[..., :, None] * gx[..., None, :]


class QueryMaskHead(nn.Module):
    """See the module docstring.

    Args:
        embed_dim: Size of the decoder's region embeddings (input of ``hyper``).
        pretrained: Initialise ``upscale``/``hyper``/``no_mask_embed`` from LiteMedSAM (``hyper`` only
            when ``embed_dim`` is 256, SAM's token size).
        state_dict: An already loaded LiteMedSAM state dict (avoids reading the file twice).
        use_image: Feed the letterboxed image to ``refine``.
    """

    def __init__(self, embed_dim: int = 256, *, pretrained: bool = True, state_dict=None,
                 use_image: bool = True, num_regions: int = NUM_REGIONS):
        super().__init__()
        dec = build_litemedsam_part("mask_decoder")
        prm = build_litemedsam_part("prompt_encoder")
        if pretrained:
            state = state_dict if state_dict is not None else load_litemedsam_state()
            _strict_load(dec, sub_state(state, "mask_decoder."), "LiteMedSAM mask decoder weights")
            _strict_load(prm, sub_state(state, "prompt_encoder."), "LiteMedSAM prompt encoder weights")
        self.upscale = dec.output_upscaling
        self.no_mask_embed = nn.Parameter(prm.no_mask_embed.weight.detach().clone().view(1, 256, 1, 1))
        if embed_dim == 256:
            self.hyper = dec.output_hypernetworks_mlps[0]
        else:
            self.hyper = nn.Sequential(nn.Linear(embed_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                       nn.Linear(256, 32))
        self.use_image = use_image
        self.refine = nn.Sequential(nn.Conv2d(32 + (1 if use_image else 0), 32, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(32, 32, 3, padding=1))
        nn.init.zeros_(self.refine[2].weight)
        nn.init.zeros_(self.refine[2].bias)
        self.box_weight = nn.Parameter(torch.full((num_regions,), 3.0))
        self.input_size = INPUT_SIZE

    def pixel_features(self, embeddings: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 256, 64, 64)`` embeddings (+ ``(B, 3|1, 256, 256)`` images) -> ``(B, 32, 256, 256)``."""
        p = self.upscale(embeddings + self.no_mask_embed)
        if self.use_image:
            if images is None:
                raise ValueError("this mask head needs the letterboxed image (images=...)")
            img = images[:, :1].to(p.dtype)
            if img.shape[-1] != p.shape[-1]:
                img = F.interpolate(img, size=p.shape[-2:], mode="bilinear", align_corners=False)
            return p + self.refine(torch.cat([p, img], 1))
        return p + self.refine(p)

    def decode(self, pixels: torch.Tensor, region_embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(B, K, S, S)`` from precomputed :meth:`pixel_features` (cheap: repeatable)."""
        w = self.hyper(region_embeddings)  # (B, K, 32)
        logits = torch.einsum("bkc,bchw->bkhw", w, pixels)
        gate = soft_boxes(boxes_xyxy, pixels.shape[-1]) * 2 - 1
        return logits + self.box_weight[None, : logits.shape[1], None, None] * gate

    def forward(self, embeddings: torch.Tensor, region_embeddings: torch.Tensor, boxes_xyxy: torch.Tensor,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits ``(B, K, 256, 256)`` in the input frame.

        Args:
            embeddings: ``(B, 256, 64, 64)`` LiteMedSAM embeddings.
            region_embeddings: ``(B, K, D)`` from the anatomy decoder.
            boxes_xyxy: ``(B, K, 4)`` input-frame pixel edges (detach them: the box loss trains boxes).
            images: ``(B, 3, 256, 256)`` letterboxed inputs when ``use_image``.
        """
        return self.decode(self.pixel_features(embeddings, images), region_embeddings, boxes_xyxy)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` bool masks -> ``(..., 4)`` ``[x0, y0, x1, y1]`` pixel edges (zeros if empty)."""
    rows = masks.any(-1)
    cols = masks.any(-2)
    H, W = masks.shape[-2:]
    r_idx = torch.arange(H, device=masks.device)
    c_idx = torch.arange(W, device=masks.device)
    big = 10 ** 9
    y0 = torch.where(rows, r_idx, big).min(-1).values
    y1 = torch.where(rows, r_idx, -1).max(-1).values + 1
    x0 = torch.where(cols, c_idx, big).min(-1).values
    x1 = torch.where(cols, c_idx, -1).max(-1).values + 1
    b = torch.stack([x0, y0, x1, y1], -1).float()
    return torch.where(rows.any(-1, keepdim=True), b, torch.zeros_like(b))
