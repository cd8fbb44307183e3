"""Dataset readers and the mapping of their labels onto the model's input frame.

Every reader returns the same **sample** dict (``K = NUM_REGIONS = 29``, index ``i`` = region id ``i + 1``):

=============  ====================================================================================
``id``         str, the image id (demo study id, MIMIC ``dicom_id``)
``image``      float32 ``(H, W)`` radiograph pixels from :func:`anatomy_vlm.io.read_image`
``boxes``      float32 ``(K, 4)`` ``[x0, y0, x1, y1]`` in original-image pixel-edge coordinates
               (x = column; a one-pixel region at (r, c) is ``[c, r, c+1, r+1]``); 0 where absent
``present``    bool ``(K,)``: the region has a box in this image
``valid``      bool ``(K,)``: the region's label is known (present, or known to be absent); the loss
               ignores invalid regions entirely (partial labels)
``masks``      bool ``(K, H, W)`` or ``None`` when the dataset has no masks / they were not loaded
``spacing``    ``(row_mm, col_mm)``
``meta``       dict: dataset name, split, source paths, findings/report where the dataset has them
=============  ====================================================================================

Readers:

* :class:`DemoDataset` - the demo studies written by ``anatomy-vlm build-demo`` (``manifest.json``).
* :class:`ChestImaGenomeDataset` - Chest ImaGenome (PhysioNet, Wu et al. 2021) scene graphs over
  MIMIC-CXR-JPG images. Expected layout (the PhysioNet releases unpacked as they come)::

      <images_root>/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
                    (MIMIC-CXR-JPG 2.0.0: files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg)
      <scene_graph_dir>/<dicom_id>_SceneGraph.json
                    (chest-imagenome 1.0.0: silver_dataset/scene_graph/, from scene_graph.zip)
      <split_csv>   optional, e.g. chest-imagenome silver_dataset/splits/train.csv | valid.csv | test.csv
                    columns: [unnamed index,] subject_id, study_id, dicom_id, path, ViewPosition
                    (``path`` = ``files/p10/p10000032/s50414267/<dicom_id>.dcm``; ``.dcm`` is read as ``.jpg``)
      <exclude_csv> optional, e.g. silver_dataset/splits/images_to_avoid.csv (the gold-standard images;
                    same columns, no index): these dicom_ids are skipped

  A scene graph is JSON with top-level ``image_id`` (= dicom_id), ``patient_id``, ``study_id``,
  ``objects``, ``attributes``, ``relationships``. Each entry of ``objects`` has ``object_id``
  (``"<dicom_id>_<bbox_name>"``), ``bbox_name``, ``x1, y1, x2, y2, width, height`` on the 224 x 224
  resized grid, and ``original_x1, original_y1, original_x2, original_y2, original_width,
  original_height`` in original-image pixels (``original_width`` is the *box* width,
  ``original_x2 - original_x1``, not the image width). This reader uses the ``original_*`` corners.

  Names: the 29 registry regions use Chest ImaGenome's ``bbox_name`` spelling (``"svc"``,
  ``"cavoatrial junction"``, ...). The silver scene graphs also carry 7 more boxes (``right/left
  cardiophrenic angle``, ``left/right cardiac silhouette``, ``descending aorta``, ``left/right upper
  abdomen``); they are not registry regions and are skipped (counted in ``warnings``), never merged
  into a registry region. A region a scene graph does not list is *unknown*, not absent (the atlas
  pipeline failed for it), so ``valid = present`` unless ``unlisted_is_absent=True``.

  Bad coordinates: the silver set contains boxes that are negative, beyond the image or of zero
  area. A box is **clipped** to the image (``0..W``, ``0..H``); if nothing of positive area is left,
  or a coordinate is missing / not finite, it is **rejected** (region neither present nor valid) and
  counted. Duplicate ``bbox_name`` entries: the first one is used, later ones counted.

Counts of skipped names and rejected boxes accumulate in ``dataset.warnings`` (a Counter, per
process: DataLoader workers keep their own) and are logged once per kind.

:func:`to_model_targets` maps a sample's boxes (and masks) onto the model's square input frame as
normalised ``(cx, cy, w, h)`` (default: the letterbox of ``anatomy_vlm.model.preprocess``);
:func:`collate_targets` stacks them for
:class:`anatomy_vlm.losses.AnatomyCriterion`; :func:`model_boxes_to_pixels` is the inverse.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .anatomy import NUM_REGIONS, REGION_NAMES, REGIONS, region
from .io import read_image, read_json, read_mask_label, read_region_masks
from .labels import region_stack

__all__ = [
    "SPLITS", "DemoDataset", "ChestImaGenomeDataset", "BoxMapping", "to_model_targets",
    "collate_targets", "model_boxes_to_pixels", "empty_sample_labels", "replay_indices",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
"""Splits :class:`DemoDataset` accepts."""


def empty_sample_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, present, valid)`` with nothing labelled: zeros ``(K, 4)`` float32, False ``(K,)`` x2."""
    return (np.zeros((NUM_REGIONS, 4), np.float32), np.zeros(NUM_REGIONS, bool), np.zeros(NUM_REGIONS, bool))


