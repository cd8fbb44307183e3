"""Benchmark: which kind of variation outside the training ranges costs the detector its accuracy.

    .venv/bin/python bench/shift_breakdown.py [--n 40] [--groups none all pose anatomy ...]
    .venv/bin/python bench/shift_breakdown.py --tasks findings --out docs/results/shift_breakdown_findings.json

The demo test split draws every varied parameter from bands outside the training ranges at once (see
anatomy_vlm.demo.builder.RANGES). This bench builds, per group of parameters, ``n`` studies projected
from the real chest CT in which only that group is drawn from the outside bands (the rest from the
training ranges; ``none``: nothing shifted, ``all``: the test split's recipe), all from the same seed,
and scores the served checkpoint on each: box mAP@[.5:.95], AP50, mean IoU and mean Dice, plus each
region's AP against ``none``; with ``--tasks findings`` (a checkpoint with the language stage) the
zero-shot figures of ``anatomy-vlm evaluate --task findings``: region and image AUC (canonical and
paraphrased prompts, macro and per finding) and grounding top-1. The encoder's embeddings go to the usual cache, so a second run costs only
the heads. Writes docs/results/shift_breakdown.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from anatomy_vlm.demo.builder import SHIFT_GROUPS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    p.add_argument("--work", default=str(ROOT / "runs/shift_breakdown"), help="the built studies (kept)")
    p.add_argument("--cache", default=str(ROOT / "data/cache/embeddings"))
    p.add_argument("--n", type=int, default=40, help="studies per group")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--groups", nargs="+", default=["none", "all", *SHIFT_GROUPS],
                   help=f"none, all, or groups of the builder: {', '.join(SHIFT_GROUPS)}")
    p.add_argument("--tasks", nargs="+", default=["detection", "segmentation"],
                   choices=["detection", "segmentation", "findings"])
    p.add_argument("--out", default=str(ROOT / "docs/results/shift_breakdown.json"))
    a = p.parse_args(argv)
    bad = [g for g in a.groups if g not in ("none", "all", *SHIFT_GROUPS)]
    if bad:
        p.error(f"unknown group(s) {bad}; valid: none, all, {', '.join(SHIFT_GROUPS)}")

    import torch

    from anatomy_vlm.demo import build_demo
    from anatomy_vlm.evaluate import run_evaluation
    from anatomy_vlm.predict import Predictor

    torch.set_num_threads(2)
    t0 = time.time()
    predictor = Predictor.from_checkpoint(a.checkpoint, cache_dir=a.cache)
    results = {}
    for g in a.groups:
        root = Path(a.work) / g.replace(" ", "_")
        if not (root / "manifest.json").is_file():
            shifted = None if g == "all" else [] if g == "none" else [g]
            build_demo(root, n=a.n, seed=a.seed, size=512, progress=True, workers=2, split="test", shifted=shifted)
        r: dict = {"shifted": "every parameter" if g == "all" else [] if g == "none" else list(SHIFT_GROUPS[g])}
        said = []
        if "detection" in a.tasks:
            det = run_evaluation(None, root, "detection", split="test", predictor=predictor)["metrics"]
            r.update({"mAP": round(det["mAP"], 4), "AP50": round(det["AP50"], 4), "mean_iou": round(det["mean_iou"], 4),
                      "region_ap": {k: round(v["AP"], 4) for k, v in det["per_region"].items()}})
            said.append(f"mAP {det['mAP']:.3f}, AP50 {det['AP50']:.3f}")
        if "segmentation" in a.tasks:
            seg = run_evaluation(None, root, "segmentation", split="test", predictor=predictor)["metrics"]
            r["mean_dice"] = round(seg["mean_dice"], 4)
            said.append(f"Dice {seg['mean_dice']:.3f}")
        if "findings" in a.tasks:
            fm = run_evaluation(None, root, "findings", split="test", predictor=predictor)["metrics"]
            r["findings"] = {w: {"region_auc_macro": _r(fm[w]["region_auc_macro"]), "image_auc_macro": _r(fm[w]["image_auc_macro"]),
                                 "region_auc": {f: _r(v) for f, v in fm[w]["region_auc"].items()},
                                 "image_auc": {f: _r(v) for f, v in fm[w]["image_auc"].items()}}
                             for w in ("canonical", "paraphrased")}
            r["findings"]["grounding"] = fm["grounding"]
            said.append(f"region AUC {_f(fm['canonical']['region_auc_macro'])}, image AUC "
                        f"{_f(fm['canonical']['image_auc_macro'])}, grounding {_f(fm['grounding']['top1_correct'])}")
        results[g] = r
        print(f"[{time.time() - t0:6.0f} s] {g}: " + ", ".join(said), file=sys.stderr, flush=True)
    base = results.get("none")
    if base and "mAP" in base:
        for g, r in results.items():
            r["mAP_change"] = round(r["mAP"] - base["mAP"], 4)
            drops = {k: round(v - base["region_ap"][k], 4) for k, v in r["region_ap"].items()}
            r["largest_region_ap_drops"] = dict(sorted(drops.items(), key=lambda kv: kv[1])[:6])
    out = {"data": f"demo-builder projections of the real chest CT, {a.n} studies per group (seed {a.seed}); "
                   "each group drawn outside the training ranges, everything else inside them",
           "checkpoint": a.checkpoint, "groups": results, "seconds": round(time.time() - t0, 1),
           "command": "python bench/shift_breakdown.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({g: {k: r[k] for k in ("mAP", "AP50", "mean_dice", "mAP_change") if k in r}
                      | ({"region_auc": r["findings"]["canonical"]["region_auc_macro"],
                          "image_auc": r["findings"]["canonical"]["image_auc_macro"],
                          "grounding": r["findings"]["grounding"]["top1_correct"]} if "findings" in r else {})
                      for g, r in results.items()}, indent=1))
    return 0


def _r(v):
    return None if v is None else round(float(v), 4)


def _f(v):
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
