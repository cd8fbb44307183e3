"""Losses for the anatomy queries: a criterion with named, weighted terms (DETR's ``SetCriterion`` style).

Terms (all scalars; each is a mean over the entries it is defined on):

==================  ===============================================  ===========================
name                what                                             counted over
==================  ===============================================  ===========================
``loss_bbox``       L1 on normalised ``(cx, cy, w, h)``, summed      valid & present regions
                    over the 4 coordinates (DETR)
``loss_giou``       ``1 - GIoU`` of the boxes as ``xyxy``            valid & present regions
                    (MONAI ``box_pair_giou``)
``loss_presence``   BCE with logits on presence                      valid regions
``loss_mask_dice``  soft Dice on ``sigmoid(mask_logits)``            regions with a target mask
``loss_mask_bce``   per-pixel BCE with logits, mean per region       regions with a target mask
``loss_mask_proj``  Dice of the mask's row/column maxima against     regions with a box but no
                    the box's extent (BoxInst)                       target mask
==================  ===============================================  ===========================

The total ``loss`` is ``sum(weights[name] * losses[name])`` over the terms that could be computed
(mask terms only when both mask logits and target masks are given).

**No Hungarian matching.** DETR matches its anonymous queries to ground-truth objects with the
Hungarian algorithm because any query may predict any object. Here query ``i`` is *defined* as
region ``i`` of the registry (``anatomy.REGIONS[i]``, label id ``i + 1``) and each image has at most
one instance of each region, so the matching is the identity and predictions and targets are
compared index by index. :func:`match_identity` makes that step explicit.

**Partial labels.** ``valid`` marks the regions whose label is known for an image (present or
confirmed absent): a human confirmed it, or the ground truth lists it. Invalid regions contribute
nothing to any term. Regions that are valid but absent (``present`` False) only enter the presence
term; their boxes and masks are ignored. ``mask_valid`` can narrow the mask terms further (an image
with boxes but no masks, e.g. Chest ImaGenome, or a box-only correction); a region with a known box
and no known mask trains the masks through ``loss_mask_proj`` (:func:`projection_loss`).

Coordinate contract: boxes are ``(cx, cy, w, h)`` normalised to ``[0, 1]`` on the model's input frame
(see :func:`anatomy_vlm.data.to_model_targets`); ``x`` is the column axis. GIoU is scale-invariant,
so computing it on normalised boxes equals computing it in pixels of a square input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from monai.data.box_utils import box_pair_giou

from .model.boxes import box_cxcywh_to_xyxy

__all__ = [
    "LOSS_TERMS", "DEFAULT_WEIGHTS", "AnatomyCriterion", "BatchTargets", "match_identity",
    "cxcywh_to_xyxy", "l1_box_loss", "giou_loss", "presence_loss", "dice_loss", "mask_bce_loss",
]

LOSS_TERMS: tuple[str, ...] = ("loss_bbox", "loss_giou", "loss_presence", "loss_mask_dice", "loss_mask_bce",
                               "loss_mask_proj")
"""Names of the terms the criterion can compute."""

DEFAULT_WEIGHTS: dict[str, float] = {
    "loss_bbox": 5.0, "loss_giou": 2.0, "loss_presence": 1.0, "loss_mask_dice": 1.0, "loss_mask_bce": 1.0,
    "loss_mask_proj": 1.0,
}
"""DETR's box weights (L1 5, GIoU 2); presence and mask terms at 1."""

# Accepted names for the prediction fields (the model's output dataclass or a dict).
_PRED_FIELDS = {
    "boxes": ("boxes", "pred_boxes"),
    "presence_logits": ("presence_logits",),
    "mask_logits": ("mask_logits", "pred_masks"),
}


@dataclass
class BatchTargets:
    """Targets for a batch of ``B`` images on the model's input frame (``K = NUM_REGIONS = 29``).

    Attributes:
        boxes: float ``(B, K, 4)`` ``(cx, cy, w, h)`` in ``[0, 1]``; rows where ``present`` is False are
            ignored (any value).
        present: bool ``(B, K)``: the region is in the image.
        valid: bool ``(B, K)``: the region's label is known (present or confirmed absent); defaults
            to all True.
        masks: optional float/bool ``(B, K, H, W)`` target masks in ``[0, 1]``.
        mask_valid: optional bool ``(B, K)``: which target masks are real; defaults to
            ``valid & present`` (only used when ``masks`` is given).
    """

    boxes: torch.Tensor
    present: torch.Tensor
    valid: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    mask_valid: torch.Tensor | None = None


