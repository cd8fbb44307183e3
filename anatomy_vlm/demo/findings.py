"""Findings inserted into the CT before projection, at known anatomy.

Every function edits a study's copy of the attenuation volume ``mu`` and of the structure-group
volume ``groups`` (both torch tensors in the projector's (1, 1, K, I, J) layout) inside a
sub-block, and marks the lesion's voxels with its own label id in ``groups`` *only where they do
not belong to a lung-independent structure*, so that the projected lesion footprint is known
exactly. The region labels of a study are then read off the projection: a region is positive for
a finding when the lesion's footprint covers at least 20 % of the footprint or 10 % of the region
(see :func:`region_labels`).

Simulations (HU of the inserted material in brackets):
    * consolidation: an irregular blob (sum of 2-3 Gaussians, 20-45 mm) inside one lung lobe, lung
      replaced by fluid/pus density (+30 HU) with partial filling at the edges (airspace pattern).
    * pleural effusion: fluid (+10 HU) filling the lowest lung voxels of one side up to a level 25-80
      mm above the lung base, rising laterally (meniscus) as on an upright film.
    * cardiomegaly: the heart (and everything within its smooth neighbourhood) scaled up by 1.18-1.40
      across and 1.05-1.15 vertically, by resampling the sub-block (labels move with it).
    * pneumothorax: lung voxels within 8-30 mm of the outer lung surface in the upper 55 % of one
      lung replaced by air (-1000 HU), a thin visceral pleural line (-300 HU) at the collapsed edge.
    * nodule: a sphere of 5-12 mm radius (+40 HU) with a soft edge, in a random lung location.
    * mass: a lobulated sphere of 16-30 mm radius (+40 HU).
    * atelectasis: a plate (3-7 mm thick, 35-70 mm wide, roughly horizontal) of collapsed lung
      (+20 HU) in a lower lobe, or in the middle lobe / lingula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..anatomy import REGIONS
from ..knowledge import finding as finding_info
from .ct import GROUP_ID, LUNG_GROUPS_LEFT, LUNG_GROUPS_RIGHT
from .projector import MU_WATER

LESION_ID0 = 64  # lesion label ids start here in the groups volume (structure groups are < 64)


def mu_of(hu: float) -> float:
    return MU_WATER * max(0.0, 1.0 + hu / 1000.0)


@dataclass
class Lesion:
    """One inserted finding: its name, patient side ("right"/"left"/None) and label id."""

    name: str
    side: str | None
    label: int
    detail: str = ""


class StudyVolume:
    """A study's editable copy of the volumes, with world-coordinate helpers.

    The CT affine is diagonal (checked): world = diag(a) * index + b for i, j, k.
    """

    def __init__(self, mu: torch.Tensor, groups: torch.Tensor, affine: np.ndarray):
        if np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 1e-6:
            raise ValueError("findings need an axis-aligned CT affine")
        self.mu = mu
        self.groups = groups
        self.a = np.diag(affine[:3, :3]).copy()
        self.b = affine[:3, 3].copy()
        self.shape_ijk = (mu.shape[3], mu.shape[4], mu.shape[2])
        self.next_label = LESION_ID0

    def new_label(self) -> int:
        self.next_label += 1
        return self.next_label - 1

    def block(self, lo, hi):
        """Index slices (k, i, j) covering the world box [lo, hi] and world coordinate arrays
        broadcastable to the block shape (K, I, J)."""
        sl = []
        coords = []
        for ax in range(3):
            i0 = (lo[ax] - self.b[ax]) / self.a[ax]
            i1 = (hi[ax] - self.b[ax]) / self.a[ax]
            a, b = sorted((i0, i1))
            a = int(max(0, math.floor(a)))
            b = int(min(self.shape_ijk[ax] - 1, math.ceil(b)))
            sl.append(slice(a, b + 1))
            coords.append(self.a[ax] * np.arange(a, b + 1) + self.b[ax])
        si, sj, sk = sl
        x = torch.from_numpy(coords[0]).float().view(1, -1, 1)
        y = torch.from_numpy(coords[1]).float().view(1, 1, -1)
        z = torch.from_numpy(coords[2]).float().view(-1, 1, 1)
        return (sk, si, sj), (x, y, z)

    def view(self, t: torch.Tensor, sl):
        return t[0, 0, sl[0], sl[1], sl[2]]


def _lung_ids(side: str) -> list[int]:
    return [GROUP_ID[n] for n in (LUNG_GROUPS_RIGHT if side == "right" else LUNG_GROUPS_LEFT)]


def _random_lung_point(ct, side: str, rng, lobes=None, zfrac=(0.0, 1.0)) -> np.ndarray:
    """World position of a random voxel of the given lung (lobes) with relative height in zfrac."""
    ids = lobes or _lung_ids(side)
    pts = ct.lung_points[side] if lobes is None else ct.points_of(ids)
    z = pts[:, 2]
    lo, hi = np.quantile(z, zfrac[0]), np.quantile(z, zfrac[1])
    sel = pts[(z >= lo) & (z <= hi)]
    return sel[rng.integers(len(sel))].astype(float)


def _fill_lung(vol: StudyVolume, sl, weight: torch.Tensor, hu: float, lung_ids: list[int]) -> int:
    """Blend material of ``hu`` into the lung voxels (``lung_ids``) of block ``sl`` with ``weight``
    (0..1); voxels with weight > 0.5 get a new lesion label, which is returned."""
    g = vol.view(vol.groups, sl)
    within = torch.isin(g, torch.tensor([float(i) for i in lung_ids])).float()
    label = vol.new_label()
    w = weight * within
    mu = vol.view(vol.mu, sl)
    mu.mul_(1 - w).add_(w * mu_of(hu))
    g[(w > 0.5)] = float(label)
    return label


def consolidation(vol, ct, rng, side) -> Lesion:
    lobes = [GROUP_ID[n] for n in (LUNG_GROUPS_RIGHT if side == "right" else LUNG_GROUPS_LEFT)]
    lobe = [lobes[rng.integers(len(lobes))]]
    c = _random_lung_point(ct, side, rng, lobes=lobe)
    R = rng.uniform(20, 45)
    sl, (x, y, z) = vol.block(c - 2 * R, c + 2 * R)
    w = torch.zeros_like(z * x * y)  # (K, I, J) block shape
    for _ in range(rng.integers(2, 4)):
        cc = c + rng.normal(0, R / 2.5, 3)
        r = R * rng.uniform(0.5, 0.9)
        d2 = (x - cc[0]) ** 2 + (y - cc[1]) ** 2 + (z - cc[2]) ** 2
        w = torch.maximum(w, torch.exp(-d2 / (2 * r * r)))
    weight = torch.clamp((w - 0.3) / 0.4, 0, 1) * rng.uniform(0.6, 0.9)
    lab = _fill_lung(vol, sl, weight, 30.0, _lung_ids(side))
    return Lesion("consolidation", side, lab, f"radius {R:.0f} mm")


def pleural_effusion(vol, ct, rng, side) -> Lesion:
    pts = ct.lung_points[side]
    zb = np.quantile(pts[:, 2], 0.01)
    height = rng.uniform(25, 80)
    lo = pts.min(0) - 5
    hi = pts.max(0) + 5
    hi[2] = zb + height + 60
    sl, (x, y, z) = vol.block(lo, hi)
    xm = pts[:, 0].mean()
    xl = pts[:, 0].min() if side == "left" else pts[:, 0].max()  # lateral x (LAS: +x right)
    lateral = torch.clamp((x - xm) / (xl - xm), 0, 1)  # 0 medial .. 1 lateral
    level = zb + height + 25.0 * lateral ** 2  # meniscus rises laterally
    weight = torch.clamp((level - z) / 4.0, 0, 1)
    lab = _fill_lung(vol, sl, weight, 10.0, _lung_ids(side))
    return Lesion("pleural effusion", side, lab, f"height {height:.0f} mm")


def pneumothorax(vol, ct, rng, side) -> Lesion:
    from scipy import ndimage

    pts = ct.lung_points[side]
    z0, z1 = pts[:, 2].min(), pts[:, 2].max()
    zc = z1 - 0.55 * (z1 - z0)
    lo = pts.min(0) - 3
    hi = pts.max(0) + 3
    lo[2] = zc
    sl, (x, y, z) = vol.block(lo, hi)
    g = vol.view(vol.groups, sl)
    lung = torch.isin(g, torch.tensor([float(i) for i in _lung_ids(side)])).numpy()
    depth = rng.uniform(8, 30)
    # distance (mm) to the lung's outside, on a 2x coarser grid in plane
    sp = (abs(vol.a[2]), abs(vol.a[0]) * 2, abs(vol.a[1]) * 2)
    coarse = lung[:, ::2, ::2]
    pad = np.pad(coarse, 1)
    pad[-1] = True  # the lung continues below the block: not a surface
    dist = ndimage.distance_transform_edt(pad, sampling=sp)[1:-1, 1:-1, 1:-1]
    dist = np.repeat(np.repeat(dist, 2, 1), 2, 2)[:, : lung.shape[1], : lung.shape[2]]
    dist = torch.from_numpy(dist).float()
    # only the lateral and apical surface collapses, not the mediastinal one
    xm = pts[:, 0].mean()
    lateral = (x - xm) * (1 if side == "right" else -1) > -15
    apical = z > z1 - 40
    region = torch.from_numpy(lung) & (lateral | apical)
    air = region & (dist <= depth)
    line = region & (dist > depth) & (dist <= depth + 2.5)
    mu = vol.view(vol.mu, sl)
    mu[air] = 0.0
    mu[line] = mu_of(-300.0)
    lab = vol.new_label()
    g[air] = float(lab)
    return Lesion("pneumothorax", side, lab, f"depth {depth:.0f} mm")


def _sphere(vol, ct, rng, side, name, r_range, lobulated) -> Lesion:
    c = _random_lung_point(ct, side, rng, zfrac=(0.1, 0.95))
    R = rng.uniform(*r_range)
    sl, (x, y, z) = vol.block(c - 1.6 * R, c + 1.6 * R)
    d = torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    rr = torch.full_like(d, R)
    if lobulated:
        for _ in range(3):
            cc = c + rng.normal(0, R / 2, 3)
            d2 = torch.sqrt((x - cc[0]) ** 2 + (y - cc[1]) ** 2 + (z - cc[2]) ** 2)
            d = torch.minimum(d, d2 * R / (R * rng.uniform(0.5, 0.8)))
    weight = torch.clamp((rr - d) / 2.0 + 0.5, 0, 1)
    lab = _fill_lung(vol, sl, weight, 40.0, _lung_ids("right") + _lung_ids("left"))
    return Lesion(name, side, lab, f"radius {R:.0f} mm")


def nodule(vol, ct, rng, side) -> Lesion:
    return _sphere(vol, ct, rng, side, "nodule", (5, 12), False)


def mass(vol, ct, rng, side) -> Lesion:
    return _sphere(vol, ct, rng, side, "mass", (16, 30), True)


def atelectasis(vol, ct, rng, side) -> Lesion:
    lobes = ([GROUP_ID["lung_lower_right"], GROUP_ID["lung_middle_right"]] if side == "right"
             else [GROUP_ID["lung_lower_left"], GROUP_ID["lung_upper_left"]])
    c = _random_lung_point(ct, side, rng, lobes=[lobes[0]] if rng.random() < 0.7 else [lobes[1]],
                           zfrac=(0.15, 0.7))
    width = rng.uniform(35, 70)
    thick = rng.uniform(3, 7)
    ang = math.radians(rng.uniform(-15, 15))
    sl, (x, y, z) = vol.block(c - np.array([width, width, 20]), c + np.array([width, width, 20]))
    # plate: thin along a near-vertical normal, wide in x and y
    n = (0.0, math.sin(ang), math.cos(ang))
    dn = (x - c[0]) * n[0] + (y - c[1]) * n[1] + (z - c[2]) * n[2]
    rad = torch.sqrt((x - c[0]) ** 2 + ((y - c[1]) * 0.8) ** 2)
    weight = torch.clamp((thick / 2 - dn.abs()) / 1.5 + 0.5, 0, 1) * torch.clamp((width / 2 - rad) / 5, 0, 1)
    lab = _fill_lung(vol, sl, weight * 0.95, 20.0, _lung_ids(side))
    return Lesion("atelectasis", side, lab, f"plate {width:.0f}x{thick:.0f} mm")


def cardiomegaly(vol, ct, rng, side=None) -> Lesion:
    f_x = rng.uniform(1.18, 1.40)
    f_z = rng.uniform(1.05, 1.15)
    enlarge_heart(vol, ct, (f_x, f_x * 0.9 + 0.1, f_z))
    return Lesion("cardiomegaly", None, -1, f"scale {f_x:.2f}")


def enlarge_heart(vol: StudyVolume, ct, factors) -> None:
    """Scale the heart and its surroundings about the heart's centre by ``factors`` (x, y, z) with a
    smooth cosine fall-off to identity at 1.9x the heart's half-extent. Also used (with factors
    near 1) as normal organ-size variation."""
    c = ct.heart_centre
    half = ct.heart_half * 1.9
    sl, (x, y, z) = vol.block(c - half, c + half)
    f = torch.tensor(factors, dtype=torch.float32)
    dx, dy, dz = (x - c[0]) / half[0], (y - c[1]) / half[1], (z - c[2]) / half[2]
    r = torch.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
    w = torch.where(r < 1, 0.5 * (1 + torch.cos(math.pi * r)), torch.zeros_like(r))
    # source point for each output voxel: c + (p - c) / (1 + w (f - 1))
    sx = c[0] + (x - c[0]) / (1 + w * (f[0] - 1))
    sy = c[1] + (y - c[1]) / (1 + w * (f[1] - 1))
    sz = c[2] + (z - c[2]) / (1 + w * (f[2] - 1))
    # normalised coordinates within the block (grid order W=j(y), H=i(x), D=k(z))
    def norm(s, ax, sl_ax):
        idx = (s - vol.b[ax]) / vol.a[ax] - sl_ax.start
        n = sl_ax.stop - sl_ax.start
        return 2 * idx / max(n - 1, 1) - 1
    K, I, J = w.shape
    gx = norm(sx, 0, sl[1]).expand(K, I, J)
    gy = norm(sy, 1, sl[2]).expand(K, I, J)
    gz = norm(sz, 2, sl[0]).expand(K, I, J)
    grid = torch.stack([gy, gx, gz], -1)[None]
    for t, mode in ((vol.mu, "bilinear"), (vol.groups, "nearest")):
        blk = vol.view(t, sl).clone()[None, None]
        res = F.grid_sample(blk, grid, mode=mode, padding_mode="border", align_corners=True)
        vol.view(t, sl).copy_(res[0, 0])


SIMULATORS = {
    "consolidation": consolidation,
    "pleural effusion": pleural_effusion,
    "cardiomegaly": cardiomegaly,
    "pneumothorax": pneumothorax,
    "nodule": nodule,
    "mass": mass,
    "atelectasis": atelectasis,
}


def region_labels(lesion: Lesion, footprint: np.ndarray, masks: np.ndarray) -> list[str]:
    """Registry regions positive for one inserted lesion.

    A region allowed for the finding (``knowledge.FINDINGS[...].regions``) is positive when the
    lesion's projected footprint covers at least 20 % of the footprint or 10 % of the region.
    Lateralised findings only label regions of their side. Cardiomegaly labels the cardiac
    silhouette.
    """
    if lesion.name == "cardiomegaly":
        return ["cardiac silhouette"]
    allowed = set(finding_info(lesion.name).regions)
    area = footprint.sum()
    if area == 0:
        return []
    out = []
    for reg in REGIONS:
        if reg.name not in allowed:
            continue
        if lesion.side and reg.side not in (lesion.side, "midline"):
            continue
        inter = np.logical_and(footprint, masks[reg.id - 1]).sum()
        if inter >= 0.2 * area or inter >= 0.1 * masks[reg.id - 1].sum():
            out.append(reg.name)
    return out
