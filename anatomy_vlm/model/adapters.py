"""Low-rank adapters (LoRA) for the image encoder's last blocks, and merging them back into the weights.

Fine-tuning the encoder on a handful of corrected images: instead of training whole blocks (5.7 M
parameters for the encoder, far more than 20 images constrain), every ``nn.Linear`` of the adapted blocks
(attention ``qkv`` and ``proj``, MLP ``fc1`` and ``fc2`` in TinyViT) gets a trainable low-rank update

    y = W x + b + (alpha / r) * B (A x),    A: (r, in), B: (out, r)

with ``W``, ``b`` frozen, ``A`` initialised small at random and ``B`` at zero, so the adapted encoder
starts exactly as the pretrained one (Hu et al., LoRA, 2021). Nothing else in the encoder trains, and it
stays in eval mode (no BatchNorm statistics drift on small batches).

After training, :func:`merge_adapters` folds each update into its base weight (``W + (alpha / r) B A``)
and puts the plain ``nn.Linear`` back: the merged encoder has the original architecture (exported to
ONNX Runtime and cached like any encoder, keyed by its weights' digest) and costs nothing extra at
inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LoRALinear", "add_adapters", "adapter_parameters", "merge_adapters", "has_adapters",
           "adapter_settings", "tokens_to_map", "map_to_tokens"]

ADAPTER_KEYS = ("blocks", "rank", "alpha")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"adapter rank must be an integer >= 1, got {rank!r}")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"adapter rank {rank} exceeds the layer's size "
                             f"({base.in_features} -> {base.out_features})")
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.scale = float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this layer (base weight plus the scaled update)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        out.requires_grad_(False)
        return out


def add_adapters(blocks: list[nn.Module], rank: int = 8, alpha: float | None = None) -> int:
    """Wrap every ``nn.Linear`` inside ``blocks`` in a :class:`LoRALinear` (in place).

    Args:
        blocks: The modules to adapt (e.g. the encoder's last transformer blocks).
        rank: Rank of each update.
        alpha: Scale numerator (``alpha / rank`` multiplies the update); default ``2 * rank``.

    Returns:
        The number of layers wrapped.

    Raises:
        ValueError: ``blocks`` hold no linear layer, or a bad rank.
    """
    alpha = 2.0 * rank if alpha is None else float(alpha)
    n = 0
    for block in blocks:
        for parent in list(block.modules()):
            if isinstance(parent, LoRALinear):
                continue
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
                    n += 1
    if n == 0:
        raise ValueError("no nn.Linear layer in the blocks to adapt")
    return n


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (``lora_a``, ``lora_b``) under ``module``."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def has_adapters(module: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in module.modules())


def merge_adapters(module: nn.Module) -> int:
    """Replace every :class:`LoRALinear` under ``module`` by its merged ``nn.Linear`` (in place).

    Returns:
        The number of layers merged.
    """
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                n += 1
    return n


def adapter_settings(settings, where: str = "encoder_adapters") -> dict | None:
    """Check an adapter setting (``None``/empty, or a dict of ``blocks``, ``rank``, ``alpha``) and return it
    with defaults filled in (``blocks`` 2, ``rank`` 8, ``alpha`` ``None`` = ``2 * rank``).

    Raises:
        ValueError: not a dict, unknown keys, or non-numeric values; ``where`` names the setting.
    """
    if not settings:
        return None
    if not isinstance(settings, dict):
        raise ValueError(f"{where} must be null or an object with keys {list(ADAPTER_KEYS)}, got {settings!r}")
    unknown = set(settings) - set(ADAPTER_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (valid: {', '.join(ADAPTER_KEYS)})")
    out = {"blocks": settings.get("blocks", 2), "rank": settings.get("rank", 8), "alpha": settings.get("alpha")}
    for key in ("blocks", "rank"):
        if not isinstance(out[key], int) or isinstance(out[key], bool):
            raise ValueError(f"{where}.{key} must be an integer, got {out[key]!r}")
    if out["alpha"] is not None and (isinstance(out["alpha"], bool) or not isinstance(out["alpha"], (int, float))
                                     or not out["alpha"] > 0):
        raise ValueError(f"{where}.alpha must be a positive number, got {out['alpha']!r}")
    return out


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """TinyViT's tokens ``(B, s*s, C)`` -> a map ``(B, C, s, s)`` (as its ``forward_features`` before the neck)."""
    b, n, c = x.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square map")
    return x.view(b, side, side, c).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`tokens_to_map`: ``(B, C, s, s)`` -> ``(B, s*s, C)``."""
    return x.flatten(2).transpose(1, 2).contiguous()