# ------------------------------------------------------------------------------------ pure helpers
def match_identity(num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query-to-region assignment: query ``i`` is region ``i`` (no Hungarian matching needed).

    Returns:
        ``(query_idx, region_idx)``, both ``arange(num_queries)``; the form DETR's matcher returns.
    """
    idx = torch.arange(num_queries)
    return idx, idx


cxcywh_to_xyxy = box_cxcywh_to_xyxy
"""``(..., 4)`` ``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)``: :func:`anatomy_vlm.model.boxes.box_cxcywh_to_xyxy`."""


def l1_box_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-box L1: ``(N, 4)``, ``(N, 4)`` -> ``(N,)``, summed over the 4 coordinates."""
    return (pred - target).abs().sum(-1)


def giou_loss(pred_xyxy: torch.Tensor, target_xyxy: torch.Tensor) -> torch.Tensor:
    """Per-box ``1 - GIoU``: ``(N, 4)``, ``(N, 4)`` xyxy -> ``(N,)`` in ``[0, 2]``.

    Uses MONAI's ``box_pair_giou`` (elementwise over pairs; ``box_giou`` would give the ``(N, N)``
    matrix of all pairs). An empty input gives an empty output.
    """
    if pred_xyxy.shape[0] == 0:
        return pred_xyxy.new_zeros(0)
    return 1.0 - box_pair_giou(pred_xyxy, target_xyxy)


