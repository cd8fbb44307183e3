"""REST tests of the real MONAI Label app (no mocks).

Two ways in, as DESIGN section 3 asks:
    * in-process: MONAI Label's own FastAPI app (``monailabel.app:app``) through FastAPI's
      ``TestClient``, configured the way MONAI Label's tests do it (``tests/unit/endpoints/context.py``:
      set ``monailabel.config.settings.MONAI_LABEL_APP_DIR`` / ``MONAI_LABEL_STUDIES`` /
      ``MONAI_LABEL_APP_CONF`` before the first request; ``app_instance()`` builds the app from them);
    * a real ``monailabel start_server`` subprocess on a free loopback port, as ``scripts/serve.sh``
      runs it. It is started first and boots while the in-process tests run.

Each way works on its own copy of the demo studies folder (the datastore writes its index there).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import launch_server

from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES, label_map

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "anatomy_vlm"
TASKS = {"anatomy_detection": "detection", "anatomy_segmentation": "segmentation"}
LANGUAGE_TASKS = {"region_findings": "classification", "text_grounding": "segmentation"}
SHIPPED = APP_DIR / "model" / "anatomy_vlm.pt"
UNLABELLED_ID = "real_rg1_uncr"  # the real CR the demo builder copies in, without labels


def _copy_studies(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def live_server(demo_studies, tmp_path_factory):
    """A real server on a copy of the app (no checkpoint) and a copy of the studies."""
    base = tmp_path_factory.mktemp("live")
    server = launch_server(APP_DIR, _copy_studies(demo_studies.studies, base / "studies"), base)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app_env(request, demo_studies, tmp_path_factory):
    """Settings for the in-process app."""
    # If the real-server test is selected, start its server now: it boots (about 10-15 s of
    # imports) while the in-process tests run.
    if any("live_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("live_server")
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    base = tmp_path_factory.mktemp("inproc")
    studies = _copy_studies(demo_studies.studies, base / "studies")
    checkpoint = base / "no-such-dir" / "anatomy_vlm.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "MONAI_LABEL_APP_DIR", str(APP_DIR))
        mp.setattr(settings, "MONAI_LABEL_STUDIES", str(studies))
        mp.setattr(settings, "MONAI_LABEL_APP_CONF",
                   {"checkpoint": str(checkpoint), "embedding_cache": str(base / "embeddings"),
                    "replay_demo": str(demo_studies.root)})
        mp.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
        mp.setattr(settings, "MONAI_LABEL_SESSION_PATH", str(base / "sessions"))
        yield {"studies": studies, "checkpoint": checkpoint, "base": base}
        clear_cache()


@pytest.fixture(scope="module")
def client(app_env):
    from fastapi.testclient import TestClient
    from monailabel.app import app

    with TestClient(app) as c:  # the context runs the app's lifespan, as the server does
        yield c


# ---- in-process ---------------------------------------------------------------------------------
def test_info_lists_app_29_labels_and_both_tasks(client, app_env):
    r = client.get("/info/")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["name"] == "Anatomy-VLM Label"
    assert info["labels"] == list(REGION_NAMES) and len(info["labels"]) == NUM_REGIONS == 29
    assert set(TASKS) | set(LANGUAGE_TASKS) == set(info["models"])
    for name, kind in (TASKS | LANGUAGE_TASKS).items():
        model = info["models"][name]
        assert model["type"] == kind
        assert model["dimension"] == 2
        assert model["labels"] == label_map()
        assert model["checkpoint"] == {"path": str(app_env["checkpoint"]), "exists": False}
    assert set(info["strategies"]) == {"random", "first", "region_uncertainty"}
    assert set(info["trainers"]) == {"anatomy_finetune"}
    assert info["trainers"]["anatomy_finetune"]["config"]["tolerance"] == 0.02
    assert len(info["label_colors"]) == 29 and info["registry_version"]


def test_datastore_lists_dcm_and_png_studies_with_labels(client, demo_studies):
    objects = client.get("/datastore/", params={"output": "all"}).json()["objects"]
    dcm = [i for i in demo_studies.ids(".dcm") if i != UNLABELLED_ID]
    png = demo_studies.ids(".png")
    assert dcm and png, "the demo studies need at least one .dcm and one .png image"
    assert UNLABELLED_ID in demo_studies.ids(".dcm")
    for ids, ext in ((dcm, ".dcm"), (png, ".png")):
        for image_id in ids:
            obj = objects[image_id]
            assert obj["image"]["ext"] == ext
            assert obj["labels"]["final"]["ext"] == ".nii.gz"
            assert obj["labels"]["boxes"]["ext"] == ".boxes.json"
    # Exactly the images: not the datastore's own index, not label files.
    assert set(objects) == set(dcm) | set(png) | {UNLABELLED_ID}
    assert objects[UNLABELLED_ID]["labels"] == {}
    stats = client.get("/datastore/").json()
    assert stats["total"] == len(objects) and stats["completed"] == len(objects) - 1


@pytest.mark.parametrize("task", sorted(TASKS))
def test_infer_without_checkpoint_is_a_clear_json_error(client, app_env, demo_studies, task):
    image_id = demo_studies.ids(".dcm")[0]
    r = client.post(f"/infer/{task}", params={"image": image_id})
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert detail.startswith("no checkpoint yet: ")
    assert "`anatomy-vlm train`" in detail and f"put a checkpoint at {app_env['checkpoint']}" in detail


def test_active_learning_offers_the_unlabelled_image(client):
    r = client.post("/activelearning/first")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == UNLABELLED_ID
    assert client.post("/activelearning/random").json()["id"] == UNLABELLED_ID


def test_unusable_checkpoint_says_so(app_env, demo_studies, tmp_path):
    """A file at the checkpoint path that is no checkpoint gives a clear 503, never a made-up result."""
    from monailabel.interfaces.utils.app import app_instance

    checkpoint = tmp_path / "anatomy_vlm.pt"
    checkpoint.write_bytes(b"not a model")
    app = app_instance(str(APP_DIR), str(_copy_studies(demo_studies.studies, tmp_path / "studies")),
                       {"checkpoint": str(checkpoint), "embedding_cache": "none"})
    with pytest.raises(Exception) as excinfo:
        app.infer({"model": "anatomy_segmentation", "image": demo_studies.ids(".png")[0]})
    assert getattr(excinfo.value, "status_code", None) == 503
    assert str(checkpoint) in str(excinfo.value) and "cannot be used" in str(excinfo.value)
    assert app.info()["models"]["anatomy_segmentation"]["checkpoint"]["exists"] is True


# ---- with a (tiny, random) checkpoint -------------------------------------------------------------------
TINY = {"decoder": {"num_layers": 1, "d_model": 64, "dim_feedforward": 128, "num_heads": 4, "embed_dim": 64}}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from anatomy_vlm.checkpoint import save_checkpoint
    from anatomy_vlm.model import build_model

    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(path, build_model(TINY), {"data": "none (random decoder, REST contract tests)"})
    return path


@pytest.fixture
def with_checkpoint(app_env, tiny_file):
    """The tiny checkpoint at the in-process app's checkpoint path for one test (the tasks look it up per
    call); removed afterwards so the no-checkpoint tests keep their 503."""
    dst = app_env["checkpoint"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tiny_file, dst)
    yield dst
    dst.unlink()


def test_region_uncertainty_strategy_scores_the_unlabelled_images(client, with_checkpoint):
    r = client.post("/activelearning/region_uncertainty")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == UNLABELLED_ID and "region_uncertainty" in body["strategy"]  # MONAI Label: offers per strategy
    assert body["score"] >= 0 and body["scored"] == 1 and body["model_version"].startswith("ckpt-")
    assert client.post("/activelearning/random").json()["id"] == UNLABELLED_ID  # the stock one stays


def test_region_uncertainty_without_a_checkpoint_falls_back_and_says_so(client):
    body = client.post("/activelearning/region_uncertainty").json()
    assert body["id"] == UNLABELLED_ID and "no checkpoint" in body["fallback"]


def test_active_learning_pick_is_encoded_in_the_background(client, app_env, with_checkpoint, demo_studies):
    """After /activelearning hands out an image, its embedding (and the next unlabelled ones') is
    computed in the background, so the annotator's first infer call finds it cached."""
    from anatomy_vlm.cache import file_digest
    from lib.infers.anatomy_infer import SharedPredictor

    r = client.post("/activelearning/first")
    assert r.status_code == 200, r.text
    path = r.json()["path"]
    predictor = SharedPredictor.for_checkpoint(str(app_env["checkpoint"]), str(app_env["base"] / "embeddings")).get()
    assert predictor is not None
    assert predictor.join_prefetch(timeout=300), "background encoding did not finish"
    assert predictor.cache.get(file_digest(path)) is not None
    r = client.post("/infer/anatomy_detection", params={"image": r.json()["id"]})
    assert r.status_code == 200, r.text


def test_a_saved_correction_queues_the_next_rounds_images_for_encoding(client, app_env, with_checkpoint,
                                                                         demo_studies, monkeypatch):
    """The first saved label queues the demo images the next fine-tuning round reads (replay sample, the
    gate's val images) and the corrected image for background encoding, so the first round finds them
    cached; later saves queue only their own image."""
    from monailabel.interfaces.utils.app import app_instance

    from anatomy_vlm.cache import file_digest
    from anatomy_vlm.finetune import round_images
    from lib.infers.anatomy_infer import SharedPredictor

    wanted = {str(p) for p in round_images(demo_studies.root)}
    assert wanted
    app_instance()._warmed.clear()  # as on a fresh server
    predictor = SharedPredictor.for_checkpoint(str(app_env["checkpoint"]), str(app_env["base"] / "embeddings")).get()
    queued: list = []
    real = predictor.prefetch

    def recording(paths):
        paths = [str(p) for p in paths]
        queued.append(paths)
        return real(paths)

    monkeypatch.setattr(predictor, "prefetch", recording)
    images = demo_studies.ids(".dcm")[:2]
    for image in images:
        prev = json.loads((app_env["studies"] / "labels" / "boxes" / f"{image}.boxes.json").read_text())
        body = {"regions": [r for r in prev["regions"] if r["name"] == "right lung"]}
        r = client.put("/datastore/label", params={"image": image},
                       files={"label": ("c.json", json.dumps(body).encode())}, data={"params": json.dumps({"user": "a"})})
        assert r.status_code == 200, r.text
    paths = [str(app_env["studies"] / f"{i}.dcm") for i in images]
    deadline = time.monotonic() + 120  # queued from a background thread after each save's response
    while len(queued) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # the demo images are queued once, with whichever save came first; each save queues its own image
    short, long_ = sorted(queued, key=len)
    assert len(short) == 1 and short[0] in paths and set(long_) == wanted | ({*paths} - {short[0]})
    assert predictor.join_prefetch(timeout=600), "background encoding did not finish"
    for path in [*wanted, *paths]:
        assert predictor.cache.get(file_digest(path)) is not None, path


def _multipart(r):
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {}
    for part in MultipartDecoder(r.content, r.headers["content-type"]).parts:
        disp = part.headers[b"Content-Disposition"].decode()
        parts["params" if 'name="params"' in disp else "file"] = (disp, part.content)
    return parts


def test_detection_returns_boxes_and_a_slicer_roi_file(client, with_checkpoint, demo_studies):
    image_id = demo_studies.ids(".png")[0]
    r = client.post("/infer/anatomy_detection", params={"image": image_id})
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    result = json.loads(parts["params"][1])
    assert len(result["regions"]) == len(result["boxes"]) == len(result["scores"]) == NUM_REGIONS
    assert result["labels"] == list(REGION_NAMES) and result["label_ids"] == list(range(1, 30))
    h, w = result["image_shape"]
    for x0, y0, x1, y1 in result["boxes"]:
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    assert len(result["box"]) == NUM_REGIONS and all(len(b) == 6 for b in result["box"])  # MONAI form
    check = result["input_check"]  # the tiny checkpoint has no familiarity reference, and says so
    assert check["level"] == "unknown" and "fit-familiarity" in check["message"] and check["notes"] == []
    disp, body = parts["file"]
    assert '.json"' in disp  # the stock panel loads a *.json result with slicer.util.loadMarkups
    markups = json.loads(body)["markups"]
    assert len(markups) == NUM_REGIONS and {m["type"] for m in markups} == {"ROI"}
    assert [m["controlPoints"][0]["label"] for m in markups] == list(REGION_NAMES)
    assert markups[0]["coordinateSystem"] == "LPS" and markups[0]["center"] == result["box"][0][:3]


def test_segmentation_returns_a_seg_nrrd_with_all_regions_and_subsets(client, with_checkpoint, demo_studies,
                                                                       tmp_path):
    import nrrd

    image_id = demo_studies.ids(".png")[0]
    r = client.post("/infer/anatomy_segmentation", params={"image": image_id, "output": "image"})
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].rstrip('"').endswith(".seg.nrrd")
    (tmp_path / "all.seg.nrrd").write_bytes(r.content)
    data, hdr = nrrd.read(str(tmp_path / "all.seg.nrrd"), index_order="F")
    names = [hdr[f"Segment{k}_Name"] for k in range(NUM_REGIONS)]
    assert names == list(REGION_NAMES) and f"Segment{NUM_REGIONS}_Name" not in hdr
    from anatomy_vlm.io import read_image

    h, w = read_image(demo_studies.studies / f"{image_id}.png").pixels.shape
    assert data.shape[1:] == (w, h, 1)  # (layers, x = column, y = row, 1), as Slicer lays out the image

    r = client.post("/infer/anatomy_segmentation", params={"image": image_id, "output": "json"},
                    data={"params": json.dumps({"regions": "left lung, right lung"})})
    assert r.status_code == 200, r.text
    assert [s["name"] for s in r.json()["segments"]] == ["left lung", "right lung"]
    assert r.json()["label_names"] == {"left lung": label_map()["left lung"], "right lung": 1}

    r = client.post("/infer/anatomy_segmentation", params={"image": image_id, "output": "image"},
                    data={"params": json.dumps({"regions": ["trachea"], "label_format": "nii.gz"})})
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].rstrip('"').endswith(".nii.gz")


