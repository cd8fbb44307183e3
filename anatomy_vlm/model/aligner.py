"""The language stage: region and image embeddings in one space with sentence embeddings.

Anatomy-VLM aligns a feature per anatomical region (and a global one) with clinical text; fVLM pools
each anatomy's features inside its mask. Here, per image and region ``k``:

    v_k = [masked mean ; masked max] of the frozen encoder embedding over region k's mask
          (the dense head's sigmoid mask, pooled to the 64x64 embedding grid)        (B, K, 2C)
    u_k = the anatomy decoder's region token                                          (B, K, D)
    t_k = the frozen text encoder's embedding of region k's knowledge text            (K, T)
          (registry description + the findings knowledge.py says can be seen there)
    r_k = normalize(MLP([v_k ; u_k ; P_know t_k]))                                   (B, K, J)

**Knowledge enrichment** is the ``P_know t_k`` input: the knowledge sentence of a region, encoded by
the same frozen text encoder that encodes reports, enters the region's MLP next to what the image
shows there. Regions whose descriptions are alike (the zones of one lung, the two costophrenic
angles) start from nearby points of the joint space, and a region's embedding carries the words a
report uses for it, which is what lets a typed sentence ("opacity at the right base") find its
region. The knowledge vectors are a buffer (``knowledge``), saved with the checkpoint together with
the texts' digest; swapping two rows swaps what the MLP is told about those regions (tested).

The image embedding is ``g = normalize(MLP([mean_k v_k ; global token]))``. Text: ``s =
normalize(P_text e)`` with ``e`` the frozen sentence embedding. Similarities are cosines scaled by
a learned temperature (CLIP: ``logit_scale`` starts at ``log(1/0.07)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import NUM_REGIONS

__all__ = ["RegionAligner", "pool_regions", "AlignOutput"]


def pool_regions(embeddings: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Masked mean and max of ``(B, C, h, w)`` embeddings over each region's soft mask.

    Args:
        embeddings: ``(B, C, h, w)`` frozen encoder features.
        mask_logits: ``(B, K, S, S)`` mask logits on the input frame (``S`` a multiple of ``h``).

    Returns:
        ``(B, K, 2C)``: ``[mean ; max]``; a region with an empty mask gets the image-wide values.
    """
    B, C, h, w = embeddings.shape
    p = torch.sigmoid(mask_logits.float())
    if p.shape[-2:] != (h, w):
        p = F.adaptive_avg_pool2d(p, (h, w))
    wsum = p.flatten(2).sum(-1, keepdim=True)  # (B, K, 1)
    f = embeddings.float().flatten(2)  # (B, C, hw)
    flat = p.flatten(2)  # (B, K, hw)
    mean = torch.einsum("bkn,bcn->bkc", flat, f) / wsum.clamp(min=1e-3)
    glob_mean = f.mean(-1)[:, None, :].expand_as(mean)
    empty = wsum < 0.5
    mean = torch.where(empty, glob_mean, mean)
    # max over the pixels where the region's probability is at least half its peak
    inside = flat >= 0.5 * flat.amax(-1, keepdim=True).clamp(min=1e-6)
    neg = torch.finfo(f.dtype).min
    mx = torch.where(inside[:, :, None, :], f[:, None, :, :], torch.full((), neg)).amax(-1)  # (B, K, C)
    mx = torch.where(empty, f.amax(-1)[:, None, :].expand_as(mx), mx)
    return torch.cat([mean, mx], -1)


class AlignOutput:
    """What :meth:`RegionAligner.forward` returns (plain attributes, tensors).

    Attributes:
        regions: ``(B, K, J)`` unit region embeddings in the joint space.
        image: ``(B, J)`` unit image embedding.
    """

    __slots__ = ("regions", "image")

    def __init__(self, regions: torch.Tensor, image: torch.Tensor):
        self.regions, self.image = regions, image


def _mlp(cin: int, hidden: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                         nn.GELU(), nn.Linear(hidden, cout))


class RegionAligner(nn.Module):
    """See the module docstring.

    Args:
        in_channels: Encoder embedding channels ``C``.
        token_dim: Decoder region-token size ``D``.
        text_dim: Text encoder output size ``T`` (384 for all-MiniLM-L6-v2).
        joint_dim: Joint space size ``J``.
        hidden: MLP width.
        knowledge: ``(K, T)`` knowledge-text embeddings per region, or ``None`` (zeros until set
            with :meth:`set_knowledge`).
        dropout: MLP dropout.
    """

    def __init__(self, in_channels: int = 256, token_dim: int = 256, text_dim: int = 384, joint_dim: int = 256,
                 hidden: int = 512, knowledge: torch.Tensor | None = None, dropout: float = 0.1,
                 num_regions: int = NUM_REGIONS):
        super().__init__()
        self.text_dim, self.joint_dim = int(text_dim), int(joint_dim)
        self.know_proj = nn.Linear(text_dim, 128)
        self.region_mlp = _mlp(2 * in_channels + token_dim + 128, hidden, joint_dim, dropout)
        self.image_mlp = _mlp(2 * in_channels + token_dim, hidden, joint_dim, dropout)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, joint_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("knowledge", torch.zeros(num_regions, text_dim) if knowledge is None
                             else knowledge.float().clone())
        self.feature_norm = nn.LayerNorm(2 * in_channels)

    def set_knowledge(self, knowledge: torch.Tensor) -> None:
        """Store the ``(K, T)`` knowledge-text embeddings (encoded by the model's text encoder)."""
        if tuple(knowledge.shape) != tuple(self.knowledge.shape):
            raise ValueError(f"knowledge must be {tuple(self.knowledge.shape)}, got {tuple(knowledge.shape)}")
        self.knowledge.copy_(knowledge.float())

    @property
    def scale(self) -> torch.Tensor:
        """The similarity temperature ``exp(logit_scale)``, clamped to at most 100 (CLIP)."""
        return self.logit_scale.exp().clamp(max=100.0)

    def encode_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` frozen sentence embeddings -> ``(N, J)`` unit vectors in the joint space."""
        return F.normalize(self.text_proj(text_embeddings.float()), dim=-1)

    def forward(self, pooled: torch.Tensor, region_tokens: torch.Tensor, global_token: torch.Tensor | None
                ) -> AlignOutput:
        """Joint-space embeddings of an image's regions and of the image.

        Args:
            pooled: ``(B, K, 2C)`` from :func:`pool_regions`.
            region_tokens: ``(B, K, D)`` decoder region embeddings.
            global_token: ``(B, D)`` decoder global embedding, or ``None`` (zeros).
        """
        B, K, _ = pooled.shape
        v = self.feature_norm(pooled.float())
        u = region_tokens.float()
        know = self.know_proj(self.knowledge[:K])[None].expand(B, -1, -1)
        r = F.normalize(self.region_mlp(torch.cat([v, u, know], -1)), dim=-1)
        g_tok = global_token.float() if global_token is not None else torch.zeros_like(u[:, 0])
        g = F.normalize(self.image_mlp(torch.cat([v.mean(1), g_tok], -1)), dim=-1)
        return AlignOutput(r, g)
