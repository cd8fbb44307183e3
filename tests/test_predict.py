"""Prediction API contract tests on a tiny checkpoint (random decoder weights, the real LiteMedSAM encoder).

The encoder costs 1.6-4 s per image here, so the module encodes three small images in all and checks the
cache by counting encoder calls. Viewer exports (Slicer markups, .seg.nrrd, flat label map) are checked
against hand-made asymmetric predictions, so orientation errors cannot hide behind symmetric data.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES, REGIONS
from anatomy_vlm.io import Radiograph, read_image, write_png

TINY = {"decoder": {"num_layers": 1, "d_model": 64, "dim_feedforward": 128, "num_heads": 4, "embed_dim": 64}}


def _radiograph(h: int, w: int, seed: int) -> np.ndarray:
    """An asymmetric grey image: a bright block top-left, a gradient, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 40 + 80 * (x / w) + 20 * rng.random((h, w))
    img[h // 8: h // 2, w // 10: w // 3] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from anatomy_vlm.checkpoint import save_checkpoint
    from anatomy_vlm.model import build_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, build_model(TINY), {"data": "none (random decoder, contract tests)"})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    return {"a": write_png(_radiograph(96, 128, 0), d / "a.png"),  # landscape: W > H
            "b": write_png(_radiograph(120, 80, 1), d / "b.png")}  # portrait


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("emb")


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint, cache_dir):
    from anatomy_vlm.predict import Predictor

    return Predictor.from_checkpoint(tiny_checkpoint, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def full(predictor, images):
    """All 29 regions with masks for image a (the one encoder run most tests share)."""
    return predictor.predict(images["a"], with_masks=True)


def test_prediction_shapes_and_original_pixel_frame(full, images):
    H, W = 96, 128
    assert full.image_shape == (H, W) and full.image == str(images["a"])
    assert full.boxes.shape == full.decoder_boxes.shape == (NUM_REGIONS, 4) and full.boxes.dtype == np.float32
    assert full.scores.shape == (NUM_REGIONS,) and np.all((full.scores > 0) & (full.scores < 1))
    assert full.masks.shape == (NUM_REGIONS, H, W) and full.masks.dtype == bool
    assert full.names == REGION_NAMES and full.ids == tuple(range(1, 30))
    for boxes in (full.boxes, full.decoder_boxes):
        assert np.all(boxes[:, [0, 2]] >= 0) and np.all(boxes[:, [0, 2]] <= W)
        assert np.all(boxes[:, [1, 3]] >= 0) and np.all(boxes[:, [1, 3]] <= H)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
    doc = full.to_json()
    assert doc["image"] == str(images["a"]) and doc["image_shape"] == [H, W]
    assert [r["name"] for r in doc["regions"]] == list(REGION_NAMES)
    r0 = doc["regions"][0]
    assert set(r0) >= {"name", "id", "box", "score"} and len(r0["box"]) == 4 and r0["id"] == 1
    json.dumps(doc)  # plain JSON types


def test_mask_refined_boxes_are_the_mask_bounding_boxes(full):
    assert any(s == "mask" for s in full.box_source)
    for k in range(NUM_REGIONS):
        m = full.masks[k]
        if not m.any():
            assert full.box_source[k] == "decoder"
            np.testing.assert_array_equal(full.boxes[k], full.decoder_boxes[k])
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert full.box_source[k] == "mask"
        np.testing.assert_array_equal(full.boxes[k], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])


def test_detection_without_masks_uses_decoder_boxes_and_hits_the_cache(predictor, full, images, tiny_checkpoint,
                                                                        cache_dir):
    from anatomy_vlm.predict import Predictor

    calls = predictor.encoder_calls
    det = predictor.predict(images["a"])
    assert predictor.encoder_calls == calls, "a seen image must not re-run the encoder"
    assert det.timing["cached"] is True and det.masks is None
    assert set(det.box_source) == {"decoder"}
    np.testing.assert_allclose(det.boxes, full.decoder_boxes, atol=1e-4)
    # The disk cache serves a fresh predictor (e.g. after a server restart) too.
    other = Predictor.from_checkpoint(tiny_checkpoint, cache_dir=cache_dir)
    again = other.predict(images["a"])
    assert other.encoder_calls == 0 and again.timing["cached"] is True
    np.testing.assert_allclose(again.boxes, det.boxes, atol=1e-3)