def presence_loss(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-entry BCE with logits: ``(N,)``, ``(N,)`` -> ``(N,)``."""
    return F.binary_cross_entropy_with_logits(logits, present.to(logits.dtype), reduction="none")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask soft Dice loss: ``(..., H, W)`` logits, ``(..., H, W)`` targets in [0, 1] -> ``(...)``.

    ``1 - (2 |p t| + s) / (|p| + |t| + s)`` with ``p = sigmoid(logits)`` (DETR's form, ``s = 1``).
    Any leading shape (``(N,)`` masks or a ``(B, K)`` batch) and any memory format.
    """
    p = logits.sigmoid()
    t = target.to(p.dtype)
    return 1.0 - (2.0 * (p * t).sum((-2, -1)) + smooth) / (p.sum((-2, -1)) + t.sum((-2, -1)) + smooth)


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask BCE with logits, mean over pixels: ``(..., H, W)``, ``(..., H, W)`` -> ``(...)``."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean((-2, -1))


def projection_loss(logits: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Box-supervised mask loss (BoxInst's projection term): ``(N, h, w)`` logits, ``(N, 4)`` boxes
    normalised to the frame -> ``(N,)``. The mask's maximum over rows and over columns must cover
    exactly the box's extent on each axis (Dice on the two 1D profiles). The served boxes of the dense
    head are read from the same row/column maxima, so a box correction trains what is served.
    """
    p = logits.sigmoid()
    N, h, w = p.shape
    xs = (torch.arange(w, device=p.device, dtype=p.dtype) + 0.5) / w
    ys = (torch.arange(h, device=p.device, dtype=p.dtype) + 0.5) / h
    b = boxes_xyxy.to(p.dtype)
    tx = ((xs[None] >= b[:, :1]) & (xs[None] <= b[:, 2:3])).to(p.dtype)  # (N, w)
    ty = ((ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])).to(p.dtype)  # (N, h)
    loss = 0.0
    for prof, t in ((p.amax(1), tx), (p.amax(2), ty)):
        loss = loss + 1.0 - (2.0 * (prof * t).sum(-1) + 1.0) / (prof.pow(2).sum(-1) + t.sum(-1) + 1.0)
    return loss


def _weighted_mean(values: torch.Tensor, sel: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the entries where the bool ``sel`` (same shape) is True: the same figure
    as ``values[sel].mean()`` without the gather (and its scatter in backward); 0 connected to
    ``anchor``'s graph when nothing is selected."""
    n = sel.sum()
    if int(n) == 0:
        return anchor.sum() * 0.0
    return (values * sel.to(values.dtype)).sum() / n.to(values.dtype)


def _masked_mean(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of a 1D tensor; 0 connected to ``anchor``'s graph when empty (so backward still works)."""
    if values.numel() == 0:
        return anchor.sum() * 0.0
    return values.mean()


def _field(obj: Any, names: tuple[str, ...], required: bool, what: str) -> Any:
    for n in names:
        v = obj.get(n) if isinstance(obj, Mapping) else getattr(obj, n, None)
        if v is not None:
            return v
    if required:
        raise KeyError(f"{what} has no {' / '.join(repr(n) for n in names)}")
    return None


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, H, W)`` target masks -> ``(N, h, w)`` float in [0, 1] (area average when shrinking)."""
    m = masks.to(torch.float32)
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    if m.shape[0] == 0:
        return m.new_zeros((0, *size))
    shrink = size[0] <= m.shape[-2] and size[1] <= m.shape[-1]
    return F.interpolate(m[:, None], size=size, mode="area" if shrink else "nearest")[:, 0]


# ----------------------------------------------------------------------------------- the criterion
class AnatomyCriterion(torch.nn.Module):
    """Named, weighted losses for the anatomy queries (identity matching; see the module docstring).

    Args:
        weights: ``{term: weight}`` for terms in :data:`LOSS_TERMS`; terms not named get weight 0
            (still computed and returned, so they can be logged). ``None`` uses
            :data:`DEFAULT_WEIGHTS`.

    Raises:
        ValueError: an unknown term name or a negative / non-finite weight.

    Call with ``(predictions, targets)``:

    * predictions: a dataclass or dict with ``boxes`` float ``(B, K, 4)`` ``(cx, cy, w, h)`` in [0, 1],
      ``presence_logits`` float ``(B, K)``, optional ``mask_logits`` float ``(B, K, h, w)``
      (``pred_boxes`` / ``pred_masks`` are accepted as names too).
    * targets: :class:`BatchTargets` or a dict with its fields (``boxes``, ``present``, optional
      ``valid``, ``masks`` ``(B, K, H, W)``, ``mask_valid``). Target masks whose size differs from
      the logits are resized to the logits' size (area average when shrinking), giving soft targets.

    Returns:
        ``{"loss_bbox", "loss_giou", "loss_presence"[, "loss_mask_dice", "loss_mask_bce"], "loss"}``,
        scalar tensors; ``loss`` is the weighted total. Terms with nothing to count over are 0 (and
        still differentiable).
    """

    def __init__(self, weights: Mapping[str, float] | None = None):
        super().__init__()
        w = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = sorted(set(w) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; valid terms: {', '.join(LOSS_TERMS)}")
        for k, v in w.items():
            if not (float(v) >= 0.0 and float(v) != float("inf")):
                raise ValueError(f"weight of {k} must be a finite number >= 0, got {v!r}")
        self.weights: dict[str, float] = {k: float(w.get(k, 0.0)) for k in LOSS_TERMS}

    def forward(self, predictions: Any, targets: BatchTargets | Mapping[str, Any]) -> dict[str, torch.Tensor]:
        pred_boxes = _field(predictions, _PRED_FIELDS["boxes"], True, "predictions")
        pred_presence = _field(predictions, _PRED_FIELDS["presence_logits"], True, "predictions")
        pred_masks = _field(predictions, _PRED_FIELDS["mask_logits"], False, "predictions")
        if pred_masks is not None:  # (channels-last logits of the dense head: the reductions below run ~2x faster)
            pred_masks = pred_masks.contiguous()
        tgt_boxes = _field(targets, ("boxes",), True, "targets").to(pred_boxes)
        present = _field(targets, ("present",), True, "targets").to(device=pred_boxes.device, dtype=torch.bool)
        valid = _field(targets, ("valid",), False, "targets")
        valid = torch.ones_like(present) if valid is None else valid.to(device=present.device, dtype=torch.bool)
        tgt_masks = _field(targets, ("masks",), False, "targets")
        mask_valid = _field(targets, ("mask_valid",), False, "targets")

        B, K = pred_presence.shape
        if pred_boxes.shape != (B, K, 4) or tgt_boxes.shape != (B, K, 4):
            raise ValueError(f"boxes must be (B, K, 4) = ({B}, {K}, 4); got predictions "
                             f"{tuple(pred_boxes.shape)}, targets {tuple(tgt_boxes.shape)}")
        if present.shape != (B, K) or valid.shape != (B, K):
            raise ValueError(f"present and valid must be (B, K) = ({B}, {K}); got "
                             f"{tuple(present.shape)} and {tuple(valid.shape)}")

        # Identity matching: query i <-> region i, so predictions and targets are compared in place.
        q_idx, r_idx = match_identity(K)
        pred_boxes, pred_presence = pred_boxes[:, q_idx], pred_presence[:, q_idx]
        tgt_boxes, present, valid = tgt_boxes[:, r_idx], present[:, r_idx], valid[:, r_idx]

        box_sel = valid & present                                     # (B, K)
        pb, tb = pred_boxes[box_sel], tgt_boxes[box_sel]              # (N, 4) each
        losses = {
            "loss_bbox": _masked_mean(l1_box_loss(pb, tb), pred_boxes),
            "loss_giou": _masked_mean(giou_loss(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb)), pred_boxes),
            "loss_presence": _masked_mean(presence_loss(pred_presence[valid], present[valid]), pred_presence),
        }

        if pred_masks is not None and tgt_masks is not None:
            if pred_masks.shape[:2] != (B, K) or tgt_masks.shape[:2] != (B, K):
                raise ValueError(f"masks must be (B, K, H, W) with (B, K) = ({B}, {K}); got predictions "
                                 f"{tuple(pred_masks.shape)}, targets {tuple(tgt_masks.shape)}")
            known = None if mask_valid is None else mask_valid.to(box_sel.device, torch.bool)
            mvalid = box_sel if known is None else (known & box_sel)          # (B, K)
            # The mask terms are computed on the whole (B, K, h, w) batch and averaged over the selected
            # masks (the same figure as gathering them first): nearly every mask is selected in training,
            # and the gather would copy the batch's logits once more and scatter their gradient back.
            # (the matching is the identity, so mask logits and targets are used in place, unindexed)
            if bool(mvalid.any()):
                target = tgt_masks.to(pred_masks.device)
                if tuple(target.shape[-2:]) != tuple(pred_masks.shape[-2:]):
                    target = _resize_masks(target.flatten(0, 1), tuple(pred_masks.shape[-2:])).view(
                        B, K, *pred_masks.shape[-2:])
                losses["loss_mask_dice"] = _weighted_mean(dice_loss(pred_masks, target), mvalid, pred_masks)
                losses["loss_mask_bce"] = _weighted_mean(mask_bce_loss(pred_masks, target), mvalid, pred_masks)
            else:
                losses["loss_mask_dice"] = losses["loss_mask_bce"] = pred_masks.sum() * 0.0
            # regions with a known box but no known mask (box-only corrections): the projection term
            psel = box_sel & ~known if known is not None else torch.zeros_like(box_sel)
            losses["loss_mask_proj"] = _masked_mean(
                projection_loss(pred_masks[psel], cxcywh_to_xyxy(tgt_boxes[psel])), pred_masks)

        total = sum((self.weights[k] * v for k, v in losses.items()), pred_boxes.sum() * 0.0)
        losses["loss"] = total
        return losses

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.weights.items())


# ---------------------------------------------------------------------------------------- language stage
def calibrated_infonce(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor | float
                       ) -> torch.Tensor:
    """Symmetric InfoNCE over ``N`` pairs ``(x_i, y_i)`` with fVLM's false-negative calibration.

    CLIP's loss treats every other pair of the batch as a negative. In a radiology batch many "other"
    pairs say the same thing (two normal lungs, two effusions): pushing them apart teaches the model
    that identical findings differ. Here pair ``j`` is a negative of pair ``i`` only when their
    ``groups`` differ; same-group entries other than the pair itself are left out of the softmax.

    Args:
        x, y: ``(N, J)`` unit vectors (regions or images; sentences or reports).
        groups: ``(N,)`` integer category per pair (``normal`` or a finding; a report's finding set).
        scale: Similarity temperature (``exp(logit_scale)``).

    Returns:
        Scalar: mean of the x->y and y->x cross-entropies (0 when nothing can be contrasted).
    """
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0.0
    logits = scale * (x @ y.t())
    g = groups.to(x.device)
    same = (g[:, None] == g[None, :]) & ~torch.eye(n, dtype=torch.bool, device=x.device)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(n, device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def grounding_loss(regions: torch.Tensor, sentences: torch.Tensor, image_index: torch.Tensor,
                   positives: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Each positive sentence against the ``K`` regions of its own image (multi-positive softmax).

    Args:
        regions: ``(B, K, J)`` unit region embeddings of the batch.
        sentences: ``(M, J)`` unit sentence embeddings.
        image_index: ``(M,)`` which image of the batch each sentence belongs to.
        positives: ``(M, K)`` bool, the regions the sentence speaks of (with their parents).
        scale: Similarity temperature.

    Returns:
        Scalar ``-mean_m log sum_{k in positives_m} softmax_k(scale * <s_m, r_k>)``.
    """
    logits = scale * torch.einsum("mj,mkj->mk", sentences, regions[image_index])
    logp = torch.log_softmax(logits, -1)
    return -(torch.logsumexp(logp.masked_fill(~positives, float("-inf")), -1)).mean()
