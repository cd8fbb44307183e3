"""A trainable lesion-feature branch for the language stage.

The frozen LiteMedSAM embedding pooled inside a region describes the region's *anatomy* well and its
*findings* poorly: a supervised linear probe on it reaches only 0.67-0.80 AUC for consolidation,
nodule, mass and atelectasis on the demo's validation split (README, "Region-text alignment"). The
branch here is a small convolutional network on the model's input image (the letterboxed radiograph,
``S x S``), trained in the language stage only, whose ``(B, C, S/4, S/4)`` feature map is pooled inside
each region's mask (mean and max, :func:`~anatomy_vlm.model.aligner.pool_regions`) and enters the
region's MLP next to the frozen features (:class:`~anatomy_vlm.model.aligner.RegionAligner`).

Training signal (:func:`anatomy_vlm.alignment.train_alignment`): the alignment losses flow into it,
and an auxiliary per-region finding classifier (:attr:`LesionBranch.finding_head`, one logit per
finding of :data:`anatomy_vlm.knowledge.FINDING_NAMES`) is trained on labels that come from the
*report* (:func:`anatomy_vlm.alignment.region_finding_labels`), never from the demo's ground truth.
The classifier only shapes the features during training; findings are always scored through text
prompts (:mod:`anatomy_vlm.zeroshot`), so a finding never trained is scored the same way.

Input normalisation is per image (mean and standard deviation over the non-padding pixels), so the
branch does not depend on a study's exposure or grey mapping.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LesionBranch"]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class _Block(nn.Module):
    """Residual 3x3 block (GroupNorm, GELU) at constant resolution; ``dilation`` widens its context."""

    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False)
        self.n1 = _norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n2 = _norm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.n1(self.conv1(x)))
        return F.gelu(x + self.n2(self.conv2(y)))


class LesionBranch(nn.Module):
    """Image -> ``(B, channels, S/4, S/4)`` lesion features (see the module docstring).

    Args:
        channels: Output channels ``C`` (the pooled region feature is ``2C``).
        num_findings: Outputs of the auxiliary per-region finding classifier.
        width: Channels of the first (``S/2``) stage.
    """

    def __init__(self, channels: int = 48, num_findings: int = 7, width: int = 16):
        super().__init__()
        if channels <= 0 or width <= 0:
            raise ValueError(f"lesion branch channels and width must be positive, got {channels}, {width}")
        self.channels = int(channels)
        self.stride = 4  # output grid = input side / 4 (two stride-2 convolutions)
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), _norm(width), nn.GELU(),
            _Block(width),
            nn.Conv2d(width, channels, 3, stride=2, padding=1, bias=False), _norm(channels), nn.GELU())
        self.body = nn.Sequential(_Block(channels), _Block(channels, 2), _Block(channels, 4))
        self.finding_head = nn.Linear(2 * channels, num_findings)

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` images in [0, 1] -> ``(B, 1, S, S)``, zero mean and unit variance over each
        image's non-padding pixels (the letterbox pads with 0; the padding stays 0)."""
        x = images[:, :1].float()
        inside = (x > 0).float()
        n = inside.flatten(1).sum(-1).clamp(min=1.0)[:, None, None, None]
        mean = (x * inside).flatten(1).sum(-1)[:, None, None, None] / n
        var = (((x - mean) * inside) ** 2).flatten(1).sum(-1)[:, None, None, None] / n
        return (x - mean) / var.clamp(min=1e-6).sqrt() * inside

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1 or 3, S, S)`` model-input images in [0, 1] -> ``(B, channels, S/4, S/4)``."""
        if images.dim() != 4:
            raise ValueError(f"lesion branch expects (B, C, S, S) images, got shape {tuple(images.shape)}")
        return self.body(self.stem(self.normalise(images)))
