"""Rules that derive the 29 Chest ImaGenome regions from projected CT anatomy.

Input: for every detector pixel, the set of CT structure groups its ray passed through
(``Projector.project_groups``), and the pixel size at the patient. Output: one boolean mask per
registry region (overlaps allowed: zones lie inside their lung) and a box per mask.

Image conventions are those of a PA film: row 0 at the top (head), column 0 on the image's left,
which is the PATIENT'S RIGHT. Hence for the right lung "lateral" means small columns and "medial"
large columns; for the left lung the reverse. Distances in the rules are in mm at the patient
(``mm`` argument = detector pixel size / magnification).

The rules, region by region (ids from :mod:`anatomy_vlm.anatomy`):

* right / left lung: union of the projected lobes of that lung (right: upper, middle, lower; left:
  upper, lower), largest connected component, holes filled.
* upper / mid / lower lung zone: the lung split by height into thirds between the lung's top row and
  its bottom row (bottom = lowest projected lung pixel, i.e. the posterior costophrenic recess).
* apical zone: lung pixels above the lower edge of the same side's clavicle, column by column (the
  edge is interpolated across columns the clavicle does not cover; if no clavicle is in the image,
  the top 12 % of the lung's height).
* costophrenic angle: lung pixels inside a 35 mm square anchored at the lung's lateral-inferior
  corner (lowest lung pixel within the lateral quarter of the lung's width; the square extends up
  from it and medially from the lung's most lateral column in its lower third).
* hemidiaphragm: a 10 mm band centred on the diaphragm outline, within the columns of that lung.
  The outline is, per column, the first row (from the top) at which the ray meets an abdominal
  organ (liver, spleen, stomach, bowel, kidneys ...), i.e. the dome.
* hilar structures: rows from 5 mm above the carina to 65 mm below it; within them, the visible lung
  (lung minus the mediastinal shadow) within 30 mm of its medial edge, plus that side's main
  bronchus and pulmonary veins (derived bronchi and TotalSegmentator's pulmonary_vein) in those rows.
* trachea, svc, cardiac silhouette (heart + left atrial appendage), right/left clavicle: the
  projected structure.
* spine: projected vertebrae (C5-L3 in the CT) in rows down to the lowest lung row.
* carina: a disc of 10 mm radius centred on the lowest point of the projected trachea
  (TotalSegmentator's trachea ends at the bifurcation).
* cavoatrial junction: a disc of 10 mm radius centred on the lowest point of the projected SVC,
  where it enters the right atrium.
* right atrium: the heart's right border: heart pixels in the right-most 35 % of the heart's width,
  below the cavoatrial junction (the heart is one label in the CT; on a frontal film the right
  border is formed by the right atrium).
* aortic arch: projected aorta in rows from its top down to the carina or 40 mm below its top,
  whichever is higher (the aortic knob).
* mediastinum: per row, everything between the left-most and right-most pixel of the mediastinal
  structures (heart, aorta, SVC, great vessels, trachea, oesophagus, pulmonary veins), in rows from
  the lungs' top to the heart's lowest row. This is also the "mediastinal shadow" used above.
* upper mediastinum: the mediastinum above the carina (the superior mediastinum ends at the plane of
  the sternal angle, at about the level of the carina).
* abdomen: projected abdominal organs (liver, spleen, stomach, bowel, kidneys, pancreas, IVC, ...).

Boxes: ``[x0, y0, x1, y1]`` in pixel-edge coordinates of the image grid: x0 = first column of the
mask, x1 = last column + 1 (likewise rows), so a one-pixel mask at (r, c) has box ``[c, r, c+1, r+1]``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..anatomy import REGIONS, NUM_REGIONS
from .ct import GROUP_NAMES, LUNG_GROUPS_LEFT, LUNG_GROUPS_RIGHT


class RegionRuleError(RuntimeError):
    """A region could not be derived from the projection (e.g. structure cropped out of view)."""


def _g(groups: np.ndarray, *names: str) -> np.ndarray:
    out = np.zeros(groups.shape[1:], bool)
    for n in names:
        out |= groups[GROUP_NAMES.index(n)]
    return out


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _rows(mask):
    r = np.flatnonzero(mask.any(1))
    return (int(r[0]), int(r[-1])) if len(r) else None


def _cols(mask):
    c = np.flatnonzero(mask.any(0))
    return (int(c[0]), int(c[-1])) if len(c) else None


def _disc(shape, r, c, radius_px):
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - r) ** 2 + (cc - c) ** 2 <= radius_px ** 2


def _row_hull(mask: np.ndarray) -> np.ndarray:
    """Per row, fill between the first and last True pixel."""
    out = np.zeros_like(mask)
    rows = np.flatnonzero(mask.any(1))
    for r in rows:
        c = np.flatnonzero(mask[r])
        out[r, c[0]: c[-1] + 1] = True
    return out


def mask_to_box(mask: np.ndarray) -> list[int] | None:
    """Box ``[x0, y0, x1, y1]`` (pixel edges, x = column) of a 2D mask, ``None`` if empty."""
    rr, cc = _rows(mask), _cols(mask)
    if rr is None:
        return None
    return [cc[0], rr[0], cc[1] + 1, rr[1] + 1]


def derive_regions(groups: np.ndarray, mm: float) -> np.ndarray:
    """Apply the rules of this module.

    Args:
        groups: bool (G, H, W), projected structure groups in the order of ``GROUP_NAMES``.
        mm: pixel size at the patient, mm.

    Returns:
        bool (29, H, W), index ``id - 1`` for each registry region.

    Raises:
        RegionRuleError: when a structure the rules depend on (a lung, the trachea, the heart) is not
            in view.
    """
    H, W = groups.shape[1:]
    px = lambda d_mm: max(1, int(round(d_mm / mm)))  # noqa: E731
    out: dict[str, np.ndarray] = {}

    lungs = {}
    for side, names in (("right", LUNG_GROUPS_RIGHT), ("left", LUNG_GROUPS_LEFT)):
        m = _g(groups, *names)
        if m.sum() < 100:
            raise RegionRuleError(f"{side} lung is not in view")
        lungs[side] = ndimage.binary_fill_holes(_largest(m))
    trachea = _g(groups, "trachea")
    heart = _g(groups, "heart")
    svc = _g(groups, "svc")
    if trachea.sum() < 10 or heart.sum() < 100 or svc.sum() < 10:
        raise RegionRuleError("trachea, heart or SVC is not in view")
    abdomen = _g(groups, "liver", "abdomen_left", "abdomen_other")
    med_struct = _g(groups, "heart", "aorta", "svc", "great_vessels", "trachea", "esophagus",
                    "pulmonary_vein")

    # landmarks
    t_rows = _rows(trachea)
    r_car = t_rows[1]
    c_car = float(np.flatnonzero(trachea[max(r_car - 2, 0): r_car + 1].any(0)).mean())
    s_rows = _rows(svc)
    r_caj = s_rows[1]
    c_caj = float(np.flatnonzero(svc[max(r_caj - 2, 0): r_caj + 1].any(0)).mean())
    lung_top = min(_rows(lungs["right"])[0], _rows(lungs["left"])[0])
    lung_bot = max(_rows(lungs["right"])[1], _rows(lungs["left"])[1])
    h_rows = _rows(heart)

    mediastinum = _row_hull(med_struct)
    rowsel = np.zeros((H, 1), bool)
    rowsel[lung_top: h_rows[1] + 1] = True
    mediastinum &= rowsel
    out["mediastinum"] = mediastinum
    upper = np.zeros((H, 1), bool)
    upper[: r_car + 1] = True
    out["upper mediastinum"] = mediastinum & upper

    rr = np.arange(H)[:, None]
    cc = np.arange(W)[None, :]
    for side in ("right", "left"):
        lung = lungs[side]
        out[f"{side} lung"] = lung
        top, bot = _rows(lung)
        h = bot - top + 1
        out[f"{side} upper lung zone"] = lung & (rr < top + h / 3)
        out[f"{side} mid lung zone"] = lung & (rr >= top + h / 3) & (rr < top + 2 * h / 3)
        out[f"{side} lower lung zone"] = lung & (rr >= top + 2 * h / 3)
        c0, c1 = _cols(lung)
        lateral_is_low = side == "right"  # patient's right lung: lateral = small columns

        # apical zone: above the clavicle's lower edge
        clav = _g(groups, f"clavicle_{side}")
        ccols = np.flatnonzero(clav.any(0))
        if len(ccols) >= 3:
            low = np.array([np.flatnonzero(clav[:, c])[-1] for c in ccols], float)
            edge = np.interp(np.arange(W), ccols, low)
            out[f"{side} apical zone"] = lung & (rr <= edge[None, :])
        else:
            out[f"{side} apical zone"] = lung & (rr < top + 0.12 * h)
        if not out[f"{side} apical zone"].any():
            out[f"{side} apical zone"] = lung & (rr < top + 0.12 * h)

        # costophrenic angle
        quarter = (c0 + 0.25 * (c1 - c0)) if lateral_is_low else (c1 - 0.25 * (c1 - c0))
        lat = lung & ((cc <= quarter) if lateral_is_low else (cc >= quarter))
        r_cp = _rows(lat)[1]
        lower_third = lung & (rr >= top + 2 * h / 3)
        lc = _cols(lower_third)
        c_edge = lc[0] if lateral_is_low else lc[1]
        s = px(35)
        box = (rr > r_cp - s) & (rr <= r_cp)
        box = box & (((cc >= c_edge) & (cc < c_edge + s)) if lateral_is_low
                     else ((cc <= c_edge) & (cc > c_edge - s)))
        out[f"{side} costophrenic angle"] = lung & box

        # hemidiaphragm: band around the first abdominal-organ row per column of this lung
        band = np.zeros((H, W), bool)
        half = px(5)
        for c in range(c0, c1 + 1):
            a = np.flatnonzero(abdomen[:, c])
            if len(a) and lung[:, c].any() and a[0] > top + h / 3:
                band[max(a[0] - half, 0): a[0] + half + 1, c] = True
        if not band.any():
            raise RegionRuleError(f"{side} hemidiaphragm is not in view")
        out[f"{side} hemidiaphragm"] = _largest(band)

        # hilar structures
        r_lo, r_hi = r_car - px(5), r_car + px(65)
        rows_h = (rr >= r_lo) & (rr <= r_hi)
        visible = lung & ~mediastinum
        hil = np.zeros((H, W), bool)
        for r in range(max(r_lo, 0), min(r_hi, H - 1) + 1):
            v = np.flatnonzero(visible[r])
            if not len(v):
                continue
            if lateral_is_low:
                m_edge = v[-1]
                hil[r, max(m_edge - px(30), 0): m_edge + 1] = True
            else:
                m_edge = v[0]
                hil[r, m_edge: m_edge + px(30) + 1] = True
        hil &= visible
        vessels = _g(groups, "pulmonary_vein", "bronchi") & rows_h
        vessels &= (cc < c_car) if lateral_is_low else (cc > c_car)
        out[f"{side} hilar structures"] = hil | vessels

    out["trachea"] = trachea
    out["svc"] = svc
    out["cardiac silhouette"] = heart
    out["right clavicle"] = _g(groups, "clavicle_right")
    out["left clavicle"] = _g(groups, "clavicle_left")
    spine = _g(groups, "vertebrae")
    out["spine"] = spine & (rr <= lung_bot)
    out["carina"] = _disc((H, W), r_car, c_car, px(10))
    out["cavoatrial junction"] = _disc((H, W), r_caj, c_caj, px(10))
    hc0, hc1 = _cols(heart)
    ra = heart & (cc <= hc0 + 0.35 * (hc1 - hc0)) & (rr >= r_caj)
    out["right atrium"] = ra
    aorta = _g(groups, "aorta")
    a_top = _rows(aorta)[0] if aorta.any() else lung_top
    out["aortic arch"] = _largest(aorta & (rr <= min(r_car, a_top + px(40))))
    out["abdomen"] = abdomen

    masks = np.zeros((NUM_REGIONS, H, W), bool)
    for reg in REGIONS:
        m = out[reg.name]
        if not m.any():
            raise RegionRuleError(f"region {reg.name!r} is empty in this projection")
        masks[reg.id - 1] = m
    return masks


def boxes_from_masks(masks: np.ndarray) -> list[list[int]]:
    """One box per mask (see module docstring for the coordinate convention)."""
    return [mask_to_box(m) for m in masks]
