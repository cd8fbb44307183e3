"""Benchmark: time of `anatomy-vlm build-demo` and where it goes, with a same-run baseline.

    .venv/bin/python bench/build_demo.py --n 200 --workers 2        # the figure in the issue note

Prints wall time for N studies, seconds per study, and as a same-run baseline the time of one bare
projection (the attenuation line integrals of one study, the core of the work), with the ratio of the
two: everything else (findings, labels, rendering, region rules, DICOM/PNG/NIfTI writing) and the
parallel workers move that ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def projection_seconds(size: int, reps: int = 2) -> float:
    """Seconds for the projector's core work for one study: the attenuation line integrals of one
    ``size`` px PA projection (no findings, rendering, labels or writing), best of ``reps``."""
    from anatomy_vlm.demo.builder import CTInfo
    from anatomy_vlm.demo.ct import load_prepared_ct
    from anatomy_vlm.demo.projector import Geometry, Projector

    ct = load_prepared_ct()
    info = CTInfo(ct)
    proj = Projector(ct)
    mu = proj.attenuation_volume(ct.hu)
    c = tuple((info.lung_lo + info.lung_hi) / 2)
    g = Geometry(rows=size, cols=size, pixel_mm=0.75 * 512 / size, centre=c)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        proj.project(g, mu)
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
    floor = projection_seconds(a.size)
    per = wall / a.n
    print(f"command: .venv/bin/python bench/build_demo.py --n {a.n} --size {a.size} --workers {a.workers}")
    print(f"CT preparation (cached after first use): {t_ct:.1f} s")
    print(f"build-demo --n {a.n} --size {a.size} --workers {a.workers}: {wall:.1f} s "
          f"({per:.2f} s/study, {a.n / wall * 60:.0f} studies/min)")
    print(f"baseline, same run: one bare {a.size} px projection (line integrals only, 2 threads): {floor:.2f} s")
    print(f"ratio wall time per study / bare projection: {per / floor:.2f}x")
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
