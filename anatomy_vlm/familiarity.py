"""How familiar an image looks to the model, so that an answer can say when it should not be trusted.

The model learned from radiographs projected from one real CT, inside fixed ranges of pose, framing,
exposure and grey mapping. Outside those ranges it is measurably worse (the demo test split), and on a film
that is not a frontal chest radiograph at all it still answers 29 confident-looking boxes. So every
prediction carries an ``input_check``:

* **Familiarity** (from the image): the image's encoder embedding (the ``(256, 64, 64)`` map every
  prediction computes anyway) is pooled to one vector, the channel means over the image's own part of the
  grid (the letterbox padding left out), and its Mahalanobis distance to the training images' vectors is
  measured: mean and covariance of the training split, the covariance shrunk towards a scaled identity by
  Ledoit and Wolf's rule (scikit-learn's ``LedoitWolf``; 256 dimensions from a few hundred images need it).
  The **threshold** is the largest distance among held-out studies from the same ranges (the validation
  split), so ``ratio = distance / threshold``: up to 1 is "in range", above it "outside the training
  range", above :data:`FAR_RATIO` (3.5) "far outside" (a different kind of image). Costs well under a
  millisecond per call.
* **Metadata** (DICOM only): a Modality other than a radiograph's, a BodyPartExamined that is not the
  chest, a lateral ViewPosition each add a note.

Nothing is refused on these grounds (a radiologist may still want a starting point on an unusual film);
the answer says what it is worth. Fit and store the reference for a checkpoint with

    anatomy-vlm fit-familiarity --checkpoint apps/anatomy_vlm/model/anatomy_vlm.pt --demo data/demo

which writes ``meta["familiarity"]`` (:func:`fit_familiarity`'s dict) into the checkpoint atomically.
The reference belongs to the encoder: a fine-tuned checkpoint keeps its parent's only while the encoder is
frozen (``anatomy_vlm.train``), otherwise it has none and its answers say so.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FAR_RATIO", "Familiarity", "familiarity_for_checkpoint", "fit_familiarity", "fit_for_checkpoint",
           "header_meta", "metadata_notes", "pooled_features", "series_tag"]

FAR_RATIO = 3.5
"""A distance above this many thresholds is "far outside": most likely not a frontal chest radiograph. Chosen
after measuring (bench/familiarity.py, README "How familiar an image looks"): the most shifted chest
projections reached 3.2-3.3, the non-chest DICOM images of pydicom-data started at 4.1."""

FEATURE = "channel means of the encoder embedding over the image's part of the grid (padding left out)"

_RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "DR"})
_CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "TORSO")
_LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "XTABLE LATERAL"})


def pooled_features(embedding: Any, resized_size: tuple[int, int], input_size: int = 256) -> np.ndarray:
    """``(C,)`` float64 channel means of a ``(C, h, w)`` embedding over the cells the image covers.

    ``resized_size`` is the image's ``(h, w)`` inside the ``input_size`` letterbox (top-left aligned);
    grid cells that hold only padding are left out, so the same image framed differently pools alike.

    Raises:
        ValueError: an embedding that is not ``(C, h, w)``.
    """
    e = np.asarray(embedding.detach().cpu().numpy() if hasattr(embedding, "detach") else embedding, np.float64)
    if e.ndim != 3:
        raise ValueError(f"expected an embedding (C, h, w), got shape {e.shape}")
    gh, gw = e.shape[1:]
    rh = max(1, min(gh, int(np.ceil(resized_size[0] * gh / input_size))))
    rw = max(1, min(gw, int(np.ceil(resized_size[1] * gw / input_size))))
    return e[:, :rh, :rw].mean(axis=(1, 2))


def fit_familiarity(train: np.ndarray, heldout: np.ndarray, **provenance: Any) -> dict[str, Any]:
    """The reference to store in a checkpoint's ``meta["familiarity"]``.

    Args:
        train: ``(N, C)`` pooled features of the training images (mean and shrunk covariance).
        heldout: ``(M, C)`` pooled features of held-out images from the same ranges; the largest of their
            distances is the threshold.
        provenance: stored alongside (split names, data root, command, ...).

    Raises:
        ValueError: too few images (fewer than 2 training or 1 held-out; a useful reference wants a few
            hundred and some tens), mismatched widths, non-finite values.
    """
    from sklearn.covariance import LedoitWolf

    X, Y = np.asarray(train, np.float64), np.asarray(heldout, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"expected (N, C) training and (M, C) held-out features, got {X.shape} and {Y.shape}")
    if len(X) < 2 or len(Y) < 1:
        raise ValueError(f"fitting familiarity needs at least 2 training and 1 held-out images, got {len(X)} "
                         f"and {len(Y)}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("features contain NaN or infinite values")
    lw = LedoitWolf().fit(X)
    ref = {"mean": lw.location_.tolist(), "precision": lw.precision_.tolist()}
    fam = Familiarity.from_meta({**ref, "threshold": 1.0})
    d_train, d_held = fam.distance(X), fam.distance(Y)
    threshold = float(d_held.max())
    return {**ref, "threshold": threshold, "far_ratio": FAR_RATIO, "feature": FEATURE,
            "shrinkage": round(float(lw.shrinkage_), 5), "n_train": int(len(X)), "n_heldout": int(len(Y)),
            "train_distance_median": round(float(np.median(d_train)), 3),
            "heldout_distance_median": round(float(np.median(d_held)), 3),
            "fitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **provenance}


class Familiarity:
    """A stored reference (:func:`fit_familiarity`) that grades pooled features.

    Raises (constructor):
        ValueError: a malformed reference (shapes, non-finite numbers, a threshold that is not positive).
    """

    def __init__(self, mean: np.ndarray, precision: np.ndarray, threshold: float, far_ratio: float = FAR_RATIO,
                 info: dict[str, Any] | None = None):
        self.mean = np.asarray(mean, np.float64)
        self.precision = np.asarray(precision, np.float64)
        c = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if c < 1 or self.precision.shape != (c, c):
            raise ValueError(f"familiarity reference: mean (C,) and precision (C, C) expected, got "
                             f"{self.mean.shape} and {self.precision.shape}")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.precision).all()):
            raise ValueError("familiarity reference holds NaN or infinite values")
        self.threshold, self.far_ratio = float(threshold), float(far_ratio)
        if not (self.threshold > 0 and self.far_ratio > 1):
            raise ValueError(f"familiarity threshold must be > 0 and far_ratio > 1, got {threshold}, {far_ratio}")
        self.info = dict(info or {})

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Familiarity | None:
        """From ``meta["familiarity"]``-style dict (or a checkpoint's whole meta); None when absent."""
        ref = (meta or {}).get("familiarity", meta) if meta else None
        if not ref or "mean" not in ref:
            return None
        info = {k: v for k, v in ref.items() if k not in ("mean", "precision")}
        return cls(ref["mean"], ref["precision"], ref["threshold"], ref.get("far_ratio", FAR_RATIO), info)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance(s) of ``(C,)`` or ``(N, C)`` features to the training mean."""
        f = np.asarray(features, np.float64)
        if f.shape[-1] != self.channels:
            raise ValueError(f"features have {f.shape[-1]} channels, the reference {self.channels}")
        d = f - self.mean
        return np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", d, self.precision, d), 0.0))

    def grade(self, features: np.ndarray) -> dict[str, Any]:
        """``{"level", "distance", "threshold", "ratio", "message"}`` for one image's ``(C,)`` features."""
        dist = float(self.distance(features))
        ratio = dist / self.threshold
        if ratio <= 1.0:
            level, msg = "in range", "the image resembles the images the model was trained on"
        elif ratio <= self.far_ratio:
            level = "outside the training range"
            msg = ("the image differs from the images the model was trained on (pose, framing, exposure or "
                   "anatomy outside their range, or a real film unlike the projections): check the regions "
                   "before relying on them")
        else:
            level = "far outside the training range"
            msg = ("the image is far from anything the model was trained on: probably not a frontal chest "
                   "radiograph; its regions are not meaningful")
        return {"level": level, "distance": round(dist, 2), "threshold": round(self.threshold, 2),
                "ratio": round(ratio, 2), "message": msg}


def series_tag(check: dict[str, Any] | None) -> str:
    """A few words for a DICOM SeriesDescription (64 characters in all), so that a viewer that shows only the
    series list (OHIF) still warns: ``""`` in range or unknown, ``"unfamiliar image"`` outside the training
    range, ``"not like a chest film"`` far outside it."""
    level = (check or {}).get("level")
    return {"outside the training range": "unfamiliar image",
            "far outside the training range": "not like a chest film"}.get(level, "")


def metadata_notes(meta: dict[str, Any] | None) -> list[str]:
    """Notes on DICOM attributes that say the image is not what the model knows (:class:`~anatomy_vlm.io.
    Radiograph` ``meta`` keys ``modality``, ``body_part_examined``, ``view_position``); ``[]`` when fine
    or unknown."""
    m = meta or {}
    notes = []
    mod = str(m.get("modality") or "").strip().upper()
    if mod and mod not in _RADIOGRAPH_MODALITIES:
        notes.append(f"DICOM Modality is {mod}: the model knows radiographs (CR, DX)")
    part = str(m.get("body_part_examined") or "").strip().upper()
    if part and not any(w in part for w in _CHEST_WORDS):
        notes.append(f"DICOM BodyPartExamined is {part}: the model knows the chest")
    view = str(m.get("view_position") or "").strip().upper()
    if view in _LATERAL_VIEWS:
        notes.append(f"DICOM ViewPosition is {view}: the model knows frontal (PA/AP) views")
    return notes


def header_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``modality`` / ``body_part_examined`` / ``view_position`` of a DICOM file's header (pixels not
    read), ``{}`` for anything that is not a readable DICOM."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["Modality", "BodyPartExamined", "ViewPosition"])
    except Exception:  # noqa: BLE001 - PNG, JPEG, NIfTI, damaged headers: no metadata to check
        return {}
    return {"modality": ds.get("Modality"), "body_part_examined": ds.get("BodyPartExamined"),
            "view_position": ds.get("ViewPosition")}


