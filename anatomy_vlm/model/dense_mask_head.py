"""Masks for all 29 regions from one dense decoder over the image embedding (U-Net style).

The query mask head (:mod:`.query_mask_head`) dots one vector per region with per-pixel features and
needs each region's box as a gate; its boundaries are only as good as those boxes. This head instead
decodes every region's mask directly from the frozen LiteMedSAM embedding and the letterboxed image:

    embedding (256, 64, 64) --1x1--> c0 --+-- down 32x32 (c1) -- down 16x16 (c2, dilated convs: the
                                          |   whole chest in view, so "upper third of the right lung"
    image (1, 256, 256) -- stem --> 128 --+   can be decided) -- up 32 -- up 64 -- up 128 -- up 256
                          stem --> 256 ------------------------------------------------- skip -+
                                                                               1x1 -> (29, 256, 256)

Every region has its own logit map (sigmoid, not softmax), so overlapping regions (a zone inside its
lung, the right atrium inside the cardiac silhouette) stay separate masks. Boxes then come from the
masks (:func:`~anatomy_vlm.model.query_mask_head.mask_boxes` after keeping the largest connected part),
which places edges to a pixel where a box regressor from 32x32 tokens does not.

Costs (2 CPU threads, batch 1, default widths): about 4 GFLOPs, ~60 ms forward; training runs on cached
embeddings with feature-space augmentation (:func:`affine_augment`).
"""

from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import NUM_REGIONS

__all__ = ["DenseMaskHead", "affine_augment", "boxes_from_logits", "clean_logits", "mask_quality"]


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.GroupNorm(groups, cout), nn.GELU())