class _Warnings:
    """A Counter that logs the first occurrence of each kind."""

    def __init__(self, name: str):
        self.counts: Counter[str] = Counter()
        self._name = name

    def add(self, kind: str, detail: str) -> None:
        if self.counts[kind] == 0:
            log.warning("%s: %s (%s); further cases are only counted in .warnings", self._name, kind, detail)
        self.counts[kind] += 1


# ------------------------------------------------------------------------------------------- demo
_PATH_FIELDS = ("image", "dicom", "png", "masks", "boxes")
"""Manifest fields that say where a study's files are, not what is in them."""


class DemoDataset:
    """The demo studies (``anatomy-vlm build-demo``): images, 29 boxes and 29 masks per study.

    Layout read: ``root/manifest.json`` with ``"studies": [{"id", "split", "image", "masks", "boxes",
    "width", "height", ...}]`` (paths relative to ``root``); the boxes JSON has ``"regions": [{"id",
    "name", "box": [x0, y0, x1, y1] | null}]``. Every region's label is known (``valid`` all True);
    a region without a box is absent. The ``"real"`` unlabelled images are not part of any split.

    Args:
        root: the folder holding ``manifest.json``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        load_masks: read the ``(29, H, W)`` masks (NIfTI) too; otherwise ``masks`` is None.

    Raises:
        ValueError: unknown split, or a manifest without ``studies``.
        FileNotFoundError: no ``manifest.json`` under ``root``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", load_masks: bool = True):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no demo manifest (build one with `anatomy-vlm build-demo`)")
        m = read_json(manifest)
        if not isinstance(m, dict) or not isinstance(m.get("studies"), list):
            raise ValueError(f"{manifest}: not a demo manifest (no 'studies' list)")
        self.split, self.load_masks = split, load_masks
        self.entries: list[dict] = [e for e in m["studies"] if split == "all" or e.get("split") == split]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        """Study ids in manifest order."""
        return [e["id"] for e in self.entries]

    def fingerprint(self, limit: int | None = None) -> str:
        """SHA-1 over what made the first ``limit`` studies (all by default) and their truth: two figures
        measured on the same fingerprint were measured on the same images and reference boxes.

        Hashed per study: the id, the builder's recipe from the manifest (size, projection geometry,
        rendering, anatomy scales, lesions, report: everything but file paths and the lesions' pixel
        counts) and the reference boxes (parsed, so formatting does not count). Not the file bytes: a
        build of the same recipe on another machine was not byte-identical (a fingerprint over image and
        box bytes did not match), while the shipped checkpoint's val mAP measured on it was 0.78072
        against the 0.7807 recorded on the machine that fitted it.
        """
        h = hashlib.sha1(b"demo-split/2")
        for e in self.entries[:limit]:
            recipe = {k: v for k, v in e.items() if k not in _PATH_FIELDS}
            # a lesion's pixel footprint is counted on the rendered image: a result, not part of the recipe
            recipe["lesions"] = [{k: v for k, v in les.items() if k != "footprint_px"} for les in e.get("lesions", [])]
            regions = read_json(self.root / e["boxes"]).get("regions", [])
            boxes = [[r.get("id", r.get("name")), r.get("box")] for r in regions]
            h.update(json.dumps([recipe, boxes], sort_keys=True, separators=(",", ":")).encode() + b";")
        return h.hexdigest()

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = self.entries[index]
        rg = read_image(self.root / e["image"])
        H, W = rg.pixels.shape
        if (e.get("height"), e.get("width")) not in ((H, W), (None, None)):
            raise ValueError(f"{rg.source}: image is {H}x{W} (HxW) but the manifest says "
                             f"{e.get('height')}x{e.get('width')}")
        label = read_json(self.root / e["boxes"])
        boxes, present, valid = empty_sample_labels()
        valid[:] = True
        for r in label.get("regions", []):
            k = region(r.get("id", r.get("name"))).id - 1
            if r.get("box") is not None:
                boxes[k] = np.asarray(r["box"], np.float32)
                present[k] = True
        masks = None
        if self.load_masks:
            masks = read_region_masks(self.root / e["masks"])
            if masks.shape != (NUM_REGIONS, H, W):
                raise ValueError(f"{self.root / e['masks']}: masks are {masks.shape}, expected "
                                 f"{(NUM_REGIONS, H, W)}")
        meta = {"dataset": "demo", "split": e.get("split"), "image_path": str(self.root / e["image"]),
                "boxes_path": str(self.root / e["boxes"]), "image_findings": e.get("image_findings", []),
                "region_findings": e.get("region_findings", {}), "report": e.get("report", ""),
                "report_sentences": e.get("report_sentences", [])}
        return {"id": e["id"], "image": rg.pixels, "boxes": boxes, "present": present, "valid": valid,
                "masks": masks, "spacing": rg.spacing, "meta": meta}


# ------------------------------------------------------------------------------- Chest ImaGenome
@dataclass(frozen=True)
class _CigRecord:
    dicom_id: str
    subject_id: str | None
    study_id: str | None
    rel_path: str | None  # from the split CSV's ``path`` column, .dcm -> .jpg


def _read_id_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and "dicom_id" not in rows[0]:
        raise ValueError(f"{path}: no 'dicom_id' column (columns: {', '.join(rows[0])})")
    return rows


def _clean_id(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    if s.endswith(".0") and s[:-2].isdigit():  # ids written as floats by pandas
        s = s[:-2]
    return s or None


class ChestImaGenomeDataset:
    """Chest ImaGenome scene-graph boxes over MIMIC-CXR-JPG images (layout: see the module docstring).

    Args:
        images_root: the MIMIC-CXR-JPG root (holding ``files/``).
        scene_graph_dir: the folder of ``<dicom_id>_SceneGraph.json`` files.
        split_csv: optional split CSV (``dicom_id`` column required; ``path`` or ``subject_id`` +
            ``study_id`` locate the image). Without it every scene graph in ``scene_graph_dir`` is used,
            sorted by dicom_id, and the image is located from the graph's ``patient_id`` / ``study_id``.
        exclude_csv: optional CSV whose ``dicom_id`` s are skipped (``images_to_avoid.csv``).
        unlisted_is_absent: treat regions a scene graph does not list as absent (``valid`` True)
            instead of unknown.

    Raises:
        FileNotFoundError: ``scene_graph_dir`` or a CSV does not exist.
        ValueError: a CSV without a ``dicom_id`` column.

    Split rows without a scene graph are skipped at construction (counted in ``warnings`` as
    ``"missing scene graph"``). Images are only opened in ``__getitem__``; a missing image raises
    FileNotFoundError naming the dicom_id and the expected path.
    """

    def __init__(self, images_root: str | os.PathLike, scene_graph_dir: str | os.PathLike,
                 split_csv: str | os.PathLike | None = None, *, exclude_csv: str | os.PathLike | None = None,
                 unlisted_is_absent: bool = False):
        self.images_root, self.scene_graph_dir = Path(images_root), Path(scene_graph_dir)
        self.unlisted_is_absent = unlisted_is_absent
        self._warn = _Warnings(type(self).__name__)
        if not self.scene_graph_dir.is_dir():
            raise FileNotFoundError(f"{self.scene_graph_dir}: scene graph folder not found")
        excluded: set[str] = set()
        if exclude_csv is not None:
            excluded = {_clean_id(r["dicom_id"]) for r in _read_id_csv(Path(exclude_csv))}
        if split_csv is not None:
            if not Path(split_csv).is_file():
                raise FileNotFoundError(f"{split_csv}: split CSV not found")
            records = [_CigRecord(_clean_id(r["dicom_id"]), _clean_id(r.get("subject_id")),
                                  _clean_id(r.get("study_id")),
                                  (r.get("path") or "").strip().replace(".dcm", ".jpg") or None)
                       for r in _read_id_csv(Path(split_csv))]
        else:
            suffix = "_SceneGraph.json"
            records = [_CigRecord(p.name[: -len(suffix)], None, None, None)
                       for p in sorted(self.scene_graph_dir.glob(f"*{suffix}"))]
        self.records: list[_CigRecord] = []
        for rec in records:
            if not rec.dicom_id or rec.dicom_id in excluded:
                continue
            if not self.scene_graph_path(rec.dicom_id).is_file():
                self._warn.add("missing scene graph", str(self.scene_graph_path(rec.dicom_id)))
                continue
            self.records.append(rec)

    @property
    def warnings(self) -> Counter[str]:
        """Counts of skipped/rejected items by kind (``"unknown bbox_name: <name>"``, ``"box outside
        image"``, ``"invalid coordinates"``, ``"duplicate bbox_name"``, ``"missing scene graph"``)."""
        return self._warn.counts

    @property
    def ids(self) -> list[str]:
        return [r.dicom_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def scene_graph_path(self, dicom_id: str) -> Path:
        return self.scene_graph_dir / f"{dicom_id}_SceneGraph.json"

    def image_path(self, rec: _CigRecord, graph: dict | None = None) -> Path:
        """``images_root/files/p<2 digits>/p<subject>/s<study>/<dicom_id>.jpg`` for a record."""
        if rec.rel_path:
            return self.images_root / rec.rel_path
        subject = rec.subject_id or _clean_id((graph or {}).get("patient_id"))
        study = rec.study_id or _clean_id((graph or {}).get("study_id"))
        if not subject or not study:
            raise ValueError(f"{rec.dicom_id}: cannot locate the image: no subject_id/study_id in the split "
                             f"CSV or patient_id/study_id in {self.scene_graph_path(rec.dicom_id)}")
        subject, study = subject.lstrip("p"), study.lstrip("s")
        return self.images_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{rec.dicom_id}.jpg"

    def parse_objects(self, objects: Iterable[dict], height: int, width: int) -> tuple[np.ndarray, ...]:
        """Scene-graph ``objects`` -> ``(boxes, present, valid)`` on an image of ``height x width``.

        Uses ``original_x1/y1/x2/y2``; clips to the image; rejects missing/non-finite coordinates and
        boxes with no area inside the image; skips names outside the registry (see module docstring).
        """
        boxes, present, valid = empty_sample_labels()
        seen: set[int] = set()
        for obj in objects:
            name = str(obj.get("bbox_name", "")).strip().lower()
            if name not in REGION_NAMES:  # exact Chest ImaGenome names only: no alias merging here
                self._warn.add(f"unknown bbox_name: {name}", "not a registry region; skipped")
                continue
            k = region(name).id - 1
            if k in seen:
                self._warn.add("duplicate bbox_name", name)
                continue
            seen.add(k)
            try:
                x0, y0, x1, y1 = (float(obj[f"original_{c}"]) for c in ("x1", "y1", "x2", "y2"))
            except (KeyError, TypeError, ValueError):
                self._warn.add("invalid coordinates", f"{name}: missing or non-numeric original_x1..y2")
                continue
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                self._warn.add("invalid coordinates", f"{name}: not finite")
                continue
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
            cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
            if cx1 <= cx0 or cy1 <= cy0:
                self._warn.add("box outside image", f"{name}: [{x0}, {y0}, {x1}, {y1}] on {width}x{height}")
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                self._warn.add("box clipped to image", f"{name}: [{x0}, {y0}, {x1}, {y1}] on {width}x{height}")
            boxes[k] = (cx0, cy0, cx1, cy1)
            present[k] = valid[k] = True
        if self.unlisted_is_absent:
            unlisted = np.ones(NUM_REGIONS, bool)
            unlisted[list(seen)] = False
            valid |= unlisted  # listed-but-rejected boxes stay unknown
        return boxes, present, valid

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        graph = read_json(self.scene_graph_path(rec.dicom_id))
        if not isinstance(graph, dict) or not isinstance(graph.get("objects"), list):
            raise ValueError(f"{self.scene_graph_path(rec.dicom_id)}: not a scene graph (no 'objects' list)")
        path = self.image_path(rec, graph)
        if not path.is_file():
            raise FileNotFoundError(f"{rec.dicom_id}: image not found at {path} (expected the MIMIC-CXR-JPG "
                                    f"layout images_root/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg)")
        rg = read_image(path)
        H, W = rg.pixels.shape
        boxes, present, valid = self.parse_objects(graph["objects"], H, W)
        meta = {"dataset": "chest_imagenome", "dicom_id": rec.dicom_id,
                "subject_id": rec.subject_id or _clean_id(graph.get("patient_id")),
                "study_id": rec.study_id or _clean_id(graph.get("study_id")),
                "image_path": str(path), "scene_graph_path": str(self.scene_graph_path(rec.dicom_id))}
        return {"id": rec.dicom_id, "image": rg.pixels, "boxes": boxes, "present": present, "valid": valid,
                "masks": None, "spacing": rg.spacing, "meta": meta}


# ------------------------------------------------------------------------- annotators' corrections
class CorrectionsDataset:
    """Images of a MONAI Label studies folder whose box label has regions a human confirmed.

    Layout read (what ``PUT /datastore/label`` writes through the app): ``studies/<id>.<ext>`` images and
    ``studies/labels/boxes/<id>.boxes.json`` with ``"regions"`` and ``"confirmed"`` (see
    :mod:`anatomy_vlm.labels`). Only confirmed regions are labels: ``valid`` is True for them (``present``
    when their box is not null) and False for every other region, so a trainer never learns from a box
    nobody checked. Masks: from ``labels/final/<id>.nii.gz`` for the regions listed under
    ``confirmed_masks`` (a corrected mask label, see the app's datastore), ``mask_valid`` marking them;
    otherwise ``None`` (the mask head then learns from the confirmed boxes, ``loss_mask_proj``).

    Args:
        studies: The studies folder.
        ids: Restrict to these image ids (e.g. a train/validation split of the corrected studies).
    """

    IMAGE_EXTS = (".dcm", ".png", ".jpg", ".jpeg", ".nii.gz")

    def __init__(self, studies: str | os.PathLike, ids: Sequence[str] | None = None):
        self.root = Path(studies)
        label_dir = self.root / "labels" / "boxes"
        entries = []
        for f in sorted(label_dir.glob("*.boxes.json")) if label_dir.is_dir() else []:
            image_id = f.name[: -len(".boxes.json")]
            if ids is not None and image_id not in ids:
                continue
            doc = read_json(f)
            if not isinstance(doc, dict) or not doc.get("confirmed"):
                continue
            image = next((self.root / f"{image_id}{e}" for e in self.IMAGE_EXTS
                          if (self.root / f"{image_id}{e}").is_file()), None)
            if image is None:
                continue
            entries.append({"id": image_id, "image": image, "label": f})
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def path_of(self, index: int) -> Path:
        return self.entries[index]["image"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = self.entries[index]
        rg = read_image(e["image"])
        doc = read_json(e["label"])
        boxes, present, valid = empty_sample_labels()
        confirmed = set(doc.get("confirmed") or {})
        for r in doc.get("regions", []):
            k = region(r.get("id", r.get("name"))).id - 1
            if REGIONS[k].name not in confirmed:
                continue
            valid[k] = True
            if r.get("box") is not None:
                boxes[k] = np.asarray(r["box"], np.float32)
                present[k] = True
        masks = mask_valid = None
        mask_names = set(doc.get("confirmed_masks") or []) & confirmed
        mask_file = self.root / "labels" / "final" / f"{e['id']}.nii.gz"
        if mask_names and mask_file.is_file():
            m = region_stack(read_mask_label(mask_file))
            if m.shape == (NUM_REGIONS, *rg.pixels.shape):
                masks = m
                mask_valid = np.array([r.name in mask_names for r in REGIONS])
        return {"id": e["id"], "image": rg.pixels, "boxes": boxes, "present": present, "valid": valid,
                "masks": masks, "mask_valid": mask_valid, "spacing": rg.spacing,
                "meta": {"dataset": "corrections", "image_path": str(e["image"]), "confirmed": sorted(confirmed),
                         "confirmed_masks": sorted(mask_names)}}


def replay_indices(total: int, n: int | None, seed: int) -> list[int]:
    """Which of ``total`` pretraining studies a fine-tuning round replays: a seeded sample of ``n``
    (sorted), or all of them when ``n`` is ``None`` or not below ``total``."""
    if n is None or int(n) >= total:
        return list(range(total))
    return sorted(int(i) for i in np.random.default_rng(int(seed)).permutation(total)[:int(n)])


class SubsetSamples:
    """The samples ``indices`` of a dataset (e.g. a replay sample of the pretraining data)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def path_of(self, index: int) -> Path:
        d, j = self.dataset, self.indices[index]
        return Path(d.path_of(j)) if hasattr(d, "path_of") else Path(d.root) / d.entries[j]["image"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[self.indices[index]]


class ConcatSamples:
    """Several datasets read as one (corrections plus replay of the pretraining data)."""

    def __init__(self, *datasets):
        self.datasets = [d for d in datasets if d is not None]
        self._index = [(i, j) for i, d in enumerate(self.datasets) for j in range(len(d))]

    def __len__(self) -> int:
        return len(self._index)

    def path_of(self, index: int) -> Path:
        i, j = self._index[index]
        d = self.datasets[i]
        if hasattr(d, "path_of"):
            return d.path_of(j)
        return Path(d.root) / d.entries[j]["image"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self._index[index]
        return self.datasets[i][j]


# ------------------------------------------------------------------------- model-frame targets
@dataclass(frozen=True)
class BoxMapping:
    """Affine map from original pixel coordinates to the model's square input frame (``size x size``).

    ``x_in = x * scale_x + pad_x``, ``y_in = y * scale_y + pad_y`` (pixel-edge coordinates); normalised
    coordinates divide by ``size``. Build it with :meth:`letterbox` (keep aspect, pad; the model's
    preprocessing), :meth:`from_letterbox` or :meth:`resize` (plain stretch); it must be the geometry
    the image preprocessing uses (``anatomy_vlm.model.preprocess``).
    """

    size: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    @classmethod
    def resize(cls, height: int, width: int, size: int) -> BoxMapping:
        """Plain resize of the whole image to ``size x size`` (aspect not kept)."""
        return cls(size, size / width, size / height)

    @classmethod
    def letterbox(cls, height: int, width: int, size: int, center: bool = False) -> BoxMapping:
        """Resize the longer side to ``size`` keeping the aspect, then pad (bottom/right, or centred).

        The resized extent is ``h = int(H * s + 0.5)``, ``w = int(W * s + 0.5)`` (clamped to
        ``1..size``) with ``s = size / max(H, W)``, exactly as
        ``anatomy_vlm.model.preprocess.Letterbox.for_size`` (MedSAM's ``resize_longest_side``); the
        scale per axis is taken from the rounded extent, so the image edges map exactly.
        """
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        s = size / max(height, width)
        h = max(1, min(size, int(height * s + 0.5)))
        w = max(1, min(size, int(width * s + 0.5)))
        px, py = ((size - w) // 2, (size - h) // 2) if center else (0, 0)
        return cls(size, w / width, h / height, float(px), float(py))

    @classmethod
    def from_letterbox(cls, lb: Any) -> BoxMapping:
        """From an ``anatomy_vlm.model.preprocess.Letterbox`` (anything with ``original_size`` ``(H, W)``,
        ``resized_size`` ``(h, w)`` and ``input_size``; top-left aligned)."""
        (H, W), (h, w) = lb.original_size, lb.resized_size
        return cls(int(lb.input_size), w / W, h / H)

    def content(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Where an ``height x width`` image lands in the input frame: integer ``(x0, y0, x1, y1)``."""
        x0, y0 = round(self.pad_x), round(self.pad_y)
        return x0, y0, x0 + max(1, round(width * self.scale_x)), y0 + max(1, round(height * self.scale_y))


def _mapping(kind: Any, height: int, width: int, size: int) -> BoxMapping:
    if hasattr(kind, "resized_size") and hasattr(kind, "original_size"):  # model.preprocess.Letterbox
        if tuple(kind.original_size) != (height, width):
            raise ValueError(f"letterbox is for a {kind.original_size} image, the sample is {(height, width)}")
        kind = BoxMapping.from_letterbox(kind)
    if isinstance(kind, BoxMapping):
        if kind.size != size:
            raise ValueError(f"mapping is for a {kind.size} px input, input_size is {size}")
        return kind
    if kind == "resize":
        return BoxMapping.resize(height, width, size)
    if kind == "letterbox":
        return BoxMapping.letterbox(height, width, size)
    if kind == "letterbox-center":
        return BoxMapping.letterbox(height, width, size, center=True)
    raise ValueError(f"unknown mapping {kind!r}; use 'letterbox', 'letterbox-center', 'resize', a BoxMapping "
                     "or a model.preprocess.Letterbox")


def to_model_targets(sample: dict[str, Any], input_size: int = 256,
                     mapping: Any = "letterbox", mask_size: int | None = None) -> dict[str, Any]:
    """Map a sample's labels onto the model's ``input_size x input_size`` input frame.

    This is the one place where original-pixel boxes become model targets. The default
    ``"letterbox"`` is the geometry of ``anatomy_vlm.model.preprocess.letterbox`` (MedSAM's: longest side
    to ``input_size`` keeping the aspect, zero pad bottom/right, image at the top-left), so
    ``cx = (x0 + x1) / 2 * sx / S``, ``w = (x1 - x0) * sx / S`` with ``sx = w_resized / W`` and
    ``S = input_size`` (same for y with ``sy = h_resized / H``): boxes are normalised by the *square
    frame*, padding included. ``"letterbox-center"`` pads both sides; ``"resize"`` stretches the whole
    image to the square (``cx = (x0 + x1) / 2 / W``); a :class:`BoxMapping` or a
    ``model.preprocess.Letterbox`` gives the geometry explicitly. Whatever is chosen must match the
    image preprocessing.

    Args:
        sample: a reader sample (``image`` ``(H, W)``, ``boxes`` ``(K, 4)`` xyxy pixels, ``present``,
            ``valid``, optional ``masks`` ``(K, H, W)``).
        input_size: side of the model's square input.
        mapping: ``"letterbox"`` | ``"letterbox-center"`` | ``"resize"`` | :class:`BoxMapping` |
            ``model.preprocess.Letterbox``.
        mask_size: side of the target masks on the input frame (default ``input_size``).

    Returns:
        ``{"boxes": float32 (K, 4) (cx, cy, w, h) in [0, 1] (0 rows where absent), "present": bool (K,),
        "valid": bool (K,), "masks": float32 (K, m, m) in {0, 1} or None, "mapping": BoxMapping,
        "image_size": (H, W), "id": ...}`` (tensors).
    """
    H, W = np.asarray(sample["image"]).shape[-2:]
    m = _mapping(mapping, H, W, input_size)
    present = torch.as_tensor(np.asarray(sample["present"], bool))
    valid = torch.as_tensor(np.asarray(sample.get("valid", sample["present"]), bool))
    b = torch.as_tensor(np.asarray(sample["boxes"], np.float32)).clone()
    b[:, 0::2] = b[:, 0::2] * m.scale_x + m.pad_x
    b[:, 1::2] = b[:, 1::2] * m.scale_y + m.pad_y
    b = (b / m.size).clamp(0.0, 1.0)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
    cxcywh[~present] = 0.0
    masks = None
    if sample.get("masks") is not None:
        masks = _map_masks(np.asarray(sample["masks"]), m, H, W, mask_size or input_size)
    return {"id": sample.get("id"), "boxes": cxcywh, "present": present, "valid": valid, "masks": masks,
            "mapping": m, "image_size": (int(H), int(W))}


def _map_masks(masks: np.ndarray, m: BoxMapping, height: int, width: int, out: int) -> torch.Tensor:
    """``(K, H, W)`` bool -> ``(K, out, out)`` float32 {0, 1} on the input frame (nearest-exact)."""
    t = torch.as_tensor(masks.astype(np.float32))[None]  # (1, K, H, W)
    x0, y0, x1, y1 = m.content(height, width)
    f = out / m.size
    cx0, cy0 = round(x0 * f), round(y0 * f)
    cw, ch = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
    res = F.interpolate(t, size=(ch, cw), mode="nearest-exact")[0]
    canvas = torch.zeros((masks.shape[0], out, out), dtype=torch.float32)
    canvas[:, cy0:cy0 + ch, cx0:cx0 + cw] = res[:, : out - cy0, : out - cx0]
    return canvas


def collate_targets(targets: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack :func:`to_model_targets` outputs into the batch form :class:`~anatomy_vlm.losses.AnatomyCriterion`
    takes: ``boxes (B, K, 4)``, ``present (B, K)``, ``valid (B, K)``, plus ``ids`` and ``mappings`` lists.

    Masks: None when no sample has masks; otherwise ``masks (B, K, m, m)`` with zeros for samples
    without masks and ``mask_valid (B, K)`` False for them, so mixed batches (demo + Chest ImaGenome)
    train the mask head only where masks exist.
    """
    if not targets:
        raise ValueError("collate_targets needs at least one sample")
    present = torch.stack([t["present"] for t in targets])
    out: dict[str, Any] = {"boxes": torch.stack([t["boxes"] for t in targets]), "present": present,
                           "valid": torch.stack([t["valid"] for t in targets]), "masks": None,
                           "mask_valid": None, "ids": [t.get("id") for t in targets],
                           "mappings": [t["mapping"] for t in targets]}
    with_masks = [t["masks"] for t in targets if t.get("masks") is not None]
    if with_masks:
        shapes = {tuple(m.shape) for m in with_masks}
        if len(shapes) != 1:
            raise ValueError(f"target masks differ in shape {sorted(shapes)}; use one mask_size")
        zero = torch.zeros_like(with_masks[0])
        out["masks"] = torch.stack([t["masks"] if t.get("masks") is not None else zero for t in targets])
        has = torch.tensor([t.get("masks") is not None for t in targets])
        out["mask_valid"] = has[:, None].expand_as(present).clone()
    return out


def model_boxes_to_pixels(boxes: torch.Tensor | np.ndarray, mapping: BoxMapping) -> np.ndarray:
    """Inverse of :func:`to_model_targets` for boxes: ``(..., 4)`` normalised ``(cx, cy, w, h)`` on the
    input frame -> float ``(..., 4)`` ``[x0, y0, x1, y1]`` in original-image pixel edges (not clipped)."""
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, np.float64) * mapping.size
    x0, x1 = b[..., 0] - b[..., 2] / 2, b[..., 0] + b[..., 2] / 2
    y0, y1 = b[..., 1] - b[..., 3] / 2, b[..., 1] + b[..., 3] / 2
    return np.stack([(x0 - mapping.pad_x) / mapping.scale_x, (y0 - mapping.pad_y) / mapping.scale_y,
                     (x1 - mapping.pad_x) / mapping.scale_x, (y1 - mapping.pad_y) / mapping.scale_y], -1)