def fit_for_checkpoint(checkpoint: str | os.PathLike, fit_images: Sequence[str | os.PathLike],
                       heldout_images: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, **provenance: Any) -> dict[str, Any]:
    """Fit the familiarity reference of ``checkpoint`` on any images and write it into the checkpoint
    (atomically): mean and covariance from ``fit_images`` (its training images), the threshold from
    ``heldout_images`` (held-out images of the same kind). ``provenance`` is stored with it.

    Embeddings come from the predictor's cache (the encoder runs only for images not seen yet). Returns the
    stored dict without its arrays.

    Raises:
        ValueError: too few images (:func:`fit_familiarity`); ImageReadError: an unreadable image.
    """
    from .checkpoint import update_checkpoint_meta
    from .predict import Predictor

    p = Predictor.from_checkpoint(checkpoint, cache_dir=cache_dir)
    feats = []
    for name, images in (("fit", fit_images), ("held out", heldout_images)):
        it: Any = list(images)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"familiarity ({name})", unit="image")
        rows = []
        for path in it:
            emb, box = p.embedding(path)
            rows.append(pooled_features(emb, box.resized_size, box.input_size))
        feats.append(np.stack(rows) if rows else np.zeros((0, 1)))
    ref = fit_familiarity(feats[0], feats[1], **provenance)
    update_checkpoint_meta(checkpoint, {"familiarity": ref})
    return {k: v for k, v in ref.items() if k not in ("mean", "precision")}


