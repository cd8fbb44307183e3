"""One fine-tuning round on annotators' corrections, with versioned checkpoints and a validation gate.

A round (:func:`finetune_round`, run by the app's ``anatomy_finetune`` trainer and by
``bench/annotation_session.py``):

1. the corrected studies of a studies folder (:class:`~anatomy_vlm.data.CorrectionsDataset`: only regions
   a human confirmed are labels; confirmed masks where a mask label was saved, otherwise the boxes train
   the masks through the projection loss) are split into train and held-out by a hash of the image id
   (``val_fraction``; none held out below ``min_heldout_from`` corrected studies);
2. the served checkpoint is fine-tuned on them plus ``replay_n`` demo training studies (replay, so the
   model does not forget), encoder frozen by default (``encoder_blocks`` trains its last blocks too,
   ``encoder_adapters`` gives its last blocks low-rank adapters instead, :mod:`anatomy_vlm.model.adapters`;
   either way the frozen units before them run once per study, cached, and only the rest every step);
3. the candidate is written as a new version (``<model dir>/versions/vNNNN.pt``, atomically); with
   ``refit_boxes`` (off by default) its box calibration is then refitted on the corrected training studies'
   confirmed boxes (:func:`anatomy_vlm.box_calibration.refit_from_corrections`: regions confirmed on at
   least ``refit_min_images`` images, the others keep the parent's offsets). Measured on the shifted
   target domain of ``bench/annotation_session.py`` (one round of 20): held-out target mAP +0.010 over the
   same round without it, demo validation mAP -0.065 (offsets fitted for the new images, not the
   pretraining ones), so the default gate keeps such a candidate back; it is for users whose images all
   differ from the pretraining data, with a ``tolerance`` to match;
4. the gate: candidate and served model are evaluated on the held-out corrected studies (mean IoU of the
   served boxes over the confirmed regions) and on the demo validation split (COCO mAP); the candidate is
   served only if neither falls by more than ``tolerance``. Serving = an atomic replace of the served
   file, which the infer tasks notice by its mtime (no restart);
5. every version stays in ``versions/`` with its figures in ``versions/index.json``;
   :meth:`ModelVersions.restore` serves an earlier one again.

A round killed at any point leaves the served file as it was: versions and the served file are written
to a temporary name in their folder, flushed and renamed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .io import copy_file_atomic, write_json_atomic

__all__ = ["FINETUNE_DEFAULTS", "ModelVersions", "finetune_round", "heldout_split", "round_images"]

FINETUNE_DEFAULTS: dict[str, Any] = {
    "epochs": 4, "batch_size": 8, "lr": 3e-4, "lr_min": 1e-5, "replay_n": 16, "replay_seed": 0,
    "val_fraction": 0.2, "min_heldout_from": 5, "encoder_blocks": 0, "tolerance": 0.02,
    "demo_val_n": 30, "min_corrected": 1, "threads": 2, "mask_every": 1,
    "feature_affine": None, "image_jitter": None, "refit_boxes": False, "refit_min_images": 5,
    "encoder_adapters": None,
}
"""Settings of a round (the trainer's ``config`` in ``/info``; request values override them)."""

_LOCK = threading.Lock()


class ModelVersions:
    """The served checkpoint and its numbered versions.

    Args:
        served: The served checkpoint file (``apps/anatomy_vlm/model/anatomy_vlm.pt``).
        root: Folder of the versions (default ``<served's folder>/versions``).
    """

    def __init__(self, served: str | os.PathLike, root: str | os.PathLike | None = None):
        self.served_path = Path(served)
        self.root = Path(root) if root else self.served_path.parent / "versions"
        self.index_path = self.root / "index.json"

    def index(self) -> dict[str, Any]:
        """``{"served": version or None, "versions": [{"version", "file", "created", "parent", "promoted",
        "metrics", "note"}]}``; the served file is registered as ``v0001`` the first time it is seen."""
        if self.index_path.is_file():
            try:
                return json.loads(self.index_path.read_text())
            except ValueError:
                pass  # a damaged index is rebuilt from the files below
        idx: dict[str, Any] = {"served": None, "versions": []}
        for f in sorted(self.root.glob("v[0-9][0-9][0-9][0-9].pt")) if self.root.is_dir() else []:
            idx["versions"].append({"version": f.stem, "file": f.name, "created": None, "parent": None,
                                    "promoted": None, "metrics": {}, "note": "found on disk"})
        if not idx["versions"] and self.served_path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            copy_file_atomic(self.served_path, self.root / "v0001.pt")
            idx["versions"].append({"version": "v0001", "file": "v0001.pt", "created": _now(), "parent": None,
                                    "promoted": _now(), "metrics": {}, "note": "the checkpoint served first"})
            idx["served"] = "v0001"
        self._save(idx)
        return idx

    def _save(self, idx: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(idx, self.index_path)

    def next_path(self) -> tuple[str, Path]:
        """A fresh version name and its file path (not created)."""
        idx = self.index()
        n = max([int(v["version"][1:]) for v in idx["versions"]] + [0]) + 1
        name = f"v{n:04d}"
        return name, self.root / f"{name}.pt"

    def add(self, version: str, parent: str | None, metrics: dict[str, Any], note: str = "") -> None:
        with _LOCK:
            idx = self.index()
            idx["versions"].append({"version": version, "file": f"{version}.pt", "created": _now(), "parent": parent,
                                    "promoted": None, "metrics": metrics, "note": note})
            self._save(idx)

    def entry(self, version: str | None) -> dict[str, Any] | None:
        return next((v for v in self.index()["versions"] if v["version"] == version), None)

    def update_metrics(self, version: str, metrics: dict[str, Any]) -> None:
        """Merge ``metrics`` into a version's recorded figures."""
        with _LOCK:
            idx = self.index()
            for v in idx["versions"]:
                if v["version"] == version:
                    v["metrics"] = dict(v.get("metrics") or {}, **metrics)
            self._save(idx)

    def serve(self, version: str, note: str | None = None) -> None:
        """Make ``version`` the served checkpoint (atomic replace of the served file).

        Raises:
            ValueError: an unknown version, or its file is missing.
        """
        with _LOCK:
            idx = self.index()
            entry = next((v for v in idx["versions"] if v["version"] == version), None)
            if entry is None:
                raise ValueError(f"unknown model version {version!r}; known: "
                                 f"{', '.join(v['version'] for v in idx['versions']) or 'none'}")
            src = self.root / entry["file"]
            if not src.is_file():
                raise ValueError(f"model version {version} has no file at {src}")
            copy_file_atomic(src, self.served_path)
            entry["promoted"] = _now()
            if note:
                entry["note"] = (entry.get("note") + "; " if entry.get("note") else "") + note
            idx["served"] = version
            self._save(idx)

    def restore(self, version: str) -> None:
        """Serve an earlier version again (same as :meth:`serve`, recorded as a restore)."""
        self.serve(version, note="restored")

    def served(self) -> str | None:
        return self.index().get("served")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def heldout_split(ids: list[str], fraction: float, min_from: int) -> tuple[list[str], list[str]]:
    """``(train ids, held-out ids)``: an id is held out when the first 8 hex digits of its SHA-1, as a
    fraction of 2^32, fall below ``fraction`` (stable as more corrections arrive); nothing is held out
    below ``min_from`` ids, and at least one id always trains."""
    if len(ids) < max(2, int(min_from)) or fraction <= 0:
        return list(ids), []
    held = [i for i in ids if int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 2 ** 32 < fraction]
    if len(held) == len(ids):
        held = held[1:]
    return [i for i in ids if i not in held], held


def round_images(demo_root: str | os.PathLike | None, settings: dict[str, Any] | None = None) -> list[Path]:
    """The demo images a round with these settings reads besides the corrections: its replay sample
    (``replay_n`` of the demo training split, drawn with ``replay_seed`` as the trainer draws them) and the
    gate's validation images (the first ``demo_val_n`` of the val split). The app encodes them in the
    background once corrections arrive, so the first round does not wait for the encoder. Unknown
    settings are ignored here (the round itself rejects them); no demo folder gives ``[]``."""
    from .data import DemoDataset, replay_indices

    cfg = dict(FINETUNE_DEFAULTS, **{k: v for k, v in (settings or {}).items() if k in FINETUNE_DEFAULTS})
    if not demo_root or not (Path(demo_root) / "manifest.json").is_file():
        return []
    train = DemoDataset(demo_root, "train", load_masks=False)
    val = DemoDataset(demo_root, "val", load_masks=False)
    pick = replay_indices(len(train), cfg["replay_n"], int(cfg["replay_seed"]))
    return ([train.root / train.entries[i]["image"] for i in pick]
            + [val.root / e["image"] for e in val.entries[:int(cfg["demo_val_n"])]])


def _heldout_iou(predictor, dataset) -> float | None:
    """Mean IoU of the served boxes over the confirmed, present regions of corrected studies."""
    from .evaluate import box_ious

    vals = []
    for i in range(len(dataset)):
        s = dataset[i]
        ok = s["valid"] & s["present"]
        if not ok.any():
            continue
        p = predictor.predict(s["meta"]["image_path"])
        iou = np.asarray(box_ious(np.asarray(p.boxes, np.float32)[ok], s["boxes"][ok])).reshape(-1)  # element-wise
        vals.extend(iou.tolist())
    return float(np.mean(vals)) if vals else None


def _demo_map(predictor, demo_root: str | os.PathLike, n: int) -> float | None:
    from .evaluate import run_evaluation

    if not demo_root or not (Path(demo_root) / "manifest.json").is_file():
        return None
    res = run_evaluation(None, demo_root, "detection", split="val", limit=n, predictor=predictor)
    return res["metrics"]["mAP"]


def _recorded_demo_map(meta: dict[str, Any], demo_root: str | os.PathLike | None, n: int) -> float | None:
    """The checkpoint's own demo-val mAP when it was measured on exactly the images the gate would use: the
    box calibration's ``map_after`` (the calibrated model on its fitting split), if the calibration was fitted
    on the val split of this demo and on the images the gate evaluates (same
    :meth:`~anatomy_vlm.data.DemoDataset.fingerprint`), and was fitted on this checkpoint's weights (not
    carried over from a parent)."""
    from .data import DemoDataset

    cal = meta.get("box_calibration") or {}
    if (not demo_root or cal.get("split") != "val" or cal.get("carried_from") or "map_after" not in cal
            or not cal.get("fingerprint") or not (Path(demo_root) / "manifest.json").is_file()):
        return None
    # the calibration's fingerprint covers its whole split: equal only if the gate's first n are those images
    if DemoDataset(demo_root, "val", load_masks=False).fingerprint(n) != cal["fingerprint"]:
        return None
    return float(cal["map_after"])


def finetune_round(studies: str | os.PathLike, served: str | os.PathLike, demo_root: str | os.PathLike | None,
                   settings: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                   run_dir: str | os.PathLike | None = None, progress: Callable[[dict], None] | None = None,
                   versions_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fine-tune the served checkpoint on the corrected studies, gate and (maybe) serve the result.

    Args:
        studies: The studies folder (the datastore's).
        served: The served checkpoint file.
        demo_root: Demo studies folder (``manifest.json``): replay data and the demo validation split;
            ``None`` = neither.
        settings: Overrides of :data:`FINETUNE_DEFAULTS`.
        cache_dir: Encoder-embedding cache (share the server's so served images are not re-encoded).
        run_dir: Where the training log goes (default ``<versions>/runs/<version>``).
        progress: Called with a dict after each stage (``{"stage", ...}``) for the trainer's stats.

    Returns:
        ``{"version", "parent", "served" (version now served), "promoted" (bool), "reason", "metrics":
        {"candidate": {...}, "previous": {...}}`` (``previous.demo_val_source`` says when the served checkpoint's
        recorded figure stood in for measuring it again: see :func:`_recorded_demo_map`), ``"corrected":
        {"train", "heldout"}, "box_calibration_refit": [regions whose box offsets were refitted on the
        corrections], "seconds": {...}}`` (the refit counts under ``validate``).

    Raises:
        ValueError: unknown settings, too few corrected studies, no served checkpoint.
    """
    import torch

    from .data import CorrectionsDataset
    from .predict import Predictor
    from .train import load_config, train
    from .model.adapters import adapter_settings

    cfg = dict(FINETUNE_DEFAULTS)
    unknown = set(settings or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown fine-tuning setting(s) {sorted(unknown)}; valid: {sorted(cfg)}")
    cfg.update(settings or {})
    ad = cfg["encoder_adapters"]
    adapter_settings(ad)  # a bad setting fails here, before any background round starts
    if ad and int(cfg["encoder_blocks"]):
        raise ValueError("encoder_adapters and encoder_blocks exclude each other: adapt or train the blocks")
    served = Path(served)
    if not served.is_file():
        raise ValueError(f"no served checkpoint at {served} to fine-tune")
    report = progress or (lambda d: None)
    t0 = time.perf_counter()
    ids = CorrectionsDataset(studies).ids
    if len(ids) < int(cfg["min_corrected"]):
        raise ValueError(f"{studies}: {len(ids)} corrected studies with confirmed regions; a round needs at least "
                         f"{cfg['min_corrected']}")
    train_ids, held = heldout_split(ids, float(cfg["val_fraction"]), int(cfg["min_heldout_from"]))
    versions = ModelVersions(served, versions_root)
    parent = versions.served()
    version, path = versions.next_path()
    run = Path(run_dir) if run_dir else versions.root / "runs" / version
    data: dict[str, Any] = {"kind": "corrections", "studies": str(studies), "val_ids": held}
    if demo_root and (Path(demo_root) / "manifest.json").is_file():
        data.update(replay_root=str(demo_root), replay_n=int(cfg["replay_n"]), replay_seed=int(cfg["replay_seed"]),
                    replay_val_n=0)
    tcfg = load_config(None, {
        "data": data,
        "train": {"epochs": int(cfg["epochs"]), "batch_size": int(cfg["batch_size"]), "lr": float(cfg["lr"]),
                  "lr_min": float(cfg["lr_min"]), "val_every": max(1, int(cfg["epochs"])),
                  "init_checkpoint": str(served), "cache_dir": str(cache_dir) if cache_dir else None,
                  "threads": int(cfg["threads"]), "mask_every": int(cfg["mask_every"]), "augment_copies": 0,
                  "encoder_trainable_blocks": int(cfg["encoder_blocks"]) or None,
                  "encoder_adapters": dict(ad) if ad else None,
                  "feature_affine": cfg["feature_affine"], "image_jitter": cfg["image_jitter"]},
        "output": {"checkpoint": str(path), "run_dir": str(run), "weights_dtype": "float16"},
    })
    report({"stage": "training", "version": version, "corrected_train": len(train_ids), "heldout": len(held)})
    t1 = time.perf_counter()
    old_threads = torch.get_num_threads()
    try:
        train(tcfg, progress=False, command=f"anatomy_finetune round -> {version}")
    finally:
        torch.set_num_threads(old_threads)
    t2 = time.perf_counter()
    if not path.is_file():
        raise RuntimeError(f"fine-tuning wrote no checkpoint at {path}")
    refit = None
    if cfg["refit_boxes"]:
        from .box_calibration import refit_from_corrections

        report({"stage": "box calibration", "version": version})
        refit = refit_from_corrections(path, CorrectionsDataset(studies, train_ids), cache_dir=cache_dir,
                                       min_images=int(cfg["refit_min_images"]))
    report({"stage": "validating", "version": version})
    held_ds = CorrectionsDataset(studies, held) if held else None
    metrics: dict[str, dict[str, Any]] = {}
    n_val = int(cfg["demo_val_n"])
    known = (versions.entry(parent) or {}).get("metrics") or {}
    for name, ckpt in (("candidate", path), ("previous", served)):
        p = Predictor.from_checkpoint(ckpt, cache_dir=cache_dir)
        m = {"heldout_iou": _heldout_iou(p, held_ds) if held_ds is not None else None}
        fig = None
        if name == "previous":  # the served version's figure, measured when it was made
            if known.get("demo_val_n") == n_val and "demo_val_map" in known:
                fig = known["demo_val_map"]
            elif (fig := _recorded_demo_map(p.meta, demo_root, n_val)) is not None:
                m["demo_val_source"] = "checkpoint box calibration (same val images)"
        m["demo_val_map"] = fig if fig is not None else _demo_map(p, demo_root, n_val) if demo_root else None
        m["demo_val_n"] = n_val
        metrics[name] = m
    if parent and "demo_val_map" not in known:
        versions.update_metrics(parent, {"demo_val_map": metrics["previous"]["demo_val_map"], "demo_val_n": n_val})
    t3 = time.perf_counter()
    tol = float(cfg["tolerance"])
    worse = [k for k in ("heldout_iou", "demo_val_map")  # (held-out studies change as corrections arrive)
             if metrics["candidate"][k] is not None and metrics["previous"][k] is not None
             and metrics["candidate"][k] < metrics["previous"][k] - tol]
    promote = not worse
    reason = ("no validation figure fell by more than {:.3f}".format(tol) if promote else
              "not served: " + ", ".join(f"{k} {metrics['candidate'][k]:.3f} < {metrics['previous'][k]:.3f} - {tol}"
                                          for k in worse))
    versions.add(version, parent, metrics["candidate"], note=reason)
    if promote:
        versions.serve(version)
    result = {"version": version, "parent": parent, "served": versions.served(), "promoted": promote,
              "reason": reason, "metrics": metrics, "corrected": {"train": train_ids, "heldout": held},
              "box_calibration_refit": refit["refit_regions"] if refit else [],
              "seconds": {"prepare": round(t1 - t0, 2), "train": round(t2 - t1, 2), "validate": round(t3 - t2, 2),
                          "total": round(time.perf_counter() - t0, 2)}}
    report(dict(result, stage="done"))
    return result