@pytest.mark.parametrize("params,status,text", [
    ({"image": "no_such_image"}, 404, "unknown image"),
    ({"image": None, "regions": "right lung,left kidney"}, 400, "unknown region 'left kidney'; valid names"),
])
def test_bad_requests_get_4xx_with_a_message(client, with_checkpoint, demo_studies, params, status, text):
    image = params.pop("image") or demo_studies.ids(".png")[0]
    for task in TASKS:
        r = client.post(f"/infer/{task}", params={"image": image}, data={"params": json.dumps(params)})
        assert r.status_code == status, r.text
        assert text in r.json()["detail"]


# ---- language tasks ------------------------------------------------------------------------------------
def test_a_mask_correction_confirms_boxes_in_the_served_box_convention(client, app_env, tiny_file, demo_studies,
                                                                       tmp_path):
    """With a calibrated checkpoint served, PUT of a corrected mask confirms each region's box as the model
    serves boxes: the mask's bounding box shifted by the checkpoint's per-region offsets."""
    from anatomy_vlm.checkpoint import read_checkpoint, update_checkpoint_meta
    from anatomy_vlm.io import read_image, write_region_masks

    off = np.zeros((NUM_REGIONS, 4))
    off[0] = [0.0, 0.1, 0.0, -0.05]  # right lung: top edge 10 % of the height down, bottom 5 % up
    dst = app_env["checkpoint"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tiny_file, dst)
    update_checkpoint_meta(dst, {"box_calibration": {"offsets": off.tolist(), "split": "test (hand-set)"}})
    assert read_checkpoint(dst)["meta"]["box_calibration"]["offsets"][0] == [0.0, 0.1, 0.0, -0.05]
    try:
        image = demo_studies.ids(".png")[-1]
        H, W = read_image(next(app_env["studies"].glob(f"{image}.png"))).pixels.shape
        masks = np.zeros((NUM_REGIONS, H, W), bool)
        masks[0, 10:50, 5:30] = True  # right lung (region 0): bounding box [5, 10, 30, 50], 40 high
        masks[REGION_NAMES.index("left lung"), 60:70, 40:60] = True  # left lung: no offsets, its plain bounding box
        write_region_masks(masks, tmp_path / "m.nii.gz")
        r = client.put("/datastore/label", params={"image": image},
                       files={"label": ("m.nii.gz", (tmp_path / "m.nii.gz").read_bytes())},
                       data={"params": json.dumps({"user": "ann3", "regions": ["right lung", "left lung"]})})
        assert r.status_code == 200, r.text
        doc = json.loads((app_env["studies"] / "labels" / "boxes" / f"{image}.boxes.json").read_text())
        boxes = {x["name"]: x["box"] for x in doc["regions"]}
        assert boxes["right lung"] == pytest.approx([5.0, 14.0, 30.0, 48.0])
        assert boxes["left lung"] == pytest.approx([40.0, 60.0, 60.0, 70.0])
        assert doc["confirmed_masks"] == ["right lung", "left lung"]
    finally:
        dst.unlink()