def familiarity_for_checkpoint(checkpoint: str | os.PathLike, demo_root: str | os.PathLike,
                               fit_split: str = "train", split: str = "val",
                               cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`fit_for_checkpoint` on two splits of a demo build (``anatomy-vlm fit-familiarity``).

    Raises:
        ValueError: ``split`` is the test split (its figures are reported against this reference), or the
            two splits are the same or empty.
    """
    from .box_calibration import shown_path
    from .data import DemoDataset

    if "test" in (fit_split, split):
        raise ValueError("fit familiarity on the train and val splits: test is where it is measured")
    if fit_split == split:
        raise ValueError(f"the threshold needs held-out images: fit_split and split are both {split!r}")
    ds = {name: DemoDataset(demo_root, name, load_masks=False) for name in (fit_split, split)}
    for name, d in ds.items():
        if len(d) == 0:
            raise ValueError(f"{demo_root}: split {name!r} has no studies")
    images = {name: [d.root / e["image"] for e in d.entries] for name, d in ds.items()}
    return fit_for_checkpoint(
        checkpoint, images[fit_split], images[split], cache_dir=cache_dir, progress=progress,
        fit_split=fit_split, split=split, demo_root=shown_path(demo_root), fingerprint=ds[split].fingerprint(),
        command=f"anatomy-vlm fit-familiarity --checkpoint {shown_path(checkpoint)} --demo {shown_path(demo_root)} "
                f"--fit-split {fit_split} --split {split}")
