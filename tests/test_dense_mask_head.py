"""The dense mask head: shapes, boxes from its logits, stray-blob removal, feature-space augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anatomy_vlm.anatomy import NUM_REGIONS
from anatomy_vlm.model import Letterbox, build_model, resolve_config
from anatomy_vlm.model.dense_mask_head import (
    DenseMaskHead,
    affine_augment,
    boxes_from_logits,
    clean_logits,
    mask_quality,
)
from anatomy_vlm.model.query_mask_head import mask_boxes

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def test_head_gives_one_mask_per_region_in_the_input_frame():
    head = DenseMaskHead(widths=(16, 16, 16), fine=(8, 8)).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 256, 64, 64), torch.rand(2, 3, 256, 256))
    assert out.shape == (2, NUM_REGIONS, 256, 256)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("use_image", [True, False])
def test_per_pixel_stage_is_the_two_convolutions(use_image):
    """The 256x256 stage runs as matrix products over pixels: same values and gradients as fine2 and out."""
    torch.manual_seed(0)
    head = DenseMaskHead(widths=(16, 16, 16), fine=(8, 8), use_image=use_image)
    f = 8 + (9 if use_image else 0)
    parts = [torch.randn(2, 8, 32, 32).contiguous(memory_format=torch.channels_last)]
    if use_image:
        parts += [torch.randn(2, 8, 32, 32), torch.rand(2, 1, 32, 32)]
    assert head.fine2[0].in_channels == f
    a = head._per_pixel(parts)
    b = head.out(head.fine2(torch.cat(parts, 1)))
    assert a.shape == b.shape == (2, NUM_REGIONS, 32, 32) and a.is_contiguous()
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), [head.fine2[0].weight, head.out.weight])
    gb = torch.autograd.grad(b.square().sum(), [head.fine2[0].weight, head.out.weight])
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(ga, gb))


def test_head_without_image_raises_a_clear_error():
    head = DenseMaskHead(widths=(16, 16, 16), fine=(8, 8))
    with pytest.raises(ValueError, match="letterboxed image"):
        head(torch.randn(1, 256, 64, 64))


def test_head_reads_the_image_edges():
    """Two images that differ only in a bright square give different logits there (the image path works)."""
    torch.manual_seed(0)
    head = DenseMaskHead(widths=(16, 16, 16), fine=(8, 8)).eval()
    emb = torch.randn(1, 256, 64, 64)
    a = torch.zeros(1, 3, 256, 256)
    b = a.clone()
    b[..., 100:140, 100:140] = 1.0
    with torch.no_grad():
        d = (head(emb, a) - head(emb, b)).abs()
    assert d[..., 100:140, 100:140].mean() > 2 * d[..., :40, :40].mean()


def test_build_model_dense_config_and_errors():
    m = build_model({"mask_head": {"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
                     "decoder": {"d_model": 32, "num_heads": 2, "dim_feedforward": 64, "embed_dim": 16}})
    assert isinstance(m.mask_head, DenseMaskHead) and m.boxes_from_masks
    with torch.no_grad():
        out = m.eval()(images=torch.rand(1, 3, 256, 256), embeddings=torch.randn(1, 256, 64, 64), with_masks=True)
    assert out.masks.shape == (1, NUM_REGIONS, 256, 256)
    with pytest.raises(ValueError, match="mask_head.widths"):
        resolve_config({"mask_head": {"kind": "dense", "widths": [16, 16]}})
    with pytest.raises(ValueError, match="mask_head.kind"):
        resolve_config({"mask_head": {"kind": "unet"}})


def _blob_logits(K: int = 3, S: int = 256, seed: int = 0) -> torch.Tensor:
    """Smooth random blobs as logits (positive inside), like a trained head's output."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    out = []
    for _ in range(K):
        cy, cx = (torch.rand(2, generator=g) * 0.6 + 0.2) * S
        ry, rx = (torch.rand(2, generator=g) * 0.15 + 0.05) * S
        out.append(4 * (1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2))
    return torch.stack(out)


