"""AnatomyCriterion: named weighted terms, identity matching, partial labels, MONAI GIoU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from anatomy_vlm.anatomy import NUM_REGIONS
from anatomy_vlm.losses import (
    DEFAULT_WEIGHTS, LOSS_TERMS, AnatomyCriterion, BatchTargets, cxcywh_to_xyxy, dice_loss, giou_loss, mask_bce_loss,
    match_identity,
)

K = NUM_REGIONS
ALL_ONES = {k: 1.0 for k in LOSS_TERMS}


def _targets(B: int = 2, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cxcy = 0.3 + 0.4 * torch.rand(B, K, 2, generator=g)
    wh = 0.1 + 0.3 * torch.rand(B, K, 2, generator=g)
    boxes = torch.cat([cxcy, wh], -1)
    present = torch.ones(B, K, dtype=torch.bool)
    present[:, -1] = False  # one valid-but-absent region
    masks = torch.zeros(B, K, size, size)
    for b in range(B):
        for k in range(K):
            x0, y0, x1, y1 = (cxcywh_to_xyxy(boxes[b, k]) * size).round().int().tolist()
            masks[b, k, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1.0
    masks[~present] = 0.0
    return {"boxes": boxes, "present": present, "valid": torch.ones(B, K, dtype=torch.bool), "masks": masks}


def _perfect(t: dict) -> dict:
    return {"boxes": t["boxes"].clone(),
            "presence_logits": torch.where(t["present"], 20.0, -20.0),
            "mask_logits": (t["masks"] * 2 - 1) * 30.0}


def test_identity_matching_is_explicit():
    q, r = match_identity(K)
    assert torch.equal(q, torch.arange(K)) and torch.equal(r, q)


def test_perfect_prediction_gives_about_zero_loss():
    t = _targets()
    out = AnatomyCriterion(ALL_ONES)(_perfect(t), t)
    assert set(out) == set(LOSS_TERMS) | {"loss"}
    for k in ("loss_bbox", "loss_giou", "loss_mask_bce", "loss_presence"):
        assert out[k].item() < 1e-5, (k, out[k].item())
    assert out["loss_mask_dice"].item() < 1e-3  # the +1 smoothing keeps it just above 0
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in LOSS_TERMS), abs=1e-6)


def test_shifted_box_costs_more_than_exact_and_more_shift_costs_more():
    t = _targets(B=1)
    crit = AnatomyCriterion(ALL_ONES)
    losses = []
    for dx in (0.0, 0.05, 0.2):
        p = _perfect(t)
        p["boxes"][0, 0, 0] += dx
        out = crit(p, t)
        losses.append((out["loss_bbox"].item(), out["loss_giou"].item()))
    assert losses[0][0] < losses[1][0] < losses[2][0]
    assert losses[0][1] < losses[1][1] < losses[2][1]


def test_invalid_and_absent_targets_contribute_nothing_to_box_and_mask_terms():
    t = _targets()
    crit = AnatomyCriterion(ALL_ONES)
    p = _perfect(t)
    t["valid"][0, :5] = False                      # unknown labels
    garbage = _perfect(t)
    garbage["boxes"][0, :5] = torch.tensor([0.9, 0.1, 0.05, 0.05])
    garbage["presence_logits"][0, :5] = -50.0      # confidently wrong, but unknown: no penalty
    garbage["mask_logits"][0, :5] = 30.0
    garbage["boxes"][:, -1] = torch.tensor([0.1, 0.9, 0.5, 0.5])  # absent region: its box is ignored
    garbage["mask_logits"][:, -1] = 30.0
    a, b = crit(p, t), crit(garbage, t)
    for k in LOSS_TERMS:
        assert b[k].item() == pytest.approx(a[k].item(), abs=1e-6), k
    # ... while the absent region's presence is still supervised
    wrong = _perfect(t)
    wrong["presence_logits"][:, -1] = 20.0
    assert crit(wrong, t)["loss_presence"] > a["loss_presence"] + 0.1


def test_giou_agrees_with_hand_computed_value():
    # A = [0,0,2,2], B = [1,1,3,3]: intersection 1, union 7, enclosure 9 -> GIoU = 1/7 - 2/9
    expected = 1.0 - (1 / 7 - 2 / 9)
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert giou_loss(a, b).item() == pytest.approx(expected, abs=1e-6)
    # the same boxes through the criterion, as normalised cxcywh on a 4-unit frame
    t = {"boxes": torch.zeros(1, K, 4), "present": torch.zeros(1, K, dtype=torch.bool)}
    t["boxes"][0, 3] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    t["present"][0, 3] = True
    p = {"boxes": torch.full((1, K, 4), 0.5), "presence_logits": torch.zeros(1, K)}
    p["boxes"][0, 3] = torch.tensor([0.25, 0.25, 0.5, 0.5])
    out = AnatomyCriterion(ALL_ONES)(p, t)
    assert out["loss_giou"].item() == pytest.approx(expected, abs=1e-6)
    assert out["loss_bbox"].item() == pytest.approx(0.5, abs=1e-6)  # |0.25|+|0.25|+0+0
    assert "loss_mask_dice" not in out  # no masks given: no mask terms


def test_disjoint_boxes_giou_loss_above_one():
    a, b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # intersection 0, union 2, enclosure 3 -> GIoU = -1/3
    assert giou_loss(a, b).item() == pytest.approx(1 + 1 / 3, abs=1e-6)


def test_weights_scale_the_total_and_unknown_terms_are_rejected():
    t = _targets()
    p = _perfect(t)
    p["boxes"] = p["boxes"] + 0.03
    p["presence_logits"] = p["presence_logits"] * 0.01
    one = AnatomyCriterion({"loss_bbox": 1.0})(p, t)
    two = AnatomyCriterion({"loss_bbox": 2.0})(p, t)
    assert one["loss"].item() == pytest.approx(one["loss_bbox"].item(), rel=1e-6)
    assert two["loss"].item() == pytest.approx(2 * one["loss"].item(), rel=1e-6)
    mixed = AnatomyCriterion({"loss_bbox": 2.0, "loss_presence": 3.0})(p, t)
    assert mixed["loss"].item() == pytest.approx(
        2 * mixed["loss_bbox"].item() + 3 * mixed["loss_presence"].item(), rel=1e-6)
    assert AnatomyCriterion().weights == DEFAULT_WEIGHTS
    with pytest.raises(ValueError, match="unknown loss term"):
        AnatomyCriterion({"loss_boxes": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        AnatomyCriterion({"loss_bbox": -1.0})


def test_gradients_flow_to_every_prediction():
    t = _targets()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in _perfect(t).items()}
    with torch.no_grad():
        p["boxes"] += 0.02
        p["presence_logits"] *= 0.05
        p["mask_logits"] *= 0.05
    out = AnatomyCriterion(ALL_ONES)(p, t)
    out["loss"].backward()
    for k, v in p.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k
        assert v.grad.abs().sum() > 0, k


def test_nothing_valid_gives_zero_loss_that_still_backpropagates():
    t = _targets()
    t["valid"][:] = False
    p = {k: v.detach().clone().requires_grad_(True) for k, v in _perfect(t).items()}
    out = AnatomyCriterion(ALL_ONES)(p, t)
    assert all(out[k].item() == 0.0 for k in out)
    out["loss"].backward()
    assert p["boxes"].grad is not None


def test_dataclass_inputs_mask_valid_and_target_masks_resized():
    @dataclass
    class Out:
        boxes: torch.Tensor
        presence_logits: torch.Tensor
        mask_logits: torch.Tensor

    t = _targets(size=32)
    p = _perfect(t)
    small = torch.nn.functional.interpolate(p["mask_logits"], size=(16, 16), mode="area")
    out = AnatomyCriterion(ALL_ONES)(Out(p["boxes"], p["presence_logits"], small), BatchTargets(**t))
    sel = t["valid"] & t["present"]  # targets are area-averaged to the logits' 16 x 16 grid
    soft = torch.nn.functional.interpolate(t["masks"], size=(16, 16), mode="area")
    assert out["loss_mask_dice"].item() == pytest.approx(dice_loss(small[sel], soft[sel]).mean().item(), abs=1e-6)
    # regions without a real target mask (mask_valid False) do not enter the mask terms
    bad = small.clone()
    bad[0, 2] = -30.0
    tm = BatchTargets(**t, mask_valid=torch.ones(2, K, dtype=torch.bool))
    tm.mask_valid[0, 2] = False
    ok = AnatomyCriterion(ALL_ONES)(Out(p["boxes"], p["presence_logits"], bad), tm)
    assert ok["loss_mask_dice"].item() == pytest.approx(
        AnatomyCriterion(ALL_ONES)(Out(p["boxes"], p["presence_logits"], small), tm)["loss_mask_dice"].item(),
        abs=1e-6)


def test_shape_errors_have_messages():
    t = _targets()
    p = _perfect(t)
    p["boxes"] = p["boxes"][:, :, :3]
    with pytest.raises(ValueError, match=r"\(B, K, 4\)"):
        AnatomyCriterion()(p, t)
    with pytest.raises(KeyError, match="presence_logits"):
        AnatomyCriterion()({"boxes": t["boxes"]}, t)


def test_mask_terms_equal_the_mean_over_the_selected_masks_and_their_gradients():
    # the criterion weights the whole (B, K) batch instead of gathering the selected masks: same figures
    g = torch.Generator().manual_seed(3)
    t = _targets(size=24)
    t["present"][1, 4] = False
    mv = torch.rand(2, K, generator=g) > 0.3
    logits = torch.randn(2, K, 24, 24, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    p = dict(_perfect(t), mask_logits=logits)
    out = AnatomyCriterion(ALL_ONES)(p, dict(t, mask_valid=mv))
    sel = mv & t["valid"] & t["present"]
    ref = logits.detach().clone().requires_grad_(True)
    want_dice = dice_loss(ref[sel], t["masks"][sel]).mean()
    want_bce = mask_bce_loss(ref[sel], t["masks"][sel]).mean()
    assert out["loss_mask_dice"].item() == pytest.approx(want_dice.item(), abs=1e-6)
    assert out["loss_mask_bce"].item() == pytest.approx(want_bce.item(), abs=1e-6)
    (out["loss_mask_dice"] + out["loss_mask_bce"]).backward()
    (want_dice + want_bce).backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-7)
    assert float(logits.grad[~sel].abs().sum()) == 0.0  # unselected masks get no gradient
