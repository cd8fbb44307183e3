"""Corrected labels from annotators: parse, validate, merge. No server code here (the app calls it).

An annotator sends corrected boxes either in the project's box form (DESIGN.md section 7)::

    {"regions": [{"id": 1 | "name": "right lung", "box": [x0, y0, x1, y1] | null}, ...]}

(pixel edges on the original image grid; ``null`` = the annotator says the region is not visible), or as
the 3D Slicer markups JSON of ROIs the stock MONAI Label panel sends back (``{"markups": [{"type": "ROI",
"center", "size", "controlPoints": [{"label": region name}], ...}]}``, LPS mm), which is mapped to pixels
with the image's geometry (the inverse of ``predict.slicer_roi_markups``).

Everything is checked before anything is stored (:class:`LabelError` says what is wrong): the JSON
itself, known and non-repeated regions, four finite numbers per box with ``x0 < x1`` and ``y0 < y1``,
boxes inside the image (half a pixel of tolerance). A correction may touch only some regions: the stored
label keeps the other regions as they were and lists the regions a human confirmed, with who and when
(:func:`merge_box_label`), so a trainer knows which boxes to trust.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .anatomy import NUM_REGIONS, REGIONS, REGISTRY_VERSION, region
from .box_calibration import apply_box_calibration

__all__ = ["LabelError", "BoxCorrection", "check_id", "parse_box_correction", "merge_box_label", "mask_correction", "region_stack",
           "check_mask_dims", "check_mask_shape"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_TOLERANCE = 0.5  # px: a box edge may sit this far outside the image (rounding in viewers)


class LabelError(ValueError):
    """A correction that cannot be stored; the message says why (the server answers 4xx with it)."""


def check_id(image_id: Any) -> str:
    """An image id that is safe as a file name (no paths, no ``..``); raises :class:`LabelError`."""
    if not isinstance(image_id, str) or not _ID.match(image_id) or ".." in image_id:
        raise LabelError(f"invalid image id {image_id!r}: letters, digits, '.', '_' and '-' only, no paths")
    return image_id


@dataclass
class BoxCorrection:
    """What an annotator confirmed: boxes for some regions, and regions confirmed absent.

    Attributes:
        image_shape: ``(H, W)`` of the image the boxes are on.
        boxes: ``{region name: [x0, y0, x1, y1]}`` pixel edges.
        absent: Region names the annotator marked as not visible.
    """

    image_shape: tuple[int, int]
    boxes: dict[str, list[float]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)

    @property
    def regions(self) -> list[str]:
        """Every region this correction touches, in registry order."""
        touched = set(self.boxes) | set(self.absent)
        return [r.name for r in REGIONS if r.name in touched]


def _load(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        try:
            obj = obj.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LabelError(f"the label is not UTF-8 text: {e}") from e
    if isinstance(obj, str):
        try:
            return json.loads(obj)
        except json.JSONDecodeError as e:
            raise LabelError(f"malformed JSON: {e}") from e
    return obj


def _region_name(key: Any) -> str:
    try:
        if isinstance(key, bool):
            raise KeyError(key)
        return region(key).name
    except (KeyError, ValueError, TypeError):
        raise LabelError(f"unknown region {key!r}; regions are the registry's ids 1..{NUM_REGIONS} or names "
                         f"(e.g. {REGIONS[0].name!r})") from None


def _check_box(name: str, box: Any, shape: tuple[int, int]) -> list[float]:
    H, W = shape
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise LabelError(f"box of {name!r} must be [x0, y0, x1, y1], got {box!r}")
    vals = []
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise LabelError(f"box of {name!r} must hold four finite numbers, got {box!r}")
        vals.append(float(v))
    x0, y0, x1, y1 = vals
    if not (x0 < x1 and y0 < y1):
        raise LabelError(f"box of {name!r} is empty or inverted: {vals} (need x0 < x1 and y0 < y1)")
    t = _TOLERANCE
    if x0 < -t or y0 < -t or x1 > W + t or y1 > H + t:
        raise LabelError(f"box of {name!r} {vals} lies outside the image ({W} x {H} pixels, W x H)")
    return [min(max(x0, 0.0), W), min(max(y0, 0.0), H), min(max(x1, 0.0), W), min(max(y1, 0.0), H)]


def _from_regions(doc: dict, shape: tuple[int, int]) -> BoxCorrection:
    items = doc.get("regions")
    if not isinstance(items, list):
        raise LabelError("a box label needs a 'regions' list")
    corr = BoxCorrection(shape)
    for it in items:
        if not isinstance(it, dict) or not ("id" in it or "name" in it):
            raise LabelError(f"each region entry needs an 'id' or a 'name' and a 'box', got {it!r}")
        name = _region_name(it["id"] if "id" in it else it["name"])
        if "id" in it and "name" in it and _region_name(it["name"]) != name:
            raise LabelError(f"region entry {it!r}: id and name disagree")
        if name in corr.boxes or name in corr.absent:
            raise LabelError(f"region {name!r} appears twice")
        if "box" not in it:
            raise LabelError(f"region {name!r} has no 'box' (use null for a region that is not visible)")
        if it["box"] is None:
            corr.absent.append(name)
        else:
            corr.boxes[name] = _check_box(name, it["box"], shape)
    if not corr.regions:
        raise LabelError("the correction touches no region")
    return corr


def _from_markups(doc: dict, shape: tuple[int, int], geometry: Any) -> BoxCorrection:
    if geometry is None:
        raise LabelError("a Slicer markups label needs the image geometry to map LPS mm to pixels")
    M = np.asarray(geometry.matrix, float)
    origin = np.asarray(geometry.origin, float)
    inv = np.linalg.inv(M)
    corr = BoxCorrection(shape)
    for mk in doc.get("markups") or []:
        if not isinstance(mk, dict) or mk.get("type") != "ROI":
            raise LabelError(f"only ROI markups can be box corrections, got type {mk.get('type') if isinstance(mk, dict) else mk!r}")
        label = None
        if isinstance(mk.get("label"), dict):
            label = mk["label"].get("value") or mk["label"].get("id")
        cps = mk.get("controlPoints") or []
        if label is None and cps and isinstance(cps[0], dict):
            label = cps[0].get("label")
        label = label if label is not None else mk.get("name")
        name = _region_name(label.lower() if isinstance(label, str) else label)
        if name in corr.boxes:
            raise LabelError(f"region {name!r} appears twice")
        try:
            centre = np.asarray(mk["center"], float).reshape(3)
            size = np.abs(np.asarray(mk["size"], float).reshape(3))
        except (KeyError, TypeError, ValueError) as e:
            raise LabelError(f"ROI of {name!r} needs 'center' and 'size' (3 numbers each): {e}") from None
        if not (np.isfinite(centre).all() and np.isfinite(size).all()):
            raise LabelError(f"ROI of {name!r} has non-finite numbers")
        if str(mk.get("coordinateSystem", "LPS")).upper() == "RAS":
            centre = centre * np.array([-1.0, -1.0, 1.0])
        idx = inv @ (centre - origin)  # (col, row, k), pixel centres at integers
        half_w = size[0] / abs(geometry.spacing[0]) / 2
        half_h = size[1] / abs(geometry.spacing[1]) / 2
        cx, cy = idx[0] + 0.5, idx[1] + 0.5
        corr.boxes[name] = _check_box(name, [cx - half_w, cy - half_h, cx + half_w, cy + half_h], shape)
    if not corr.regions:
        raise LabelError("the markups hold no ROI")
    return corr


def parse_box_correction(obj: Any, image_shape: tuple[int, int], geometry: Any = None) -> BoxCorrection:
    """A validated :class:`BoxCorrection` from JSON text/bytes or a parsed document (see module docstring).

    Args:
        obj: The label (``str``/``bytes`` JSON or a ``dict``).
        image_shape: ``(H, W)`` of the image.
        geometry: ``predict.ImageGeometry`` of the image (needed for Slicer markups only).

    Raises:
        LabelError: with the reason.
    """
    doc = _load(obj)
    if not isinstance(doc, dict):
        raise LabelError(f"a box label must be a JSON object, got {type(doc).__name__}")
    if "markups" in doc:
        return _from_markups(doc, tuple(image_shape), geometry)
    return _from_regions(doc, tuple(image_shape))


def region_stack(masks: np.ndarray) -> np.ndarray:
    """bool ``(29, H, W)`` region masks from region masks or an ``(H, W)`` label map of region ids."""
    a = np.asarray(masks)
    return a != 0 if a.ndim == 3 else np.stack([a == r.id for r in REGIONS])


def mask_correction(masks: np.ndarray, regions: Any = None, box_offsets: np.ndarray | None = None) -> BoxCorrection:
    """The box correction a corrected mask label implies: each region's box is its mask's bounding box,
    in the box convention of the served model when ``box_offsets`` is given.

    Reference boxes need not be their masks' bounding boxes (Chest ImaGenome's and the demo's are not:
    a lung's box starts below its apex). A checkpoint with a box calibration
    (:mod:`anatomy_vlm.box_calibration`) serves a region's box as its mask's bounding box shifted by that
    region's offsets; the same shift turns a corrected mask into the box the model would serve for it, so
    a mask correction does not confirm a box in another convention than the box corrections.

    Args:
        masks: ``(29, H, W)`` region masks or an ``(H, W)`` label map (values = region ids), already
            checked with :func:`check_mask_shape`.
        regions: Region names/ids the annotator corrected (default: every region with a non-empty mask;
            a named region with an empty mask is confirmed absent).
        box_offsets: ``(29, 4)`` relative edge offsets per region (registry order), e.g.
            :func:`anatomy_vlm.box_calibration.calibration_offsets` of the served checkpoint; ``None`` = the
            plain bounding boxes.

    Raises:
        LabelError: an unknown region name, or offsets of the wrong shape.
    """
    stack = region_stack(masks)
    H, W = stack.shape[-2:]
    if box_offsets is not None:
        box_offsets = np.asarray(box_offsets, np.float64)
        if box_offsets.shape != (NUM_REGIONS, 4) or not np.isfinite(box_offsets).all():
            raise LabelError(f"box offsets must be ({NUM_REGIONS}, 4) finite numbers, got {box_offsets.shape}")
    names = [_region_name(x) for x in regions] if regions else [r.name for k, r in enumerate(REGIONS) if stack[k].any()]
    corr = BoxCorrection((int(H), int(W)))
    for n in dict.fromkeys(names):
        k = REGIONS.index(region(n))
        m = stack[k]
        if not m.any():
            corr.absent.append(n)
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)
        if box_offsets is not None:
            box = apply_box_calibration(box[None], box_offsets[k][None], (int(H), int(W)))[0]
        corr.boxes[n] = [float(v) for v in box]
    return corr


def merge_box_label(previous: dict | None, correction: BoxCorrection, image_id: str, user: str | None,
                    when: str, masks: bool = False) -> dict:
    """The label to store: ``previous`` (or nothing) with the corrected regions replaced and listed as
    confirmed (a region confirmed earlier stays confirmed), plus who and when per region. ``masks``: the
    correction came with masks (a mask label), so its regions are also listed under ``confirmed_masks``
    (the trainer then learns those regions' masks from ``labels/final``)."""
    H, W = correction.image_shape
    prev = {}
    confirmed: dict[str, dict] = {}
    if isinstance(previous, dict):
        for r in previous.get("regions", []):
            try:
                prev[_region_name(r.get("id", r.get("name")))] = r
            except LabelError:
                continue
        confirmed = dict(previous.get("confirmed") or {})
    regions = []
    for r in REGIONS:
        if r.name in correction.boxes:
            entry = {"id": r.id, "name": r.name, "box": [round(v, 2) for v in correction.boxes[r.name]],
                     "score": 1.0}
        elif r.name in correction.absent:
            entry = {"id": r.id, "name": r.name, "box": None, "score": 1.0}
        elif r.name in prev:
            entry = dict(prev[r.name])
        else:
            continue
        if r.name in correction.regions:
            confirmed[r.name] = {"user": user or "unknown", "time": when}
        regions.append(entry)
    mask_done = set(previous.get("confirmed_masks") or []) if isinstance(previous, dict) else set()
    if masks:
        mask_done |= set(correction.regions)
    out = {"image": image_id, "width": W, "height": H, "registry": REGISTRY_VERSION,
           "source": "annotator corrections", "regions": regions,
           "confirmed": {k: confirmed[k] for k in (r.name for r in REGIONS) if k in confirmed}}
    if mask_done:
        out["confirmed_masks"] = [r.name for r in REGIONS if r.name in mask_done]
    return out


def check_mask_dims(shape: tuple[int, ...], image_shape: tuple[int, int]) -> None:
    """Mask array dimensions of a correction: ``(29, H, W)`` region masks or an ``(H, W)`` label map of the
    image's size (checkable from a file header alone). Raises :class:`LabelError`."""
    H, W = image_shape
    if tuple(shape) not in ((NUM_REGIONS, H, W), (H, W)):
        raise LabelError(f"masks are {tuple(shape)} but the image is {H} x {W} (H x W): expected "
                         f"({NUM_REGIONS}, {H}, {W}) region masks or a ({H}, {W}) label map")


def check_mask_shape(masks: np.ndarray, image_shape: tuple[int, int]) -> None:
    """Masks of a correction must be the image's size (:func:`check_mask_dims`), and a label map must hold
    values 0..29. Raises :class:`LabelError`."""
    a = np.asarray(masks)
    check_mask_dims(a.shape, image_shape)
    if a.ndim == 2 and a.size and (a.min() < 0 or a.max() > NUM_REGIONS):
        raise LabelError(f"a label map must hold region ids 0..{NUM_REGIONS}, got {a.min()}..{a.max()}")