def test_regions_subset_and_unknown_region(predictor, full, images):
    sub = predictor.predict(images["a"], with_masks=True, regions="right lung, heart")
    assert sub.names == ("right lung", "cardiac silhouette") and sub.ids == (1, 25)
    assert sub.masks.shape == (2, 96, 128)
    np.testing.assert_allclose(sub.decoder_boxes, full.decoder_boxes[[0, 24]], atol=1e-4)
    np.testing.assert_array_equal(sub.masks, full.masks[[0, 24]])
    assert [r["name"] for r in full.to_json(regions=["cardiac silhouette"])["regions"]] == ["cardiac silhouette"]
    with pytest.raises(ValueError, match="unknown region 'left kidney'; valid names: right lung"):
        predictor.predict(images["a"], regions=["right lung", "left kidney"])


def test_two_concurrent_predicts_encode_once(tiny_checkpoint, images):
    """Fresh predictor, in-memory radiograph, two threads at once: one encoder run, equal answers."""
    from anatomy_vlm.predict import Predictor

    p = Predictor.from_checkpoint(tiny_checkpoint)
    rg = Radiograph(read_image(images["b"]).pixels)
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = p.predict(rg, with_masks=(i == 1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert p.encoder_calls == 1
    np.testing.assert_allclose(results[0].boxes, results[1].decoder_boxes, atol=1e-4)
    assert results[0].image_shape == (120, 80)


def test_prefetch_computes_embeddings_in_the_background(tiny_checkpoint, images, tmp_path):
    from anatomy_vlm.predict import Predictor

    p = Predictor.from_checkpoint(tiny_checkpoint)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert p.prefetch([images["a"], bad]) == 2
    assert p.join_prefetch(timeout=120)
    assert p.encoder_calls == 1  # the broken file was logged and skipped
    p.predict(images["a"])
    assert p.encoder_calls == 1


# ---- viewer exports: synthetic predictions, asymmetric on purpose ---------------------------------------
def _synthetic(h=30, w=50):
    from anatomy_vlm.predict import Prediction

    masks = np.zeros((3, h, w), bool)
    masks[0, 2:20, 3:30] = True    # big, top-left
    masks[1, 5:10, 4:12] = True    # nested inside 0 (overlap)
    masks[2, 22:28, 35:48] = True  # bottom-right, disjoint
    boxes = np.array([[3, 2, 30, 20], [4, 5, 12, 10], [35, 22, 48, 28]], np.float32)
    return Prediction("x.png", (h, w), (0, 1, 28), boxes, np.array([0.9, 0.8, 0.7], np.float32), boxes.copy(),
                      masks, ("mask",) * 3, {})


def test_seg_nrrd_layers_names_and_orientation(tmp_path):
    import nrrd

    from anatomy_vlm.predict import ImageGeometry, write_seg_nrrd

    pred = _synthetic()
    geo = ImageGeometry((50, 30), origin=(5.0, 7.0, 0.0), spacing=(0.5, 0.25, 1.0))
    path, segments = write_seg_nrrd(pred, geo, tmp_path / "x.seg.nrrd")
    data, hdr = nrrd.read(str(path), index_order="F")
    assert data.shape == (2, 50, 30, 1)  # 2 layers: region 1 overlaps region 0, region 28 shares layer 0
    assert hdr["kinds"] == ["list", "domain", "domain", "domain"] and hdr["space"] == "left-posterior-superior"
    np.testing.assert_allclose(hdr["space directions"][1:], np.diag([0.5, 0.25, 1.0]))
    np.testing.assert_allclose(hdr["space origin"], [5.0, 7.0, 0.0])
    assert [s["layer"] for s in segments] == [0, 1, 0]
    for k, s in enumerate(segments):
        assert hdr[f"Segment{k}_Name"] == REGIONS[pred.indices[k]].name == s["name"]
        assert hdr[f"Segment{k}_Layer"] == str(s["layer"]) and hdr[f"Segment{k}_LabelValue"] == str(s["label_value"])
        colour = [float(c) for c in hdr[f"Segment{k}_Color"].split()]
        np.testing.assert_allclose(colour, np.array(REGIONS[pred.indices[k]].colour) / 255, atol=1e-5)
        # axis 1 = column (x), axis 2 = row (y): the mask read back equals the (H, W) mask transposed
        back = data[s["layer"], :, :, 0] == s["label_value"]
        np.testing.assert_array_equal(back.T, pred.masks[k])
    assert hdr["Segment0_Extent"] == "3 29 2 19 0 0"


def test_markups_roi_centres_and_sizes_in_lps_mm():
    from anatomy_vlm.predict import ImageGeometry, slicer_roi_markups

    pred = _synthetic()
    doc = slicer_roi_markups(pred, ImageGeometry((50, 30), origin=(5.0, 7.0, 0.0), spacing=(0.5, 0.25, 1.0)))
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#") and len(doc["markups"]) == 3
    m = doc["markups"][0]
    assert m["type"] == "ROI" and m["roiType"] == "Box" and m["coordinateSystem"] == "LPS"
    # box [3, 2, 30, 20] pixel edges: centre index (16.5 - 0.5, 11 - 0.5) -> LPS origin + index * spacing
    np.testing.assert_allclose(m["center"], [5 + 16 * 0.5, 7 + 10.5 * 0.25, 0.0])
    np.testing.assert_allclose(m["size"], [27 * 0.5, 18 * 0.25, 1.0])
    assert m["name"] == "Right lung" and m["controlPoints"][0]["label"] == "right lung"
    assert m["orientation"] == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]  # MONAI's, identity direction
    assert doc["markups"][2]["controlPoints"][0]["label"] == "abdomen"


def test_image_geometry_reads_itk_header(images):
    from anatomy_vlm.predict import image_geometry

    geo = image_geometry(images["a"])
    assert geo.size == (128, 96)  # (W, H)
    assert geo.spacing == (1.0, 1.0, 1.0) and geo.origin == (0.0, 0.0, 0.0)


def test_flat_labelmap_nifti_lines_up_with_the_image(tmp_path):
    from anatomy_vlm.predict import ImageGeometry, flat_labelmap, write_flat_labelmap

    pred = _synthetic()
    flat = flat_labelmap(pred)
    assert flat[6, 5] == 2 and flat[3, 20] == 1 and flat[25, 40] == 29 and flat[29, 0] == 0  # smallest wins
    out = write_flat_labelmap(pred, ImageGeometry((50, 30), spacing=(0.5, 0.25, 1.0)), tmp_path / "l.nii.gz")
    back = read_image(out)  # io's NIfTI contract: data[x, y] = pixels[y, x]
    np.testing.assert_array_equal(back.pixels, flat)
    assert back.spacing == (0.25, 0.5)  # (row_mm, col_mm)


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_predict_json_and_missing_checkpoint(full, images, tiny_checkpoint, cache_dir, tmp_path, capsys):
    from anatomy_vlm.cli import main

    assert main(["predict", str(images["a"]), "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "nope.pt" in err
    assert main(["predict", str(images["a"]), "--checkpoint", str(tiny_checkpoint), "--json",
                 "--cache-dir", str(cache_dir), "--regions", "trachea,carina"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["regions"]] == ["trachea", "carina"]
    np.testing.assert_allclose(doc["regions"][0]["box"], full.decoder_boxes[REGION_NAMES.index("trachea")],
                               atol=0.01)


def test_dense_head_checkpoint_serves_mask_boxes_through_onnx_like_pytorch(images, cache_dir, tmp_path, monkeypatch):
    """A dense-head model: detection boxes are its masks' boxes; the runtime (OpenVINO) and PyTorch agree."""
    from anatomy_vlm.checkpoint import save_checkpoint
    from anatomy_vlm.model import build_model
    from anatomy_vlm.predict import Predictor

    torch.manual_seed(0)
    cfg = dict(TINY, mask_head={"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
               box_refiner={"enabled": False})
    model = build_model(cfg)
    with torch.no_grad():  # make the random head's masks non-empty
        model.mask_head.out.bias.fill_(0.5)
    path = save_checkpoint(tmp_path / "dense.pt", model, {"data": "none (random weights, contract test)"})
    fast = Predictor.from_checkpoint(path, cache_dir=cache_dir)
    det = fast.predict(images["a"])
    assert fast.mask_head_backend == "openvino"
    assert set(det.box_source) == {"mask"} and det.masks is None
    seg = fast.predict(images["a"], with_masks=True)
    np.testing.assert_allclose(det.boxes, seg.boxes)
    # masks' bounding boxes on the original grid agree with the served boxes (within the profile shortcut)
    from anatomy_vlm.model.query_mask_head import mask_boxes

    mb = mask_boxes(torch.from_numpy(seg.masks)).numpy()
    ok = mb[:, 2] > mb[:, 0]
    np.testing.assert_allclose(seg.boxes[ok], mb[ok], atol=2.0)
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "torch")
    eager = Predictor.from_checkpoint(path, cache_dir=cache_dir)
    ref = eager.predict(images["a"])
    assert eager.mask_head_backend == "pytorch"
    np.testing.assert_allclose(det.boxes, ref.boxes, atol=1.0)
    np.testing.assert_allclose(det.scores, ref.scores, atol=1e-3)
