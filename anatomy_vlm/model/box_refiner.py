"""Box refinement: a cascade of RoI heads that move each edge of a region's box.

The anatomy decoder places a box from one query vector that attended to a 32x32 token map: good at
finding the region, coarse at its edges (a token is 8 input pixels). Each refinement stage here looks
at the region itself: ``torchvision.ops.roi_align`` samples an ``R x R`` grid of the full-resolution
(64x64) feature map over the current box enlarged by a context factor (so edges that lie outside the
current box are still seen), a small MLP reads that grid together with the region's embedding (which
region it is) and predicts a shift for each of the four edges, in units of the enlarged box::

    x0' = x0 + d0 * w_ctx      y0' = y0 + d1 * h_ctx      x1' = x1 + d2 * w_ctx      y1' = y1 + d3 * h_ctx

Stages are applied in turn, each on the previous stage's (detached) output, with a shrinking context
(Cascade R-CNN's idea: later stages see better boxes and specialise on finer shifts). The last layer of
every stage starts at zero, so an untrained refiner returns its input boxes unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torchvision.ops import roi_align

from .boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["BoxRefiner"]


class _Stage(nn.Module):
    def __init__(self, channels: int, roi_size: int, embed_dim: int, hidden: int, context: float,
                 image_roi: int = 0, min_context: float = 0.0):
        super().__init__()
        self.roi_size, self.context, self.image_roi = roi_size, float(context), image_roi
        self.min_half = float(min_context) / 2
        self.roi = nn.Sequential(nn.Flatten(1), nn.Linear(channels * roi_size * roi_size, hidden), nn.GELU())
        self.region = nn.Linear(embed_dim, hidden)
        self.pixels = (nn.Sequential(nn.Flatten(1), nn.Linear(image_roi * image_roi, hidden), nn.GELU())
                       if image_roi else None)
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, feats: torch.Tensor, boxes_xyxy: torch.Tensor, region_embeddings: torch.Tensor,
                image: torch.Tensor | None = None) -> torch.Tensor:
        B, K, _ = boxes_xyxy.shape
        h, w = feats.shape[-2:]
        c = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2
        half = ((boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=1e-3) / 2) * self.context
        if self.min_half > 0:  # a small region's window is never smaller than this (it may be far off)
            half = half.clamp(min=self.min_half)
        ctx = torch.cat([c - half, c + half], -1)  # (B, K, 4) normalised
        scale = torch.tensor([w, h, w, h], dtype=ctx.dtype, device=ctx.device)
        rois = torch.cat([torch.arange(B, device=ctx.device, dtype=ctx.dtype).repeat_interleave(K)[:, None],
                          (ctx * scale).reshape(B * K, 4)], 1)
        grid = roi_align(feats, rois, output_size=self.roi_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        hcode = self.roi(grid) + self.region(region_embeddings.reshape(B * K, -1))
        if self.pixels is not None:
            S = image.shape[-1]
            rois_px = torch.cat([rois[:, :1], (ctx * S).reshape(B * K, 4)], 1)
            patch = roi_align(image, rois_px, output_size=self.image_roi, spatial_scale=1.0, sampling_ratio=2,
                              aligned=True)
            # contrast-normalised per box: the edges matter, not the exposure
            flat = patch.flatten(1)
            flat = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-3)
            hcode = hcode + self.pixels(flat)
        d = torch.tanh(self.out(hcode)).reshape(B, K, 4) * 0.5  # at most half the context box per stage
        size = torch.cat([half, half], -1) * 2
        new = boxes_xyxy + d * size
        lo = torch.minimum(new[..., :2], new[..., 2:] - 1e-3)
        hi = torch.maximum(new[..., 2:], lo + 1e-3)
        return torch.cat([lo, hi], -1).clamp(0.0, 1.0)


class BoxRefiner(nn.Module):
    """See the module docstring.

    Args:
        in_channels: Channels of the encoder feature map (256 for LiteMedSAM).
        embed_dim: Size of the decoder's region embeddings.
        stages: Number of refinement stages.
        channels: Feature channels after the shared 1x1 projection (sampled per box).
        roi_size: Side of the sampled grid per box.
        hidden: Width of each stage's MLP.
        context: Enlargement of the box sampled by each stage (one number per stage, or one for all).
        image_roi: Also sample the letterboxed image itself on an ``image_roi`` square grid over the same
            enlarged box (contrast-normalised per box): edges at the input resolution, which a
            4-pixel feature cell cannot place; 0 = features only.
        min_context: Smallest side of the first stage's window, as a fraction of the input frame (the
            decoder's box of a small region can be off by more than the region's own size); 0 = none.
    """

    def __init__(self, in_channels: int = 256, embed_dim: int = 256, *, stages: int = 2, channels: int = 32,
                 roi_size: int = 8, hidden: int = 256, context: float | Sequence[float] = (1.5, 1.2),
                 image_roi: int = 0, min_context: float = 0.0):
        super().__init__()
        ctx = [float(context)] * stages if isinstance(context, (int, float)) else [float(c) for c in context]
        if len(ctx) != stages or any(c < 1.0 for c in ctx):
            raise ValueError(f"box_refiner.context must be one number >= 1 or one per stage ({stages}), got {context!r}")
        self.proj = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.GroupNorm(8, channels), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.GELU())
        self.image_roi = int(image_roi)
        if not 0.0 <= float(min_context) <= 1.0:
            raise ValueError(f"box_refiner.min_context must be in [0, 1], got {min_context!r}")
        self.stages = nn.ModuleList(_Stage(channels, roi_size, embed_dim, hidden, c, self.image_roi,
                                           min_context if i == 0 else 0.0) for i, c in enumerate(ctx))

    @property
    def uses_image(self) -> bool:
        return self.image_roi > 0

    def forward(self, features: torch.Tensor, boxes_cxcywh: torch.Tensor,
                region_embeddings: torch.Tensor, images: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Refined boxes after every stage, each ``(B, K, 4)`` ``[cx, cy, w, h]`` in ``[0, 1]``.

        Args:
            features: ``(B, C, h, w)`` encoder features (LiteMedSAM: the 64x64 embedding).
            boxes_cxcywh: ``(B, K, 4)`` starting boxes (the decoder's); detached here.
            region_embeddings: ``(B, K, D)`` from the decoder.
            images: ``(B, 3|1, S, S)`` letterboxed inputs; required when ``image_roi`` > 0.
        """
        image = None
        if self.uses_image:
            if images is None:
                raise ValueError("this box refiner samples the image: pass the letterboxed images (images=...)")
            image = images[:, :1].float()
        feats = self.proj(features)
        b = box_cxcywh_to_xyxy(boxes_cxcywh.detach())
        outs = []
        for i, stage in enumerate(self.stages):
            b = stage(feats, b if i == 0 else b.detach(), region_embeddings, image)
            outs.append(box_xyxy_to_cxcywh(b))
        return outs
