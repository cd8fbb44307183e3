"""Per-region box calibration: the systematic offset between the boxes a checkpoint serves and the boxes
of the ground-truth convention, fitted on a held-out split and stored in the checkpoint.

The dense mask head's box is the bounding box of the region's mask. The reference boxes follow their own
rules (Chest ImaGenome's, and the demo builder's, which mimic them): a lung box starts below the apex of
its mask, a hemidiaphragm box reaches further down than the dome's mask, and so on. Such differences are
the same on every image, so they are a per-region, per-edge offset. It is measured relative to the
predicted box's size (``dx0 / w, dy0 / h, dx1 / w, dy1 / h``, ``gt - predicted``), as the median over the
images of a split where the region is present (robust to the odd failed mask), and added back at
prediction time (:meth:`anatomy_vlm.predict.Predictor.predict` applies it to mask-derived boxes; the
decoder's fallback boxes and the masks themselves are not changed).

Fit it on the validation split, never on the test split the figures are reported on:

    anatomy-vlm calibrate-boxes --checkpoint apps/anatomy_vlm/model/anatomy_vlm.pt --demo data/demo --split val

The checkpoint's ``meta["box_calibration"]`` then holds ``{"offsets": (29, 4) list, "split", "n_images",
"min_images", "fitted": ISO time, "command", "map_before" / "map_after": mAP on the fitting split,
"fingerprint": :meth:`~anatomy_vlm.data.DemoDataset.fingerprint` of that split}``. A
fine-tuned checkpoint (``train`` with ``init_checkpoint``) carries its parent's calibration over.

Annotators' corrections can refit it (:func:`refit_from_corrections`; a fine-tuning round does with
``refit_boxes``, off by default): the boxes annotators confirmed are the reference convention on the images
the model is being adapted to, so every region with at least ``min_images`` confirmed boxes gets the median
offset measured there, the others keep the parent's.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import numpy as np

from .anatomy import NUM_REGIONS

__all__ = ["MIN_IMAGES", "apply_box_calibration", "calibrate_checkpoint", "calibration_offsets",
           "fit_box_calibration", "refit_from_corrections", "shown_path"]

MIN_IMAGES = 5
"""A region present in fewer images of the fitting split keeps offset 0."""


def fit_box_calibration(pred_boxes: np.ndarray, gt_boxes: np.ndarray, present: np.ndarray,
                        min_images: int = MIN_IMAGES, fallback: np.ndarray | None = None) -> np.ndarray:
    """Median relative edge offsets per region.

    Args:
        pred_boxes, gt_boxes: ``(N, 29, 4)`` ``[x0, y0, x1, y1]`` pixels, N images.
        present: ``(N, 29)`` bool, regions with a ground-truth box.
        fallback: ``(29, 4)`` offsets for the regions with fewer than ``min_images`` (default 0).

    Returns:
        ``(29, 4)`` float64 offsets (fractions of the predicted box's width/height).

    Raises:
        ValueError: arrays of the wrong shape.
    """
    p, g, m = np.asarray(pred_boxes, np.float64), np.asarray(gt_boxes, np.float64), np.asarray(present, bool)
    if p.ndim != 3 or p.shape[1:] != (NUM_REGIONS, 4) or g.shape != p.shape or m.shape != p.shape[:2]:
        raise ValueError(f"expected boxes (N, {NUM_REGIONS}, 4) twice and present (N, {NUM_REGIONS}); got "
                         f"{p.shape}, {g.shape}, {m.shape}")
    size = _sizes(p)
    rel = (g - p) / size
    out = np.zeros((NUM_REGIONS, 4)) if fallback is None else np.array(fallback, np.float64, copy=True)
    for k in range(NUM_REGIONS):
        ok = m[:, k] & np.isfinite(rel[:, k]).all(-1)
        if ok.sum() >= int(min_images):
            out[k] = np.median(rel[ok, k], axis=0)
    return out


def apply_box_calibration(boxes: np.ndarray, offsets: np.ndarray, image_size: tuple[int, int] | None = None
                          ) -> np.ndarray:
    """``boxes`` ``(K, 4)`` shifted by ``offsets`` ``(K, 4)`` (rows matched), clipped to the image
    ``(H, W)`` when given; a box that would turn over keeps its predicted edges."""
    b = np.asarray(boxes, np.float64)
    out = b + np.asarray(offsets, np.float64) * _sizes(b)
    if image_size is not None:
        H, W = image_size
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, W)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, H)
    bad = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    out[bad] = b[bad]
    return out.astype(np.asarray(boxes).dtype, copy=False)


def calibration_offsets(meta: dict[str, Any] | None) -> np.ndarray | None:
    """The ``(29, 4)`` offsets stored in checkpoint metadata, or None."""
    cal = (meta or {}).get("box_calibration")
    if not cal:
        return None
    off = np.asarray(cal.get("offsets"), np.float64)
    if off.shape != (NUM_REGIONS, 4) or not np.isfinite(off).all():
        raise ValueError(f"box_calibration offsets must be ({NUM_REGIONS}, 4) finite numbers, got {off.shape}")
    return off


def calibrate_checkpoint(checkpoint: str | os.PathLike, demo_root: str | os.PathLike, split: str = "val",
                         cache_dir: str | os.PathLike | None = None, progress: bool = True,
                         min_images: int = MIN_IMAGES) -> dict[str, Any]:
    """Fit the calibration of ``checkpoint`` on a demo split and write it into the checkpoint (atomically).

    Returns the stored ``box_calibration`` dict. Refits from the uncalibrated boxes when the checkpoint
    already has one.

    Raises:
        ValueError: the test split (the figures are reported on it), or a checkpoint whose boxes do not
            come from masks (only the dense mask head's are calibrated).
    """
    from .checkpoint import update_checkpoint_meta
    from .data import DemoDataset
    from .evaluate import evaluate_detection
    from .predict import Predictor

    if split == "test":
        raise ValueError("fit the box calibration on the val (or train) split: test is where it is measured")
    p = Predictor.from_checkpoint(checkpoint, cache_dir=cache_dir)
    if not getattr(p.model, "boxes_from_masks", False):
        raise ValueError(f"{checkpoint}: only checkpoints whose boxes come from the dense mask head are calibrated")
    p.box_calibration = None  # fit on the raw boxes
    ds = DemoDataset(demo_root, split)
    if len(ds) == 0:
        raise ValueError(f"{demo_root}: split {split!r} has no studies")
    it: Any = range(len(ds))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"calibrate boxes ({split})", unit="image")
    raw_a, gt_a, pres_a, rows, scores, sizes = _raw_mask_boxes(p, ds, it)
    off = fit_box_calibration(raw_a, gt_a, pres_a & rows, min_images)
    after = np.stack([np.where(rows[i][:, None], apply_box_calibration(raw_a[i], off, sizes[i]), raw_a[i])
                      for i in range(len(raw_a))])

    def _map(boxes):
        return evaluate_detection([{"id": i, "boxes": boxes[i], "scores": scores[i]} for i in range(len(boxes))],
                                  [{"id": i, "boxes": gt_a[i], "present": pres_a[i]} for i in range(len(boxes))])["mAP"]

    cal = {"offsets": np.round(off, 5).tolist(), "split": split, "n_images": len(ds), "min_images": int(min_images),
           "demo_root": str(Path(demo_root)), "fingerprint": ds.fingerprint(),
           "map_before": round(float(_map(raw_a)), 4),
           "map_after": round(float(_map(after)), 4),
           "fitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": f"anatomy-vlm calibrate-boxes --checkpoint {shown_path(checkpoint)} "
                      f"--demo {shown_path(demo_root)} "
                      f"--split {split}"}
    update_checkpoint_meta(checkpoint, {"box_calibration": cal})
    return cal


def refit_from_corrections(checkpoint: str | os.PathLike, corrections: Any, cache_dir: str | os.PathLike | None = None,
                           min_images: int = MIN_IMAGES) -> dict[str, Any] | None:
    """Refit ``checkpoint``'s box calibration on annotators' confirmed boxes and write it (atomically).

    Args:
        checkpoint: A dense-head checkpoint (e.g. the candidate of a fine-tuning round).
        corrections: A :class:`~anatomy_vlm.data.CorrectionsDataset` (only confirmed, visible regions count).
        min_images: Regions confirmed on fewer images keep the checkpoint's current offsets.

    Returns:
        The stored ``box_calibration`` dict (``split: "corrections"``, ``refit_regions``: the regions whose
        offsets were fitted here, ``previous``: the offsets it replaced), or ``None`` when nothing could
        be refitted (no dense head, or no region with ``min_images`` confirmed boxes): the file is unchanged.
    """
    from .anatomy import REGION_NAMES
    from .checkpoint import update_checkpoint_meta
    from .predict import Predictor

    p = Predictor.from_checkpoint(checkpoint, cache_dir=cache_dir)
    if not getattr(p.model, "boxes_from_masks", False) or len(corrections) == 0:
        return None
    before = p.box_calibration
    p.box_calibration = None  # fit on the raw mask boxes
    raw, gts, present, rows, _, _ = _raw_mask_boxes(p, corrections, range(len(corrections)))
    valid = np.stack([corrections[i]["valid"] for i in range(len(corrections))])
    ok_a = valid & present & rows
    fitted = ok_a.sum(0) >= int(min_images)
    if not fitted.any():
        return None
    prev = np.zeros((NUM_REGIONS, 4)) if before is None else before
    off = fit_box_calibration(raw, gts, ok_a, min_images, fallback=prev)
    cal = {"offsets": np.round(off, 5).tolist(), "split": "corrections", "n_images": len(corrections),
           "min_images": int(min_images), "refit_regions": [REGION_NAMES[k] for k in np.flatnonzero(fitted)],
           "previous": np.round(prev, 5).tolist(),
           "fitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    update_checkpoint_meta(checkpoint, {"box_calibration": cal})
    return cal


def _raw_mask_boxes(predictor: Any, ds: Any, indices: Any) -> tuple:
    """Predict each study of ``ds`` at ``indices``; returns stacked ``(boxes, gt_boxes, present, mask_rows)``
    (``mask_rows``: the box came from the mask) and the per-image ``scores`` and ``image_shape`` lists."""
    raw, mask_rows, gts, pres, scores, sizes = [], [], [], [], [], []
    for i in indices:
        s = ds[i]
        pr = predictor.predict(s["meta"]["image_path"])
        raw.append(pr.boxes)
        mask_rows.append(np.array([src == "mask" for src in pr.box_source]))
        gts.append(s["boxes"])
        pres.append(s["present"])
        scores.append(pr.scores)
        sizes.append(pr.image_shape)
    return np.stack(raw), np.stack(gts), np.stack(pres), np.stack(mask_rows), scores, sizes


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when inside it (the metadata says how it was made)."""
    rel = os.path.relpath(os.path.abspath(path))
    return str(path) if rel.startswith("..") else rel


def _sizes(b: np.ndarray) -> np.ndarray:
    w = np.maximum(b[..., 2] - b[..., 0], 1.0)
    h = np.maximum(b[..., 3] - b[..., 1], 1.0)
    return np.stack([w, h, w, h], -1)
