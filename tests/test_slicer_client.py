"""The Slicer module's client library (no Slicer needed) against a real server with the shipped checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from live_server import launch_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_module" / "AnatomyVLM"))
from AnatomyVLMLib import AnatomyVLMClient, ClientError  # noqa: E402

from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES  # noqa: E402


@pytest.fixture(scope="module")
def server(demo_studies, tmp_path_factory):
    base = tmp_path_factory.mktemp("client")
    demo = base / "demo"
    shutil.copytree(demo_studies.root, demo)
    s = launch_server(REPO / "apps" / "anatomy_vlm", demo / "studies", base,
                      checkpoint=REPO / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt",
                      conf={"embedding_cache": base / "cache" / "embeddings", "prefetch_lookahead": 0})
    s.url("/info/")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return AnatomyVLMClient(server.base_url)


@pytest.fixture(scope="module")
def image(demo_studies):
    return demo_studies.ids(".png")[0]


def test_info_and_detection_with_roi_markups(client, image):
    assert client.info()["name"] == "Anatomy-VLM Label"
    res = client.detect(image)
    assert [r["name"] for r in res.json["regions"]] == list(REGION_NAMES)
    assert res.file_name.endswith(".json")
    markups = json.loads(res.file_bytes)["markups"]
    assert len(markups) == NUM_REGIONS and markups[0]["type"] == "ROI"
    sub = client.detect(image, ["left lung", "carina"])
    assert [r["name"] for r in sub.json["regions"]] == ["left lung", "carina"]


def test_segmentation_findings_and_grounding(client, image):
    seg = client.segment(image, ["right lung", "right lower lung zone"])
    assert seg.file_name.endswith(".seg.nrrd") and seg.file_bytes[:4] == b"NRRD"
    assert [s["name"] for s in seg.json["segments"]] == ["right lung", "right lower lung zone"]
    f = client.findings(image, ["pleural effusion", "hydrothorax"], top_k=2)
    assert f["prompts"] == ["pleural effusion", "hydrothorax"] and len(f["regions"]) == NUM_REGIONS
    g = client.ground(image, "The heart is enlarged.")
    assert len(g.json["regions"]) == 3 and g.file_name.endswith(".nii.gz")


def test_corrections_boxes_markups_and_masks(client, server, image, tmp_path):
    from anatomy_vlm.io import read_image, write_region_masks

    stored = server.studies / "labels" / "boxes" / f"{image}.boxes.json"
    client.save_boxes(image, {"right lung": [2, 3, 40, 90], "carina": None}, user="ann")
    doc = json.loads(stored.read_text())
    assert doc["confirmed"]["right lung"]["user"] == "ann"
    assert next(r for r in doc["regions"] if r["name"] == "carina")["box"] is None
    # an edited ROI file from the detection task goes back as is
    markups = client.detect(image, ["trachea"]).file_bytes
    client.save_markups(image, markups, user="ann2")
    assert json.loads(stored.read_text())["confirmed"]["trachea"]["user"] == "ann2"
    H, W = read_image(server.studies / f"{image}.png").pixels.shape
    masks = np.zeros((NUM_REGIONS, H, W), bool)
    masks[8, 10:30, 60:90] = True  # left lung
    write_region_masks(masks, tmp_path / "m.nii.gz")
    client.save_masks(image, (tmp_path / "m.nii.gz").read_bytes(), ["left lung"])
    assert json.loads(stored.read_text())["confirmed_masks"] == ["left lung"]


def test_active_learning_and_restoring_a_version(client):
    nxt = client.next_image("region_uncertainty")
    assert nxt.get("id") == "real_rg1_uncr"  # the one image without labels
    client.restore("v0001")  # the served file, registered as the first version
    deadline = time.monotonic() + 180
    while client.train_status().get("status") not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, "restore did not finish"
        time.sleep(1)
    assert client.train_status()["status"] == "DONE"
    assert client.train_stats()["stage"] == "restored" and client.train_stats()["served"] == "v0001"


@pytest.mark.parametrize("call,status,text", [
    (lambda c, i: c.detect("no_such_image"), 404, "unknown image"),
    (lambda c, i: c.detect(i, ["left kidney"]), 400, "unknown region 'left kidney'"),
    (lambda c, i: c.ground(i, ""), 400, "needs a sentence"),
    (lambda c, i: c.findings(i, ["x" * 1001]), 400, "at most 1000 characters"),
    (lambda c, i: c.save_boxes(i, {"spleen": [0, 0, 5, 5]}), 400, "unknown region"),
    (lambda c, i: c.save_boxes("../x", {"right lung": [0, 0, 5, 5]}), 400, "invalid image id"),
])
def test_errors_carry_the_servers_message(client, image, call, status, text):
    with pytest.raises(ClientError) as e:
        call(client, image)
    assert e.value.status == status and text in e.value.detail


def test_an_unreachable_server_is_a_clear_error():
    from live_server import _free_port

    with pytest.raises(ClientError, match="cannot reach the server"):
        AnatomyVLMClient(f"http://127.0.0.1:{_free_port()}", timeout=5).info()
    with pytest.raises(ClientError, match="must start with http"):
        AnatomyVLMClient("127.0.0.1:8000")


# ---- the module's widget file and view helpers (no Slicer needed) ---------------------------------------
MODULE = REPO / "slicer_module" / "AnatomyVLM"


def test_every_widget_the_module_uses_is_in_the_ui_file():
    import re
    import xml.etree.ElementTree as ET

    tree = ET.parse(MODULE / "Resources" / "UI" / "AnatomyVLM.ui")
    names = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "AnatomyVLM.py").read_text()))
    assert used and used <= set(names), sorted(used - set(names))
    assert names["regionsTable"] == "QTableWidget" and names["trainProgress"] == "QProgressBar"


def test_view_helpers_from_real_answers(client, image):
    from AnatomyVLMLib import grounding_emphasis, image_finding_rows, input_check_text, region_rows, training_progress

    det = client.detect(image).json
    assert (input_check_text(det) == "") == (det["input_check"]["level"] == "in range")
    warn = input_check_text({"input_check": {"level": "outside the training range", "ratio": 2.15, "message": "check",
                                             "notes": ["DICOM ViewPosition is LL: the model knows frontal views"]}})
    assert warn == ("Outside the training range (2.1x the threshold): check; "
                    "DICOM ViewPosition is LL: the model knows frontal views")
    assert input_check_text({"input_check": {"level": "in range", "notes": []}}) == input_check_text({}) == ""
    f = client.findings(image, top_k=2)
    rows = region_rows(det, f)
    assert [r[0] for r in rows] == list(REGION_NAMES) and all(r[2].count(",") == 1 for r in rows)
    img = image_finding_rows(f)
    assert len(img) == 7 and [float(r[1]) for r in img] == sorted((float(r[1]) for r in img), reverse=True)
    g = grounding_emphasis(client.ground(image, "Enlarged cardiac silhouette.").json)
    assert len(g) == 3 and max(g.values()) == 1.0 and all(0 < v <= 1 for v in g.values())
    assert training_progress({}) == (0, "No training yet.")
    assert training_progress({"stage": "training", "version": "v0003"}) == (30, "training v0003")
    assert training_progress({"stage": "done", "version": "v0003", "promoted": False, "reason": "x"})[1] == \
        "v0003 kept back (x)"
