"""Benchmark: one ``anatomy_finetune`` round over REST on 10 corrected studies, with infer calls meanwhile.

    .venv/bin/python bench/finetune_rest.py [--n 10] [--cold --pause 90] [--conf warm_finetune=false]

What it does, in one run on this machine:
  * copies the demo studies (a temporary folder next to a copy of the demo manifest, so replay and the
    validation gate work as in ``./scripts/serve.sh``) and starts ``monailabel start_server`` with the
    shipped checkpoint;
  * a simulated annotator saves ``n`` corrections over ``PUT /datastore/label`` (each study's ground-truth
    masks as a mask label, which confirms all 29 regions with their boxes);
  * (``--pause S``: the annotator's time between the last correction and the training request; with
    ``--cold`` the embedding cache starts empty, as on a fresh server, so what the server encodes in the
    background meanwhile, app conf ``warm_finetune``, is what the first round finds cached);
  * ``POST /train/anatomy_finetune``, then ``anatomy_detection`` calls on a cached image every 0.5 s until
    the round ends: the round's wall time (request to DONE, MONAI Label's background process included) and
    the infer latencies during it against the same calls before it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import Server  # noqa: E402



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    p.add_argument("--demo", default=str(ROOT / "data/demo"))
    p.add_argument("--cache", default=str(ROOT / "data/cache/embeddings"))
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--cold", action="store_true",
                   help="start from an empty embedding cache (a fresh server) instead of --cache")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds between the last correction and the training request (the annotator's time)")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra app conf")
    a = p.parse_args(argv)
    import requests

    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    demo = tmp / "demo"
    demo.mkdir()
    shutil.copy2(Path(a.demo) / "manifest.json", demo / "manifest.json")
    shutil.copytree(Path(a.demo) / "studies", demo / "studies")
    app = tmp / "app"
    shutil.copytree(ROOT / "apps/anatomy_vlm", app, ignore=shutil.ignore_patterns("model", "logs", "bin"))
    (app / "model").mkdir()
    shutil.copy2(a.checkpoint, app / "model" / "anatomy_vlm.pt")
    cache = str(tmp / "cache" / "embeddings") if a.cold else a.cache
    conf = {"embedding_cache": cache, "prefetch_lookahead": 0, **dict(c.split("=", 1) for c in a.conf)}
    server = Server(app, demo / "studies", tmp, conf)
    url = server.url
    try:
        manifest = json.loads((demo / "manifest.json").read_text())
        train_ids = [s["id"] for s in manifest["studies"] if s.get("split") == "train"]
        # corrections on studies outside the replay sample's likely picks do not matter: all are demo train
        chosen = train_ids[-a.n:]
        for i in chosen:
            mask = demo / "studies" / "labels" / "final" / f"{i}.nii.gz"
            r = requests.put(f"{url}/datastore/label", params={"image": i},
                             files={"label": (f"{i}.nii.gz", mask.read_bytes())},
                             data={"params": json.dumps({"user": "bench"})}, timeout=120)
            if r.status_code != 200:
                raise SystemExit(f"correction of {i}: HTTP {r.status_code} {r.text[:300]}")
        warm = chosen[0]

        def infer() -> float:
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/anatomy_detection", params={"image": warm}, timeout=300)
            if r.status_code != 200:
                raise SystemExit(f"infer: HTTP {r.status_code} {r.text[:300]}")
            return time.perf_counter() - t

        infer()
        before = [infer() for _ in range(7)]
        if a.pause > 0:
            time.sleep(a.pause)
        t0 = time.perf_counter()
        r = requests.post(f"{url}/train/anatomy_finetune", json={}, timeout=60)
        if r.status_code != 200:
            raise SystemExit(f"train: HTTP {r.status_code} {r.text[:300]}")
        during = []
        while True:
            st = requests.get(f"{url}/train/", params={"check_if_running": False}, timeout=30).json()
            if st.get("status") in ("DONE", "ERROR"):
                break
            during.append(infer())
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        stats = requests.get(f"{url}/info/", timeout=30).json().get("train_stats", {}).get("anatomy_finetune", {})
    finally:
        server.stop()
    res = {"data": f"{a.n} demo training studies (projected from the real chest CT) corrected from their ground "
                   "truth masks; replay and validation from the demo studies",
           "embedding_cache": "empty at the start" if a.cold else a.cache, "pause_s": a.pause, "conf": conf,
           "status": st.get("status"), "round_wall_s": round(wall, 1),
           "round_library_seconds": stats.get("seconds"), "promoted": stats.get("promoted"),
           "reason": stats.get("reason"), "metrics": stats.get("metrics"),
           "infer_p50_before_s": round(statistics.median(before), 3),
           "infer_p50_during_s": round(statistics.median(during), 3) if during else None,
           "infer_max_during_s": round(max(during), 3) if during else None, "infer_calls_during": len(during)}
    print(json.dumps(res, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if st.get("status") == "DONE" else 1


if __name__ == "__main__":
    sys.exit(main())
