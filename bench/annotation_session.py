"""Benchmark: simulated annotation sessions on a shifted target domain, region_uncertainty against random.

    .venv/bin/python bench/annotation_session.py [--seeds 0 1 2] [--k 5] [--rounds 4] [--pool 40] [--heldout 20]

What it does, all in one run on this machine:
  * builds a target domain with the demo builder (projections of the real chest CT, every study drawn
    from the bands *outside* the pretraining ranges: pose, magnification, lower exposure, other grey
    mapping): a pool the annotator works through and separate held-out target images;
  * per seed and strategy, a session starting from the shipped checkpoint: each round the strategy picks
    ``k`` unlabelled pool images (``region_uncertainty``: :func:`anatomy_vlm.uncertainty.image_uncertainty`
    under the current model; ``random``: a seeded draw), a simulated annotator corrects all 29 regions'
    boxes and masks from the ground truth (written as the datastore writes corrections: confirmed regions,
    confirmed masks), and one fine-tuning round runs (:func:`anatomy_vlm.finetune.finetune_round`, the code
    ``POST /train/anatomy_finetune`` runs: replay, validation gate, versioned checkpoints);
  * after every round: box mAP and mean Dice of the served model on the held-out target images, and at the
    end box mAP on the demo test split (forgetting);
  * writes the JSON (all curves, round times, summary) and a PNG of mAP and Dice against the number of
    corrected images (mean and range over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _build(root: Path, n: int, seed: int) -> Path:
    from anatomy_vlm.demo import build_demo

    if not (root / "manifest.json").is_file():
        build_demo(root, n=n, seed=seed, size=512, progress=True, workers=2, split="test")
    return root


def _evaluate(predictor, root: Path) -> dict:
    from anatomy_vlm.evaluate import run_evaluation

    det = run_evaluation(None, root, "detection", split="test", predictor=predictor)["metrics"]
    seg = run_evaluation(None, root, "segmentation", split="test", predictor=predictor)["metrics"]
    return {"mAP": det["mAP"], "AP50": det["AP50"], "mean_iou": det["mean_iou"], "dice": seg["mean_dice"]}


def _correct_from_truth(studies: Path, image_id: str) -> None:
    """The simulated annotator: every region's box set to the reference box (absent = null) and every mask
    to the ground-truth mask (already in ``labels/final``), both confirmed (the reference boxes follow their
    own convention, not the masks' bounding boxes: see anatomy_vlm.box_calibration)."""
    from anatomy_vlm.io import read_json, write_json_atomic
    from anatomy_vlm.labels import merge_box_label, parse_box_correction

    truth = read_json(studies / "labels" / "boxes" / f"{image_id}.boxes.json")
    corr = parse_box_correction({"regions": [{"name": r["name"], "box": r.get("box")} for r in truth["regions"]]},
                                (int(truth["height"]), int(truth["width"])))
    doc = merge_box_label(truth, corr, image_id, "simulated annotator", time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          masks=True)
    write_json_atomic(doc, studies / "labels" / "boxes" / f"{image_id}.boxes.json")


def _session(strategy: str, seed: int, a, pool: Path, heldout: Path, work: Path, start: dict, log) -> dict:
    from anatomy_vlm.finetune import finetune_round
    from anatomy_vlm.predict import Predictor
    from anatomy_vlm.uncertainty import image_uncertainty

    sdir = work / f"{strategy}_s{seed}"
    shutil.rmtree(sdir, ignore_errors=True)
    studies = sdir / "studies"
    shutil.copytree(pool / "studies", studies)
    served = sdir / "model" / "anatomy_vlm.pt"
    served.parent.mkdir(parents=True)
    shutil.copy2(a.checkpoint, served)
    images = {p.name.split(".")[0]: p for p in studies.iterdir() if p.suffix in (".dcm", ".png")
              and (studies / "labels" / "final" / f"{p.name.split('.')[0]}.nii.gz").is_file()}  # not the real CR
    unlabelled = sorted(images)
    rng = np.random.default_rng(seed)
    curve = [dict(start, corrected=0)]
    rounds = []
    for r in range(a.rounds):
        predictor = Predictor.from_checkpoint(served, cache_dir=a.cache)
        t0 = time.perf_counter()
        if strategy == "random":
            pick = [unlabelled[i] for i in rng.choice(len(unlabelled), a.k, replace=False)]
        else:
            scores = {i: image_uncertainty(predictor, images[i])["score"] for i in unlabelled}
            pick = sorted(unlabelled, key=lambda i: -scores[i])[:a.k]
        t_pick = time.perf_counter() - t0
        for i in pick:
            _correct_from_truth(studies, i)
            unlabelled.remove(i)
        res = finetune_round(studies, served, a.demo, dict(a.settings, replay_seed=seed * 100 + r), cache_dir=a.cache)
        ev = _evaluate(Predictor.from_checkpoint(served, cache_dir=a.cache), heldout)
        n = a.k * (r + 1)
        curve.append(dict(ev, corrected=n))
        rounds.append({"round": r + 1, "corrected": n, "picked": pick, "pick_seconds": round(t_pick, 2),
                       "version": res["version"], "promoted": res["promoted"], "reason": res["reason"],
                       "seconds": res["seconds"]})
        log(f"{strategy} seed {seed} round {r + 1}: {n} corrected, mAP {ev['mAP']:.3f}, Dice {ev['dice']:.3f}, "
            f"round {res['seconds']['total']:.1f} s (train {res['seconds']['train']:.1f} s), "
            f"{'served' if res['promoted'] else 'kept back: ' + res['reason']}")
    final = Predictor.from_checkpoint(served, cache_dir=a.cache)
    from anatomy_vlm.evaluate import run_evaluation

    demo_test = run_evaluation(None, a.demo, "detection", split="test", predictor=final)["metrics"]["mAP"]
    return {"strategy": strategy, "seed": seed, "curve": curve, "rounds": rounds, "demo_test_map": demo_test}


def _images_to_reach(curve_x, curve_y, level):
    """Corrected images at which a (mean) curve first reaches ``level`` (linear interpolation), or None."""
    for i in range(1, len(curve_x)):
        if curve_y[i] >= level:
            y0, y1 = curve_y[i - 1], curve_y[i]
            t = 1.0 if y1 == y0 else (level - y0) / (y1 - y0)
            return float(curve_x[i - 1] + max(0.0, min(1.0, t)) * (curve_x[i] - curve_x[i - 1]))
    return None


def _plot(sessions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for strategy, colour in (("region_uncertainty", "tab:red"), ("random", "tab:blue")):
        ss = [s for s in sessions if s["strategy"] == strategy]
        if not ss:
            continue
        x = [c["corrected"] for c in ss[0]["curve"]]
        for ax, key, name in ((axes[0], "mAP", "box mAP@[.5:.95]"), (axes[1], "dice", "mean Dice")):
            ys = np.array([[c[key] for c in s["curve"]] for s in ss], float)
            ax.plot(x, ys.mean(0), "-o", color=colour, label=f"{strategy} (mean of {len(ss)} seeds)")
            ax.fill_between(x, ys.min(0), ys.max(0), color=colour, alpha=0.15)
            ax.set_xlabel("corrected images")
            ax.set_ylabel(name)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Simulated annotation sessions: held-out target images (projected from the real CT, "
                 "outside the pretraining ranges)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    p.add_argument("--demo", default=str(ROOT / "data/demo"), help="demo studies: replay, gate, forgetting")
    p.add_argument("--work", default=str(ROOT / "runs/annotation_session"))
    p.add_argument("--cache", default=str(ROOT / "data/cache/embeddings"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=5, help="images corrected per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pool", type=int, default=40)
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--strategies", nargs="+", default=["region_uncertainty", "random"])
    p.add_argument("--out", default=str(ROOT / "docs/results/annotation_session.json"))
    p.add_argument("--plot", default=str(ROOT / "docs/annotation_session.png"))
    p.add_argument("--settings", type=json.loads, default={},
                   help="fine-tuning settings (JSON, anatomy_vlm.finetune.FINETUNE_DEFAULTS keys)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pool = _build(work / "target_pool", a.pool, 1000)
    heldout = _build(work / "target_heldout", a.heldout, 2000)
    from anatomy_vlm.evaluate import run_evaluation
    from anatomy_vlm.predict import Predictor

    def log(msg):
        print(f"[{time.time() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    p0 = Predictor.from_checkpoint(a.checkpoint, cache_dir=a.cache)
    start = _evaluate(p0, heldout)
    start_demo = run_evaluation(None, a.demo, "detection", split="test", predictor=p0)["metrics"]["mAP"]
    log(f"start: target mAP {start['mAP']:.3f}, Dice {start['dice']:.3f}; demo test mAP {start_demo:.3f}")
    sessions = []
    for seed in a.seeds:
        for strategy in a.strategies:
            sessions.append(_session(strategy, seed, a, pool, heldout, work, start, log))
            Path(a.out).write_text(json.dumps({"partial": True, "sessions": sessions}, indent=1))
    summary = {}
    for strategy in a.strategies:
        ss = [s for s in sessions if s["strategy"] == strategy]
        x = [c["corrected"] for c in ss[0]["curve"]]
        m = np.mean([[c["mAP"] for c in s["curve"]] for s in ss], 0)
        d = np.mean([[c["dice"] for c in s["curve"]] for s in ss], 0)
        summary[strategy] = {"corrected": x, "mean_map": [round(float(v), 4) for v in m],
                             "mean_dice": [round(float(v), 4) for v in d],
                             "map_gain_at_end": round(float(m[-1] - m[0]), 4),
                             "demo_test_map_change": round(float(np.mean([s["demo_test_map"] for s in ss]) - start_demo), 4),
                             "round_seconds_mean": round(float(np.mean([r["seconds"]["total"] for s in ss
                                                                         for r in s["rounds"]])), 1)}
    if "random" in summary and "region_uncertainty" in summary:
        target = summary["random"]["mean_map"][-1]
        need = _images_to_reach(summary["region_uncertainty"]["corrected"], summary["region_uncertainty"]["mean_map"],
                                target)
        summary["uncertainty_images_to_reach_random_final"] = need
        summary["ratio_to_random"] = None if need is None else round(need / summary["random"]["corrected"][-1], 3)
    ten = [r for s in sessions for r in s["rounds"] if r["corrected"] == 10]
    out = {"data": "target domain: demo-builder projections of the real chest CT, all drawn outside the "
                   f"pretraining ranges (pool seed 1000, n={a.pool}; held-out seed 2000, n={a.heldout}); "
                   "forgetting: the demo test split",
           "settings": a.settings, "start": start, "start_demo_test_map": start_demo, "k": a.k, "rounds": a.rounds, "seeds": a.seeds,
           "summary": summary, "round_at_10_corrected_seconds": [r["seconds"] for r in ten],
           "sessions": sessions, "seconds": round(time.time() - t0, 1),
           "command": "python bench/annotation_session.py " + " ".join(argv or sys.argv[1:])}
    Path(a.out).write_text(json.dumps(out, indent=1))
    _plot(sessions, Path(a.plot))
    print(json.dumps({k: out[k] for k in ("start", "start_demo_test_map", "summary", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
