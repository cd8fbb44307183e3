"""The anatomy decoder: one learnable query per registry region, DETR-style decoder layers.

Query ``i`` is the region with id ``i + 1`` (:data:`anatomy_vlm.anatomy.REGIONS` order). Because the
assignment of queries to regions is fixed, training needs no Hungarian matching: the target of query ``i``
is region ``i``'s box, the identity match.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import NUM_REGIONS
from .outputs import AnatomyOutput

__all__ = ["AnatomyDecoder", "DecoderLayer", "PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2D sine positional encoding, normalised to the feature map (y first, then x channels).

    Args:
        dim: Output channels (even; half encode y, half x).
        temperature: Frequency base.
    """

    def __init__(self, dim: int = 256, temperature: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"positional-encoding dim must be even, got {dim}")
        self.num_pos_feats = dim // 2
        self.temperature = temperature
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, h: int, w: int, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(h * w, dim)`` encoding of the cells of an ``h x w`` map in row-major order."""
        key = (h, w, str(device), dtype)
        if key not in self._cache:
            scale, eps = 2 * math.pi, 1e-6
            y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / (h + eps) * scale
            x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / (w + eps) * scale
            i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
            dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
            py, px = y[:, None] / dim_t, x[:, None] / dim_t  # (h, F), (w, F)
            py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
            px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
            pos = torch.cat((py[:, None, :].expand(h, w, -1), px[None, :, :].expand(h, w, -1)), dim=2)
            self._cache[key] = pos.reshape(h * w, -1).to(dtype)
        return self._cache[key]


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: self-attention among queries, cross-attention to the image, FFN.

    Queries carry a learned positional embedding (``query_pos``) added to the attention queries/keys;
    image tokens carry the 2D sine encoding added to the cross-attention keys.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                memory_key: torch.Tensor) -> torch.Tensor:
        """``tgt`` ``(B, Q, d)``, ``query_pos`` ``(1|B, Q, d)``, ``memory`` ``(B, N, d)``,
        ``memory_key`` = memory + positional encoding ``(B, N, d)``; returns ``(B, Q, d)``."""
        t = self.norm1(tgt)
        q = t + query_pos
        tgt = tgt + self.drop(self.self_attn(q, q, t, need_weights=False)[0])
        t = self.norm2(tgt)
        tgt = tgt + self.drop(self.cross_attn(t + query_pos, memory_key, memory, need_weights=False)[0])
        return tgt + self.drop(self.ffn(self.norm3(tgt)))


class _MLP(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int):
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(d_in if i == 0 else d_hidden, d_out if i == layers - 1 else d_hidden))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class AnatomyDecoder(nn.Module):
    """Learnable anatomy queries decoding boxes, presence and region embeddings from image features.

    Per query: a box ``sigmoid(logit(prior_i) + MLP(h_i))`` as ``[cx, cy, w, h]`` normalised to the input
    frame (the per-region prior is a persistent buffer, default the centred half-size box; set it from
    the training boxes with :meth:`set_box_prior` so training starts near the answer), a presence logit,
    and a region embedding. Optionally a global embedding from the mean of the projected image tokens.

    Args:
        in_channels: Channels of the encoder's feature map (256 for LiteMedSAM).
        num_queries: Number of anatomy queries; ``None`` = ``anatomy.NUM_REGIONS`` (never hard-code 29).
        d_model: Width of the decoder.
        num_layers: Decoder layers.
        num_heads: Attention heads (must divide ``d_model``).
        dim_feedforward: FFN hidden width.
        dropout: Dropout in attention and FFN.
        embed_dim: Dimension of region (and global) embeddings.
        global_embedding: Whether to compute the pooled global embedding.
        feature_pool: Average-pool the feature map by this factor before attending (default 2: LiteMedSAM's
            64x64 -> 32x32, 4x fewer image tokens, a stride of 8 input pixels; the cross-attention key/value
            projections dominate the decoder's cost on a CPU). 1 keeps the full map.
        aux_outputs: Also return boxes/presence of every earlier layer (DETR's auxiliary losses).
    """

    def __init__(self, in_channels: int = 256, num_queries: int | None = None, *, d_model: int = 256,
                 num_layers: int = 3, num_heads: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1,
                 embed_dim: int = 256, global_embedding: bool = True, feature_pool: int = 2,
                 aux_outputs: bool = True):
        super().__init__()
        num_queries = NUM_REGIONS if num_queries is None else num_queries
        for name, v in (("in_channels", in_channels), ("num_queries", num_queries), ("d_model", d_model),
                        ("num_layers", num_layers), ("num_heads", num_heads),
                        ("dim_feedforward", dim_feedforward), ("embed_dim", embed_dim),
                        ("feature_pool", feature_pool)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"decoder {name} must be a positive integer, got {v!r}")
        if d_model % num_heads or d_model % 2:
            raise ValueError(f"decoder d_model ({d_model}) must be even and divisible by num_heads ({num_heads})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"decoder dropout must be in [0, 1), got {dropout!r}")
        self.num_queries, self.d_model, self.embed_dim = num_queries, d_model, embed_dim
        self.feature_pool, self.return_aux = feature_pool, bool(aux_outputs)

        self.input_proj = nn.Sequential(nn.Conv2d(in_channels, d_model, kernel_size=1),
                                        nn.GroupNorm(math.gcd(32, d_model), d_model))
        self.pos = PositionEmbeddingSine(d_model)
        self.query_pos = nn.Embedding(num_queries, d_model)
        self.query_content = nn.Embedding(num_queries, d_model)
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.box_head = _MLP(d_model, d_model, 4, 3)
        self.presence_head = nn.Linear(d_model, 1)
        self.region_head = nn.Linear(d_model, embed_dim)
        self.global_head = nn.Linear(d_model, embed_dim) if global_embedding else None
        self.register_buffer("box_prior_logits", torch.zeros(num_queries, 4))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.query_pos.weight, std=1.0)
        nn.init.normal_(self.query_content.weight, std=0.02)
        nn.init.zeros_(self.box_head[-1].weight)  # start exactly at the prior
        nn.init.zeros_(self.box_head[-1].bias)
        nn.init.constant_(self.presence_head.bias, math.log(0.99 / 0.01))  # regions are nearly always present

    @torch.no_grad()
    def set_box_prior(self, boxes_cxcywh: torch.Tensor) -> None:
        """Set the per-query prior box, ``(num_queries, 4)`` ``[cx, cy, w, h]`` in ``[0, 1]`` (e.g. the
        training-set mean box of each region)."""
        b = torch.as_tensor(boxes_cxcywh, dtype=torch.float32)
        if tuple(b.shape) != (self.num_queries, 4):
            raise ValueError(f"box prior must have shape ({self.num_queries}, 4), got {tuple(b.shape)}")
        self.box_prior_logits.copy_(_inverse_sigmoid(b))

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = (self.box_prior_logits + self.box_head(h)).sigmoid()
        return boxes, self.presence_head(h).squeeze(-1)

    def forward(self, features: torch.Tensor) -> AnatomyOutput:
        """Decode the regions.

        Args:
            features: ``(B, in_channels, h, w)`` encoder feature map (e.g. the cached LiteMedSAM
                embedding ``(B, 256, 64, 64)``).

        Returns:
            :class:`AnatomyOutput` with ``boxes``, ``presence_logits``, ``region_embeddings``,
            ``global_embedding`` (if enabled) and ``aux_outputs`` (if enabled); no masks.
        """
        if features.ndim != 4:
            raise ValueError(f"features must be (B, C, h, w), got shape {tuple(features.shape)}")
        if self.feature_pool > 1:
            features = F.avg_pool2d(features, self.feature_pool, ceil_mode=True)
        x = self.input_proj(features)
        b, d, h, w = x.shape
        memory = x.flatten(2).transpose(1, 2)  # (B, h*w, d)
        memory_key = memory + self.pos(h, w, x.device, x.dtype)
        query_pos = self.query_pos.weight.unsqueeze(0)
        tgt = self.query_content.weight.unsqueeze(0).expand(b, -1, -1)
        aux: list[AnatomyOutput] = []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, query_pos, memory, memory_key)
            if self.return_aux and i < len(self.layers) - 1:
                aux.append(AnatomyOutput(*self._heads(self.norm(tgt))))
        hs = self.norm(tgt)
        boxes, presence = self._heads(hs)
        glob = self.global_head(memory.mean(dim=1)) if self.global_head is not None else None
        return AnatomyOutput(boxes=boxes, presence_logits=presence, region_embeddings=self.region_head(hs),
                             global_embedding=glob, aux_outputs=tuple(aux))
