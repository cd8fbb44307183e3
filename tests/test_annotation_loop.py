"""The annotation loop on a real server: corrections in (boxes and masks), ``POST /train/anatomy_finetune``
in MONAI Label's background process while infer calls are answered, a new version served, restore, and
a training process killed with SIGKILL leaving the served checkpoint intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import httpx
import numpy as np
import psutil
import pytest
import torch
from live_server import launch_server

from anatomy_vlm.anatomy import NUM_REGIONS, REGIONS

DENSE_TINY = {"decoder": {"d_model": 32, "num_layers": 1, "num_heads": 2, "dim_feedforward": 64, "embed_dim": 16},
              "mask_head": {"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
              "box_refiner": {"enabled": False}}
FAST = {"epochs": 1, "replay_n": 2, "demo_val_n": 2, "min_heldout_from": 3, "val_fraction": 0.5}


@pytest.fixture(scope="module")
def loop_server(demo_studies, tmp_path_factory):
    from anatomy_vlm.checkpoint import save_checkpoint
    from anatomy_vlm.model import build_model
    from test_app import APP_DIR

    base = tmp_path_factory.mktemp("loop")
    demo = base / "demo"  # the demo layout: manifest.json next to studies/ (replay + validation)
    shutil.copytree(demo_studies.root, demo)
    torch.manual_seed(0)
    ckpt = base / "start.pt"
    save_checkpoint(ckpt, build_model(DENSE_TINY), {"data": "random start (test)"})
    server = launch_server(APP_DIR, demo / "studies", base, checkpoint=ckpt,
                           conf={"embedding_cache": base / "cache" / "embeddings", "prefetch_lookahead": 0})
    yield server
    server.stop()


def _ids(server) -> list[str]:
    return sorted(p.name[: -len(".boxes.json")] for p in (server.studies / "labels" / "boxes").glob("*.boxes.json"))


def _correct_boxes(server, image: str, names: list[str]) -> None:
    prev = json.loads((server.studies / "labels" / "boxes" / f"{image}.boxes.json").read_text())
    body = {"regions": [r for r in prev["regions"] if r["name"] in names]}
    r = httpx.put(server.url("/datastore/label"), params={"image": image},
                  files={"label": ("c.json", json.dumps(body).encode())}, data={"params": json.dumps({"user": "t"})},
                  timeout=60)
    assert r.status_code == 200, r.text


def _wait_train(server, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(server.url("/train/"), params={"check_if_running": False}, timeout=30)
        st = r.json() if r.status_code == 200 else {}
        if st.get("status") in ("DONE", "ERROR"):
            return st
        time.sleep(1)
    pytest.fail(f"training did not finish in {timeout} s:\n{server.log_tail()}")


def _train_child(server):
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "monailabel.interfaces.utils.app" in " ".join(p.cmdline()) and "train" in p.cmdline():
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_mask_corrections_confirm_their_regions(loop_server, tmp_path):
    import nibabel as nib

    from anatomy_vlm.io import read_image, write_region_masks

    image = _ids(loop_server)[3]
    H, W = read_image(next(loop_server.studies.glob(f"{image}.*"))).pixels.shape
    masks = np.zeros((NUM_REGIONS, H, W), bool)
    masks[0, 10:40, 5:30] = True  # right lung
    write_region_masks(masks, tmp_path / "m.nii.gz")
    r = httpx.put(loop_server.url("/datastore/label"), params={"image": image},
                  files={"label": ("m.nii.gz", (tmp_path / "m.nii.gz").read_bytes())},
                  data={"params": json.dumps({"user": "ann2", "regions": ["right lung", "trachea"]})}, timeout=60)
    assert r.status_code == 200, r.text
    doc = json.loads((loop_server.studies / "labels" / "boxes" / f"{image}.boxes.json").read_text())
    assert doc["confirmed_masks"] == ["right lung", "trachea"] and doc["confirmed"]["right lung"]["user"] == "ann2"
    rl = next(x for x in doc["regions"] if x["name"] == "right lung")
    assert rl["box"] == [5.0, 10.0, 30.0, 40.0]
    assert next(x for x in doc["regions"] if x["name"] == "trachea")["box"] is None  # named, empty: absent
    stored = nib.load(str(loop_server.studies / "labels" / "final" / f"{image}.nii.gz"))
    assert stored.shape[:2] == (W, H)
    from anatomy_vlm.data import CorrectionsDataset

    s = CorrectionsDataset(loop_server.studies, [image])[0]
    assert s["masks"] is not None and s["mask_valid"].sum() == 2 and s["mask_valid"][0]
    assert {REGIONS[k].name for k in np.flatnonzero(s["valid"])} == {"right lung", "trachea"}


@pytest.mark.slow
def test_train_over_rest_serves_a_new_version_while_infer_answers(loop_server):
    ids = _ids(loop_server)
    for i in ids[:3]:
        _correct_boxes(loop_server, i, ["right lung", "left lung", "cardiac silhouette", "trachea"])
    served = loop_server.app_dir / "model" / "anatomy_vlm.pt"
    before = served.read_bytes()
    r = httpx.post(loop_server.url("/train/anatomy_finetune"), json=dict(FAST, tolerance=1.0), timeout=60)
    assert r.status_code == 200, r.text
    answered = 0
    while _train_child(loop_server) is not None or answered == 0:
        r = httpx.post(loop_server.url("/infer/anatomy_detection"), params={"image": ids[0]}, timeout=120)
        assert r.status_code == 200, r.text
        answered += 1
    st = _wait_train(loop_server)
    assert st["status"] == "DONE", st
    stats = httpx.get(loop_server.url("/info/"), timeout=30).json()["train_stats"]["anatomy_finetune"]
    assert stats["stage"] == "done" and stats["promoted"] and stats["served"] == stats["version"] == "v0002"
    assert served.read_bytes() != before
    r = httpx.post(loop_server.url("/infer/anatomy_detection"), params={"image": ids[0]}, timeout=120)
    assert r.status_code == 200, r.text  # the new version, loaded without a restart

    r = httpx.post(loop_server.url("/train/anatomy_finetune"), json={"restore_version": "v0001"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _wait_train(loop_server)["status"] == "DONE"
    assert served.read_bytes() == before


@pytest.mark.slow
def test_training_killed_with_sigkill_leaves_the_served_checkpoint_intact(loop_server):
    served = loop_server.app_dir / "model" / "anatomy_vlm.pt"
    before = served.read_bytes()
    r = httpx.post(loop_server.url("/train/anatomy_finetune"), json=dict(FAST, epochs=30, tolerance=1.0), timeout=60)
    assert r.status_code == 200, r.text
    stats_file = loop_server.app_dir / "model" / "versions" / "train_stats.json"
    deadline = time.monotonic() + 300
    child = None
    while time.monotonic() < deadline:
        child = _train_child(loop_server)
        try:
            stage = json.loads(stats_file.read_text()).get("stage")
        except (OSError, ValueError):
            stage = None
        if child is not None and stage == "training":
            break
        time.sleep(0.5)
    assert child is not None, loop_server.log_tail()
    time.sleep(3)  # inside the training loop
    os.kill(child.pid, signal.SIGKILL)
    assert _wait_train(loop_server)["status"] == "ERROR"
    assert served.read_bytes() == before
    assert not [p for p in served.parent.rglob("*.tmp")], "a temporary file was left behind"
    from anatomy_vlm.checkpoint import load_model

    load_model(served)  # complete and loadable
    image = _ids(loop_server)[0]
    r = httpx.post(loop_server.url("/infer/anatomy_detection"), params={"image": image}, timeout=120)
    assert r.status_code == 200, r.text
