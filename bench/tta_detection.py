"""Benchmark: does test-time augmentation of the dense mask head improve boxes and masks?

    .venv/bin/python bench/tta_detection.py [--split test] [--views '[[0.9,0,0,0],[1.1,0,0,0],[1,5,0,0],[1,-5,0,0]]']

Each view is ``[scale, rotation_deg, dx, dy]``: the letterboxed model input is warped by it (zoom by
``scale`` about the centre, rotation, shift in normalised units), encoded (one extra encoder pass per
view), the dense head's mask logits of the view are warped back to the input frame, and the logits are
averaged with the plain prediction's, per pixel over the views that see it. Boxes then come from the
averaged logits as served (largest part, box calibration). The first pass (``[]`` views) reproduces the
served figures. Prints box mAP@[.5:.95] / AP50 / AP75 / mean IoU and mean Dice (heart, lungs) on the demo
split, for no views and for the views given, in one run; ``--out`` writes the JSON. The extra views' encoder
passes are not cached, so this takes about (1 + views) x the encoder time per image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def view_theta(scale: float, rot_deg: float, dx: float, dy: float) -> torch.Tensor:
    """``(2, 3)`` affine_grid matrix: output (view) normalised coordinates -> input coordinates."""
    a = math.radians(rot_deg)
    c, s = math.cos(a) / scale, math.sin(a) / scale
    return torch.tensor([[c, -s, dx], [s, c, dy]], dtype=torch.float32)


def inverse_theta(t: torch.Tensor) -> torch.Tensor:
    m = torch.cat([t, torch.tensor([[0.0, 0.0, 1.0]])])
    return torch.linalg.inv(m)[:2]


def tta_predictor(checkpoint: str, cache_dir: str | None, views: list[list[float]]):
    from anatomy_vlm.predict import Predictor

    class TTAPredictor(Predictor):
        def _dense_head(self, emb):
            head = super()._dense_head(emb)

            def run(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                plain = head(e, x).float()  # (1, K, S, S)
                acc, weight = plain.clone(), torch.ones_like(plain[:, :1])
                for v in views:
                    t = view_theta(*v)[None]
                    xv = F.grid_sample(x, F.affine_grid(t, list(x.shape), align_corners=False), align_corners=False)
                    with self._encoder_lock:  # (predict() calls this under torch.no_grad())
                        ev = self._encoder()(xv)[0].float()
                    lv = head(ev[None], xv).float()
                    back_grid = F.affine_grid(inverse_theta(t[0])[None], list(plain.shape), align_corners=False)
                    back = F.grid_sample(lv, back_grid, align_corners=False, padding_mode="border")
                    seen = (F.grid_sample(torch.ones_like(lv[:, :1]), back_grid, align_corners=False) > 0.99).float()
                    acc += back * seen
                    weight += seen
                return acc / weight

            return run

    return TTAPredictor.from_checkpoint(checkpoint, cache_dir=cache_dir)


def measure(checkpoint: str, root: str, split: str, cache_dir: str | None, views: list[list[float]]) -> dict:
    from anatomy_vlm.evaluate import run_evaluation

    p = tta_predictor(checkpoint, cache_dir, views)
    t0 = time.perf_counter()
    det = run_evaluation(None, root, "detection", split=split, predictor=p)["metrics"]
    seg = run_evaluation(None, root, "segmentation", split=split, predictor=p)["metrics"]
    return {"views": views, "mAP": det["mAP"], "AP50": det["AP50"], "AP75": det["AP75"], "mean_iou": det["mean_iou"],
            "mean_dice": seg["mean_dice"], "dice_heart": seg["dice_heart"], "dice_right_lung": seg["dice_right_lung"],
            "dice_left_lung": seg["dice_left_lung"], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    ap.add_argument("--demo-root", default=str(ROOT / "data/demo"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--cache-dir", default=str(ROOT / "data/cache/embeddings"))
    ap.add_argument("--views", default="[[0.9,0,0,0],[1.1,0,0,0],[1,5,0,0],[1,-5,0,0]]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    views = json.loads(a.views)
    if not isinstance(views, list) or not all(isinstance(v, list) and len(v) == 4 for v in views):
        ap.error("--views: a JSON list of [scale, rotation_deg, dx, dy] lists")
    if not (Path(a.demo_root) / "manifest.json").is_file():
        ap.error(f"{a.demo_root}: no demo studies (build them: anatomy-vlm build-demo --out {a.demo_root})")
    torch.set_num_threads(a.threads)
    rows = [measure(a.checkpoint, a.demo_root, a.split, a.cache_dir, vs) for vs in ([], views)]
    for r in rows:
        print(f"views {len(r['views'])}: mAP {r['mAP']:.4f} AP50 {r['AP50']:.4f} AP75 {r['AP75']:.4f} "
              f"mean IoU {r['mean_iou']:.4f} | Dice {r['mean_dice']:.4f} heart {r['dice_heart']:.4f} "
              f"lungs {r['dice_right_lung']:.4f} / {r['dice_left_lung']:.4f} | {r['seconds']} s")
    doc = {"split": a.split, "demo_root": a.demo_root, "checkpoint": a.checkpoint, "rows": rows,
           "data": "demo studies projected from the real chest CT"}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
