"""The language stage: region and image embeddings in one space with sentence embeddings.

Anatomy-VLM aligns a feature per anatomical region (and a global one) with clinical text; fVLM pools
each anatomy's features inside its mask. Here, per image and region ``k``:

    v_k = [masked mean ; masked max] of the frozen encoder embedding over region k's mask
          (the dense head's sigmoid mask, pooled to the 64x64 embedding grid)        (B, K, 2C)
    u_k = the anatomy decoder's region token                                          (B, K, D)
    t_k = the frozen text encoder's embedding of region k's knowledge text            (K, T)
          (registry description + the findings knowledge.py says can be seen there)
    l_k = [masked mean ; masked max] of the trainable lesion branch's features        (B, K, 2L)
          (optional, ``lesion_channels`` L > 0; :mod:`anatomy_vlm.model.lesion`)
    r_k = normalize(MLP([v_k ; u_k ; P_know t_k ; l_k]))                             (B, K, J)

**Knowledge enrichment** is the ``P_know t_k`` input: the knowledge sentence of a region, encoded by
the same frozen text encoder that encodes reports, enters the region's MLP next to what the image
shows there. Regions whose descriptions are alike (the zones of one lung, the two costophrenic
angles) start from nearby points of the joint space, and a region's embedding carries the words a
report uses for it, which is what lets a typed sentence ("opacity at the right base") find its
region. The knowledge vectors are a buffer (``knowledge``), saved with the checkpoint together with
the texts' digest; swapping two rows swaps what the MLP is told about those regions (tested).

The image embedding is ``g = normalize(MLP([mean_k v_k ; global token ; mean_k l_k]))``. Text: ``s =
normalize(P_text e)`` with ``e`` the frozen sentence embedding. Similarities are cosines scaled by
a learned temperature (CLIP: ``logit_scale`` starts at ``log(1/0.07)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import NUM_REGIONS
from .lesion import LesionBranch

__all__ = ["RegionAligner", "pool_regions", "region_weights", "AlignOutput"]


def region_weights(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, K, S, S)`` mask logits -> ``(B, K, h, w)`` soft region weights on a ``size`` feature grid
    (the sigmoid, average-pooled; ``S`` a multiple of ``h``)."""
    p = torch.sigmoid(mask_logits.float())
    if p.shape[-2:] != tuple(size):
        p = F.adaptive_avg_pool2d(p, tuple(size))
    return p


def pool_regions(embeddings: torch.Tensor, mask_logits: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean and max of ``(B, C, h, w)`` embeddings over each region's soft mask.

    Args:
        embeddings: ``(B, C, h, w)`` features (the frozen encoder's, or the lesion branch's).
        mask_logits: ``(B, K, S, S)`` mask logits on the input frame (``S`` a multiple of ``h``), or
        weights: ``(B, K, h, w)`` from :func:`region_weights` (computed once, reused).

    Returns:
        ``(B, K, 2C)``: ``[mean ; max]``; a region with an empty mask gets the image-wide values.
    """
    B, C, h, w = embeddings.shape
    if weights is None:
        if mask_logits is None:
            raise ValueError("pool_regions needs mask_logits or weights")
        weights = region_weights(mask_logits, (h, w))
    p = weights.float()
    if p.shape[-2:] != (h, w):
        raise ValueError(f"region weights are on a {tuple(p.shape[-2:])} grid, the features on {(h, w)}")
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
    # where each region's maximum sits, one region at a time (never a (B, K, C, hw) tensor), then one
    # gather: the gradient flows to those pixels only, as amax's does
    with torch.no_grad():
        arg = torch.stack([torch.where(inside[:, k, None, :], f, torch.full((), neg)).argmax(-1)
                           for k in range(inside.shape[1])], -1)  # (B, C, K)
    mx = f.gather(2, arg).transpose(1, 2)  # (B, K, C)
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
        lesion_channels: Channels of a trainable :class:`~anatomy_vlm.model.lesion.LesionBranch` whose
            pooled features join the region and image MLPs (0: none; then ``forward`` takes no
            ``lesion``).
        num_findings: Outputs of the lesion branch's auxiliary finding classifier.
    """

    def __init__(self, in_channels: int = 256, token_dim: int = 256, text_dim: int = 384, joint_dim: int = 256,
                 hidden: int = 512, knowledge: torch.Tensor | None = None, dropout: float = 0.1,
                 num_regions: int = NUM_REGIONS, lesion_channels: int = 0, num_findings: int = 7):
        super().__init__()
        self.text_dim, self.joint_dim = int(text_dim), int(joint_dim)
        self.lesion = LesionBranch(int(lesion_channels), num_findings) if lesion_channels else None
        les = 2 * int(lesion_channels)
        self.lesion_norm = nn.LayerNorm(les) if les else None
        self.know_proj = nn.Linear(text_dim, 128)
        self.region_mlp = _mlp(2 * in_channels + token_dim + 128 + les, hidden, joint_dim, dropout)
        self.image_mlp = _mlp(2 * in_channels + token_dim + les, hidden, joint_dim, dropout)
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

    def pool_lesion(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The lesion branch's features of ``(B, C, S, S)`` model-input images pooled inside the regions:
        ``(B, K, 2L)``; ``weights`` are :func:`region_weights` on the branch's ``S/4`` grid."""
        if self.lesion is None:
            raise ValueError("this aligner has no lesion branch (lesion_channels is 0)")
        return pool_regions(self.lesion(images), weights=weights)

    def forward(self, pooled: torch.Tensor, region_tokens: torch.Tensor, global_token: torch.Tensor | None,
                lesion: torch.Tensor | None = None) -> AlignOutput:
        """Joint-space embeddings of an image's regions and of the image.

        Args:
            pooled: ``(B, K, 2C)`` from :func:`pool_regions`.
            region_tokens: ``(B, K, D)`` decoder region embeddings.
            global_token: ``(B, D)`` decoder global embedding, or ``None`` (zeros).
            lesion: ``(B, K, 2L)`` from :meth:`pool_lesion`; required exactly when the aligner has a
                lesion branch.
        """
        B, K, _ = pooled.shape
        if (lesion is None) != (self.lesion is None):
            raise ValueError("lesion features are required with a lesion branch and refused without one")
        v = self.feature_norm(pooled.float())
        u = region_tokens.float()
        know = self.know_proj(self.knowledge[:K])[None].expand(B, -1, -1)
        parts = [v, u, know]
        g_tok = global_token.float() if global_token is not None else torch.zeros_like(u[:, 0])
        img_parts = [v.mean(1), g_tok]
        if lesion is not None:
            ln = self.lesion_norm(lesion.float())
            parts.append(ln)
            img_parts.append(ln.mean(1))
        r = F.normalize(self.region_mlp(torch.cat(parts, -1)), dim=-1)
        g = F.normalize(self.image_mlp(torch.cat(img_parts, -1)), dim=-1)
        return AlignOutput(r, g)