class DenseMaskHead(nn.Module):
    """See the module docstring.

    Args:
        in_channels: Embedding channels (256 for LiteMedSAM).
        widths: Channels at 64x64, 32x32, 16x16.
        fine: Channels at 128x128 and 256x256. The 256x256 stage is per-pixel (1x1 convolutions over
            the upsampled features and a 3x3 image stem): a 3x3 convolution at that size costs more
            than the rest of the head on a CPU.
        num_regions: Output masks (one per registry region).
        use_image: Feed the letterboxed image to the fine stages (sharp edges at the input resolution).
    """

    def __init__(self, in_channels: int = 256, widths: tuple[int, int, int] = (96, 128, 160),
                 fine: tuple[int, int] = (32, 16), num_regions: int = NUM_REGIONS, use_image: bool = True):
        super().__init__()
        c0, c1, c2 = (int(w) for w in widths)
        f1, f2 = (int(f) for f in fine)
        s1, s2 = (24, 8) if use_image else (0, 0)  # image stem channels at 128 (and 64) / 256
        self.use_image = use_image
        self.num_regions = num_regions
        self.proj = nn.Sequential(nn.Conv2d(in_channels, c0, 1, bias=False), nn.GroupNorm(8, c0), nn.GELU())
        if use_image:
            self.stem2 = nn.Sequential(nn.Conv2d(1, s2, 3, padding=1), nn.GELU())
            self.stem1 = nn.Sequential(nn.Conv2d(s2, s1, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, s1),
                                       nn.GELU())
            self.stem0 = nn.Sequential(nn.Conv2d(s1, s1, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, s1),
                                       nn.GELU())
        self.enc0 = _block(c0 + s1, c0)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _block(c0, c1), _block(c1, c1))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _block(c1, c2), _block(c2, c2, 2), _block(c2, c2, 4))
        self.up1 = _block(c2 + c1, c1)
        self.up0 = _block(c1 + c0, c0)
        self.fine1 = _block(c0 + s1, f1)
        self.fine2 = nn.Sequential(nn.Conv2d(f1 + s2 + (1 if use_image else 0), f2, 1), nn.GELU())
        self.out = nn.Conv2d(f2, num_regions, 1)
        nn.init.constant_(self.out.bias, -2.0)

    def forward(self, embeddings: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits ``(B, K, 4h, 4w)`` (``(B, 29, 256, 256)`` for LiteMedSAM) in the input frame.

        Args:
            embeddings: ``(B, C, h, w)`` encoder embeddings (``(B, 256, 64, 64)``).
            images: ``(B, 3|1, 4h, 4w)`` letterboxed inputs in [0, 1] (first channel used) when ``use_image``.
        """
        x = self.proj(embeddings)
        h, w = x.shape[-2:]
        if self.use_image:
            if images is None:
                raise ValueError("this mask head needs the letterboxed image (images=...)")
            img = images[:, :1].to(x.dtype)
            if img.shape[-2:] != (4 * h, 4 * w):
                img = F.interpolate(img, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
            i2 = self.stem2(img)
            i1 = self.stem1(i2)
            x = torch.cat([x, self.stem0(i1)], 1)
        x0 = self.enc0(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        up = lambda t, ref: F.interpolate(t, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        y = self.up1(torch.cat([up(x2, x1), x1], 1))
        y = self.up0(torch.cat([up(y, x0), x0], 1))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = self.fine1(torch.cat([y, i1], 1) if self.use_image else y)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return self._per_pixel([y, i2, img] if self.use_image else [y])

    def _per_pixel(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The 256x256 stage: ``fine2`` (1x1 conv, GELU) and ``out`` (1x1 conv) over the channel
        concatenation of ``parts``, computed as matrix products over pixels with the convolutions' own
        weights: the same function as the convolutions without their memory-format conversions at this
        size on a CPU (a training step of batch 8 ~5 % faster here, measured A/B in one process).
        Returns contiguous ``(B, K, H, W)`` logits."""
        conv, act = self.fine2[0], self.fine2[1]
        B, _, H, W = parts[0].shape
        x = torch.cat([t.permute(0, 2, 3, 1) for t in parts], -1).reshape(B, H * W, -1)  # (B, HW, C) pixels
        h = act(F.linear(x, conv.weight.flatten(1), conv.bias))                              # (B, HW, f2)
        out = torch.matmul(self.out.weight.flatten(1), h.transpose(1, 2))                    # (B, K, HW)
        return (out + self.out.bias[:, None]).view(B, -1, H, W)


def affine_augment(embeddings: torch.Tensor, images: torch.Tensor, masks: torch.Tensor | None,
                   gen: torch.Generator, rotate_deg: float = 8.0, scale: float = 0.12, shift: float = 0.06
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same random similarity transform applied to embeddings, images and masks of a batch.

    Training runs on cached embeddings, so a geometric augmentation per step has to act on the
    embedding itself: a frozen ViT's features of a slightly rotated, scaled or shifted film are close
    to the correspondingly warped features (the encoder's windows and convolutions are local), so
    warping the 64x64 map with the image and the masks gives new, consistent training inputs at no
    encoder cost. The precomputed augmented copies (:mod:`anatomy_vlm.augment`) cover the real
    encoder response to larger changes; this adds variety between them.

    Args:
        embeddings: ``(B, C, h, w)``.
        images: ``(B, c, S, S)``.
        masks: ``(B, K, S, S)`` float targets or ``None``.
        gen: Random generator (seeded by the trainer).
        rotate_deg, scale, shift: Half-ranges of the uniform draws (shift as a fraction of the side).

    Returns:
        The warped ``(embeddings, images, masks)`` (masks re-binarised at 0.5).
    """
    B = embeddings.shape[0]
    u = lambda: torch.rand(B, generator=gen) * 2 - 1  # noqa: E731
    ang = u() * math.radians(rotate_deg)
    s = 1.0 + u() * scale
    tx, ty = u() * shift * 2, u() * shift * 2  # affine_grid works in [-1, 1]
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    theta = theta.to(embeddings.dtype)

    def warp(t: torch.Tensor, mode: str, pad: str = "zeros") -> torch.Tensor:
        grid = F.affine_grid(theta.to(t.dtype), list(t.shape), align_corners=False)
        return F.grid_sample(t, grid, mode=mode, padding_mode=pad, align_corners=False)

    emb = warp(embeddings, "bilinear", "border")
    img = warp(images, "bilinear")
    m = (warp(masks, "bilinear") > 0.5).to(masks.dtype) if masks is not None else None
    return emb, img, m


def clean_logits(logits: torch.Tensor, keep_fraction: float = 0.2, margin: int = 2) -> torch.Tensor:
    """Drop stray blobs from per-region mask logits: ``(K, S, S)`` -> ``(K, S, S)``.

    Each region is one piece of anatomy, so its mask (``logits > 0``) keeps its largest connected
    part and any part at least ``keep_fraction`` of that size; elsewhere, beyond ``margin`` pixels of
    what is kept, the logits are capped below zero. A stray blob would otherwise stretch the box.
    Regions whose mask is one piece (the usual case) are returned unchanged.
    """
    from scipy import ndimage

    pos = (logits > 0).cpu().numpy()
    rows, keeps = [], []
    for k in range(pos.shape[0]):
        lab, n = ndimage.label(pos[k])
        if n <= 1:
            continue
        sizes = ndimage.sum(pos[k], lab, index=np.arange(1, n + 1))
        ok = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
        if len(ok) == n:
            continue
        rows.append(k)
        keeps.append(np.isin(lab, ok))
    if not rows:
        return logits
    keep = torch.from_numpy(np.stack(keeps)).to(logits.device, torch.float32)[:, None]
    if margin:
        keep = F.max_pool2d(keep, 2 * margin + 1, stride=1, padding=margin)
    out = logits.clone()
    sel = out[rows]
    out[rows] = torch.where(keep[:, 0] > 0, sel, torch.minimum(sel, torch.full_like(sel, -0.01)))
    return out


def boxes_from_logits(logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Region boxes on the original grid from input-frame mask logits, to a fraction of an input pixel.

    The mask of region ``k`` on the original grid is the bilinear upsampling of its logits
    (:meth:`~anatomy_vlm.model.preprocess.Letterbox.masks_to_original`) thresholded at 0; its box is
    where that field is positive. Instead of upsampling all 29 maps, the row and column maxima of the
    logits are upsampled (linear, same convention), which gives the same extent up to the
    interpolation's curvature and costs two 1-D resizes per region.

    Args:
        logits: ``(K, S, S)`` input-frame logits (after :func:`clean_logits`).
        resized_size: ``(h, w)`` of the image inside the input frame (the rest is padding).
        original_size: ``(H, W)`` of the original image.

    Returns:
        ``(boxes (K, 4) float32 [x0, y0, x1, y1] original pixel edges, empty (K,) bool)``; an empty
        region's box is zeros.
    """
    h, w = resized_size
    H, W = original_size
    L = logits[:, :h, :w].float()
    rows = L.amax(2)[:, None]  # (K, 1, h): max over columns per row
    cols = L.amax(1)[:, None]  # (K, 1, w)
    ry = F.interpolate(rows, size=H, mode="linear", align_corners=False)[:, 0] > 0  # (K, H)
    cx = F.interpolate(cols, size=W, mode="linear", align_corners=False)[:, 0] > 0  # (K, W)
    K = L.shape[0]
    boxes = np.zeros((K, 4), np.float32)
    empty = ~(ry.any(1) & cx.any(1)).numpy()
    for k in range(K):
        if empty[k]:
            continue
        ys = torch.nonzero(ry[k])[:, 0]
        xs = torch.nonzero(cx[k])[:, 0]
        boxes[k] = [float(xs[0]), float(ys[0]), float(xs[-1]) + 1, float(ys[-1]) + 1]
    return boxes, empty


def mask_quality(logits: torch.Tensor) -> torch.Tensor:
    """``(K, S, S)`` logits -> ``(K,)`` mean probability over each region's predicted pixels (0 if
    empty): low where the head is unsure of the region's extent, so it ranks detections for AP."""
    p = torch.sigmoid(logits.float())
    m = p > 0.5
    n = m.flatten(1).sum(1)
    return torch.where(n > 0, (p * m).flatten(1).sum(1) / n.clamp(min=1), torch.zeros_like(n, dtype=p.dtype))
