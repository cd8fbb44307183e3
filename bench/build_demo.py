"""Benchmark: time of `anatomy-vlm build-demo` and where it goes, with a same-run baseline.

    .venv/bin/python bench/build_demo.py --n 200 --workers 2        # the figure in the issue note

Prints wall time for N studies, seconds per study, the time of the projector's irreducible work
measured in the same run (one trilinear grid_sample pass over the same number of ray samples as a
512 px study, i.e. what any grid_sample-based projector must pay), and the ratio of the two.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def floor_seconds(samples: int, reps: int = 3) -> float:
    """Seconds for one trilinear grid_sample pass over ``samples`` points on a CT-sized volume."""
    vol = torch.rand(1, 1, 133, 512, 512)
    chunk = 32 * 512 * 128
    grid = torch.rand(1, 32, 512, 128, 3) * 2 - 1
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(max(1, samples // chunk)):
            F.grid_sample(vol, grid, mode="bilinear", align_corners=True)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="keep the output here (default: a temp folder, deleted)")
    a = p.parse_args(argv)
    from anatomy_vlm.demo import build_demo
    from anatomy_vlm.demo.ct import load_prepared_ct

    torch.set_num_threads(2)
    t = time.perf_counter()
    load_prepared_ct()  # warm the CT cache so the figure is the build itself
    t_ct = time.perf_counter() - t
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench-demo-"))
    t = time.perf_counter()
    build_demo(out, n=a.n, seed=a.seed, size=a.size, progress=True, workers=a.workers)
    wall = time.perf_counter() - t
    torch.set_num_threads(2)
    floor = floor_seconds(a.size * a.size * 128)
    per = wall / a.n
    print(f"command: .venv/bin/python bench/build_demo.py --n {a.n} --size {a.size} --workers {a.workers}")
    print(f"CT preparation (cached after first use): {t_ct:.1f} s")
    print(f"build-demo --n {a.n} --size {a.size} --workers {a.workers}: {wall:.1f} s "
          f"({per:.2f} s/study, {a.n / wall * 60:.0f} studies/min)")
    print(f"baseline, same run: one grid_sample pass over {a.size}x{a.size}x128 samples, 2 threads: {floor:.2f} s")
    print(f"ratio per study / baseline: {per / floor:.1f}x")
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