@pytest.mark.parametrize("original", [(497, 512), (1841, 1955), (300, 120)])
def test_boxes_from_logits_match_the_upsampled_masks(original):
    """The profile shortcut gives the box of the full-resolution mask (within a pixel)."""
    lb = Letterbox.for_size(*original)
    L = _blob_logits(seed=sum(original))
    h, w = lb.resized_size
    L[:, h:, :] = -5
    L[:, :, w:] = -5
    boxes, empty = boxes_from_logits(L, lb.resized_size, lb.original_size)
    full = lb.masks_to_original(L) > 0
    ref = mask_boxes(full).numpy()
    for k in range(L.shape[0]):
        if full[k].any():
            assert not empty[k]
            np.testing.assert_allclose(boxes[k], ref[k], atol=1.0)


def test_boxes_from_logits_empty_region():
    L = torch.full((2, 256, 256), -3.0)
    L[0, 10:20, 30:50] = 2.0
    boxes, empty = boxes_from_logits(L, (256, 256), (512, 512))
    assert empty.tolist() == [False, True]
    np.testing.assert_allclose(boxes[0], [60, 20, 100, 40], atol=1.0)
    assert boxes[1].tolist() == [0, 0, 0, 0]


def test_clean_logits_drops_a_stray_blob_but_keeps_big_parts():
    L = torch.full((1, 256, 256), -4.0)
    L[0, 50:150, 20:100] = 3.0     # the region
    L[0, 50:140, 140:200] = 3.0    # a second large part (kept: >= 20 % of the largest)
    L[0, 230:234, 230:234] = 3.0   # a stray speck (dropped)
    C = clean_logits(L)
    assert (C[0, 50:150, 20:100] > 0).all() and (C[0, 50:140, 140:200] > 0).all()
    assert (C[0, 230:234, 230:234] < 0).all()
    boxes, _ = boxes_from_logits(C, (256, 256), (256, 256))
    np.testing.assert_allclose(boxes[0], [20, 50, 200, 150], atol=1.0)


def test_mask_quality_ranks_certain_masks_higher():
    sure = torch.full((1, 64, 64), -8.0)
    sure[0, 10:30, 10:30] = 8.0
    unsure = torch.full((1, 64, 64), -8.0)
    unsure[0, 10:30, 10:30] = 0.3
    q = mask_quality(torch.cat([sure, unsure, torch.full((1, 64, 64), -1.0)]))
    assert q[0] > 0.99 and 0.5 < q[1] < 0.6 and q[2] == 0


def test_affine_augment_moves_embedding_image_and_masks_together():
    g = torch.Generator().manual_seed(3)
    img = torch.zeros(2, 3, 256, 256)
    img[:, :, 80:120, 60:100] = 1.0
    masks = torch.zeros(2, 4, 256, 256)
    masks[:, 0, 80:120, 60:100] = 1.0
    emb = torch.zeros(2, 8, 64, 64)
    emb[:, :, 20:30, 15:25] = 1.0
    e2, i2, m2 = affine_augment(emb, img, masks, g, rotate_deg=10, scale=0.15, shift=0.08)
    assert e2.shape == emb.shape and i2.shape == img.shape and m2.shape == masks.shape
    assert set(torch.unique(m2).tolist()) <= {0.0, 1.0}
    for b in range(2):
        # the mask still covers the warped bright square, and the warped embedding blob sits over it
        on = m2[b, 0] > 0
        assert on.any() and i2[b, 0][on].mean() > 0.8
        e_up = torch.nn.functional.interpolate(e2[b:b + 1, :1], size=(256, 256), mode="bilinear")[0, 0]
        assert e_up[on].mean() > 0.6
    # something moved
    assert not torch.equal(m2[0, 0], masks[0, 0])


def test_affine_augment_zero_ranges_is_identity():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 256, 256)
    masks = (torch.rand(1, 2, 256, 256) > 0.5).float()
    emb = torch.randn(1, 8, 64, 64)
    e2, i2, m2 = affine_augment(emb, img, masks, g, rotate_deg=0.0, scale=0.0, shift=0.0)
    torch.testing.assert_close(i2, img, atol=1e-4, rtol=0)
    torch.testing.assert_close(e2, emb, atol=1e-4, rtol=0)
    assert torch.equal(m2, masks)
    assert math.isfinite(float(e2.sum()))