@pytest.fixture
def with_shipped(app_env):
    """The shipped (aligned) demo checkpoint at the in-process app's checkpoint path for one test."""
    dst = app_env["checkpoint"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(SHIPPED, dst)
    yield dst
    dst.unlink()


def test_language_tasks_need_a_language_stage(client, with_checkpoint, demo_studies):
    image = demo_studies.ids(".png")[0]
    for task, params in (("region_findings", {}), ("text_grounding", {"sentence": "right lung"})):
        r = client.post(f"/infer/{task}", params={"image": image}, data={"params": json.dumps(params)})
        assert r.status_code == 501, r.text
        assert "has no language stage" in r.json()["detail"]


def test_region_findings_json_with_default_and_own_prompts(client, with_shipped, demo_studies):
    image = demo_studies.ids(".png")[0]
    r = client.post("/infer/region_findings", params={"image": image})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")  # no label file: JSON only
    body = r.json()
    assert len(body["regions"]) == NUM_REGIONS and all(len(x["findings"]) == 3 for x in body["regions"])
    assert body["prompts"] and {f["finding"] for f in body["findings"]} == set(body["prompts"])
    check = body["input_check"]  # graded against the shipped checkpoint's training images
    assert check["level"] in ("in range", "outside the training range", "far outside the training range")
    assert check["ratio"] == pytest.approx(check["distance"] / check["threshold"], abs=0.01)
    own = ["veil-like haze over the left base", "widened mediastinum"]
    r = client.post("/infer/region_findings", params={"image": image},
                    data={"params": json.dumps({"prompts": own, "top_k": 0, "regions": "left lung,trachea"})})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompts"] == own and [x["name"] for x in body["regions"]] == ["left lung", "trachea"]
    assert all({f["finding"] for f in x["findings"]} == set(own) for x in body["regions"])


def test_text_grounding_heatmap_and_segments(client, with_shipped, demo_studies, tmp_path):
    import nrrd

    from anatomy_vlm.io import read_image

    image = demo_studies.ids(".png")[0]
    h, w = read_image(demo_studies.studies / f"{image}.png").pixels.shape
    r = client.post("/infer/text_grounding", params={"image": image},
                    data={"params": json.dumps({"sentence": "There is an opacity in the right lower lung zone."})})
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    result = json.loads(parts["params"][1])
    assert len(result["regions"]) == 3 and result["format"] == "heatmap.nii.gz"
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    disp, body = parts["file"]
    assert '.nii.gz"' in disp
    (tmp_path / "heat.nii.gz").write_bytes(body)
    heat = read_image(tmp_path / "heat.nii.gz").pixels
    assert heat.shape == (h, w) and heat.max() == 255

    r = client.post("/infer/text_grounding", params={"image": image, "output": "image"},
                    data={"params": json.dumps({"sentence": "Enlarged cardiac silhouette.", "top_k": 2,
                                                "label_format": "seg.nrrd"})})
    assert r.status_code == 200, r.text
    (tmp_path / "top.seg.nrrd").write_bytes(r.content)
    _, header = nrrd.read(str(tmp_path / "top.seg.nrrd"))
    names = [header[f"Segment{k}_Name"] for k in range(2)]
    assert "Segment2_Name" not in header and set(names) <= set(REGION_NAMES) and len(set(names)) == 2


@pytest.mark.parametrize("task,params,text", [
    ("text_grounding", {}, "needs a sentence"),
    ("text_grounding", {"sentence": "   "}, "needs a sentence"),
    ("text_grounding", {"sentence": "x" * 1001}, "at most 1000 characters"),
    ("text_grounding", {"sentence": 17}, "must be text"),
    ("text_grounding", {"sentence": "lung", "label_format": "png"}, "unknown label_format"),
    ("text_grounding", {"sentence": "lung", "top_k": 0}, "top_k must be an integer from 1 to 29"),
    ("region_findings", {"prompts": ["effusion", ""]}, "must not be empty"),
    ("region_findings", {"prompts": ["y" * 1001]}, "at most 1000 characters"),
    ("region_findings", {"prompts": [3.5]}, "must be text"),
    ("region_findings", {"prompts": ["effusion"], "top_k": "many"}, "top_k must be an integer"),
])
def test_bad_language_requests_get_400_with_a_message(client, with_shipped, demo_studies, task, params, text):
    r = client.post(f"/infer/{task}", params={"image": demo_studies.ids(".png")[0]},
                    data={"params": json.dumps(params)})
    assert r.status_code == 400, r.text
    assert text in r.json()["detail"]


def test_unknown_model_in_conf_raises_with_the_choices(app_env, tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    with pytest.raises(ValueError, match="available: all, anatomy_detection, anatomy_segmentation"):
        app_instance(str(APP_DIR), str(tmp_path / "studies"), {"models": "anatomy_detection,nope"})


# ---- real server ------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_server_info_datastore_and_infer(live_server, demo_studies):
    info = httpx.get(live_server.url("/info/"), timeout=30).json()
    assert info["labels"] == list(REGION_NAMES)
    assert set(TASKS) <= set(info["models"])

    objects = httpx.get(live_server.url("/datastore/"), params={"output": "all"}, timeout=30).json()["objects"]
    dcm, png = demo_studies.ids(".dcm")[0], demo_studies.ids(".png")[0]
    assert objects[dcm]["image"]["ext"] == ".dcm" and objects[png]["image"]["ext"] == ".png"
    for image_id in (dcm, png):
        assert {"final", "boxes"} <= set(objects[image_id]["labels"])

    r = httpx.post(live_server.url("/infer/anatomy_detection"), params={"image": png}, timeout=60)
    assert r.status_code == 503, r.text
    default_checkpoint = os.path.realpath(live_server.app_dir / "model" / "anatomy_vlm.pt")
    assert r.json()["detail"] == (
        "no checkpoint yet: anatomy_detection has no trained model to run "
        f"(train one with `anatomy-vlm train` or put a checkpoint at {default_checkpoint})"
    )


# ---- corrected labels over REST (real server) ------------------------------------------------------------
def _labelled(demo_studies) -> list[str]:
    return sorted(i for i in demo_studies.ids(".png") + demo_studies.ids(".dcm")
                  if (demo_studies.studies / "labels" / "boxes" / f"{i}.boxes.json").is_file())


def _put_label(live_server, image, body: bytes, filename: str, tag: str | None = None, params: dict | None = None):
    query = {"image": image} | ({"tag": tag} if tag else {})
    return httpx.put(live_server.url("/datastore/label"), params=query,
                     files={"label": (filename, body)}, data={"params": json.dumps(params or {})}, timeout=60)


def test_box_corrections_are_validated_merged_and_stored(live_server, demo_studies):
    image = _labelled(demo_studies)[1]
    stored = live_server.studies / "labels" / "boxes" / f"{image}.boxes.json"
    before = json.loads(stored.read_text())
    w, h = before["width"], before["height"]
    body = json.dumps({"regions": [{"name": "right lung", "box": [2, 3, w // 2, h - 4]},
                                   {"name": "carina", "box": None}]}).encode()
    r = _put_label(live_server, image, body, "correction.json", params={"user": "ann1"})
    assert r.status_code == 200, r.text
    after = json.loads(stored.read_text())
    assert after["regions"][0]["box"] == [2, 3, w // 2, h - 4]
    assert next(x for x in after["regions"] if x["name"] == "carina")["box"] is None
    assert after["regions"][1] == before["regions"][1]  # untouched region kept
    assert set(after["confirmed"]) == {"right lung", "carina"} and after["confirmed"]["carina"]["user"] == "ann1"
    info = httpx.get(live_server.url("/datastore/"), params={"output": "all"}, timeout=30).json()["objects"][image]
    assert info["labels"]["boxes"]["info"]["confirmed_regions"] == ["right lung", "carina"]


@pytest.mark.parametrize("image, body, filename, status, text", [
    ("../x", b'{"regions": []}', "c.json", 400, "invalid image id"),
    ("no_such_image", b'{"regions": [{"id": 1, "box": [0, 0, 5, 5]}]}', "c.json", 404, "not in the datastore"),
    (None, b"{broken", "c.json", 400, "malformed JSON"),
    (None, b'{"regions": [{"name": "spleen", "box": [0, 0, 5, 5]}]}', "c.json", 400, "unknown region"),
    (None, b'{"regions": [{"id": 1, "box": [0, 0, 99999, 5]}]}', "c.json", 400, "outside the image"),
    (None, b"not a nifti", "m.nii.gz", 400, "not a readable NIfTI"),
])
def test_bad_corrections_get_4xx_and_change_nothing(live_server, demo_studies, image, body, filename, status, text):
    image = image or _labelled(demo_studies)[2]
    labels = live_server.studies / "labels"
    snapshot = {p: p.read_bytes() for p in labels.rglob("*") if p.is_file()}
    r = _put_label(live_server, image, body, filename)
    assert r.status_code == status, r.text
    assert text in r.json()["detail"]
    assert {p: p.read_bytes() for p in labels.rglob("*") if p.is_file()} == snapshot
    assert not list(labels.rglob(".saving-*"))


def test_wrong_mask_size_is_refused(live_server, demo_studies, tmp_path):
    import nibabel as nib
    import numpy as np

    image = _labelled(demo_studies)[2]
    nib.save(nib.Nifti1Image(np.zeros((7, 9, NUM_REGIONS), np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    r = _put_label(live_server, image, (tmp_path / "m.nii.gz").read_bytes(), "m.nii.gz")
    assert r.status_code == 400 and "expected" in r.json()["detail"], r.text


def test_concurrent_corrections_from_separate_clients_are_all_stored_whole(live_server, demo_studies):
    from concurrent.futures import ThreadPoolExecutor

    images = _labelled(demo_studies)
    stored = {i: json.loads((live_server.studies / "labels" / "boxes" / f"{i}.boxes.json").read_text())
              for i in images}

    def put(k):
        image = images[k % len(images)]
        w, h = stored[image]["width"], stored[image]["height"]
        body = json.dumps({"regions": [{"id": 1 + k % NUM_REGIONS, "box": [1, 1, w - 1 - k % 5, h - 1]}]}).encode()
        with httpx.Client() as c:  # a client (connection) of its own
            return c.put(live_server.url("/datastore/label"), params={"image": image},
                         files={"label": ("c.json", body)}, data={"params": json.dumps({"user": f"u{k}"})},
                         timeout=120).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(put, range(50)))
    assert codes == [200] * 50
    confirmed = 0
    for i in images:
        doc = json.loads((live_server.studies / "labels" / "boxes" / f"{i}.boxes.json").read_text())  # whole JSON
        confirmed += len(doc["confirmed"])
    # every save landed: each (image, region) pair touched is confirmed (no lost update)
    expected = {(images[k % len(images)], 1 + k % NUM_REGIONS) for k in range(50)}
    assert confirmed >= len(expected)


def test_dicom_seg_and_sr_outputs(client, with_shipped, demo_studies, tmp_path):
    import pydicom

    dcm = demo_studies.ids(".dcm")[0]
    r = client.post("/infer/anatomy_segmentation", params={"image": dcm, "output": "image"},
                    data={"params": json.dumps({"label_format": "dcm", "regions": "right lung,left lung"})})
    assert r.status_code == 200, r.text
    (tmp_path / "seg.dcm").write_bytes(r.content)
    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["right lung", "left lung"]
    r = client.post("/infer/anatomy_detection", params={"image": dcm},
                    data={"params": json.dumps({"label_format": "dcm"})})
    assert r.status_code == 200, r.text
    parts = _multipart(r)
    assert json.loads(parts["params"][1])["format"] == "dicom-sr" and json.loads(parts["params"][1])["findings"]
    (tmp_path / "sr.dcm").write_bytes(parts["file"][1])
    assert pydicom.dcmread(str(tmp_path / "sr.dcm")).Modality == "SR"
    r = client.post("/infer/anatomy_segmentation", params={"image": demo_studies.ids(".png")[0]},
                    data={"params": json.dumps({"label_format": "dcm"})})
    assert r.status_code == 400 and "needs a DICOM image" in r.json()["detail"]
