"""Corrected labels: parsing, validation and merging (anatomy_vlm.labels)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anatomy_vlm.anatomy import NUM_REGIONS, REGIONS
from anatomy_vlm.labels import LabelError, check_id, check_mask_shape, merge_box_label, parse_box_correction
from anatomy_vlm.predict import ImageGeometry, Prediction, slicer_roi_markups

SHAPE = (400, 300)  # H, W


def test_project_form_partial_and_absent():
    c = parse_box_correction(json.dumps({"regions": [
        {"id": 1, "box": [10, 20, 150, 300]}, {"name": "carina", "box": None},
        {"name": "Left lung", "box": [150.2, 20, 300.4, 300]}]}), SHAPE)
    assert c.boxes["right lung"] == [10, 20, 150, 300]
    assert c.boxes["left lung"] == [150.2, 20, 300, 300]  # half a pixel outside: clamped
    assert c.absent == ["carina"]
    assert c.regions == ["right lung", "left lung", "carina"]


@pytest.mark.parametrize("doc, msg", [
    ("{not json", "malformed JSON"),
    (b"\xff\xfe", "UTF-8"),
    ("[1, 2]", "JSON object"),
    ({"regions": "x"}, "'regions' list"),
    ({"regions": []}, "no region"),
    ({"regions": [{"name": "spleen", "box": [0, 0, 1, 1]}]}, "unknown region 'spleen'"),
    ({"regions": [{"id": 30, "box": [0, 0, 1, 1]}]}, "unknown region 30"),
    ({"regions": [{"id": 1, "box": [0, 0, 1, 1]}, {"name": "right lung", "box": [0, 0, 2, 2]}]}, "twice"),
    ({"regions": [{"id": 1, "name": "left lung", "box": [0, 0, 1, 1]}]}, "disagree"),
    ({"regions": [{"id": 1}]}, "has no 'box'"),
    ({"regions": [{"id": 1, "box": [0, 0, 1]}]}, r"\[x0, y0, x1, y1\]"),
    ({"regions": [{"id": 1, "box": [0, 0, "a", 1]}]}, "finite numbers"),
    ({"regions": [{"id": 1, "box": [0, 0, float("nan"), 1]}]}, "finite numbers"),
    ({"regions": [{"id": 1, "box": [5, 0, 5, 1]}]}, "empty or inverted"),
    ({"regions": [{"id": 1, "box": [0, 0, 301, 10]}]}, "outside the image"),
    ({"regions": [{"id": 1, "box": [-3, 0, 10, 10]}]}, "outside the image"),
    ({"markups": [{"type": "Fiducial"}]}, "only ROI"),
])
def test_bad_corrections_say_why(doc, msg):
    geometry = ImageGeometry((SHAPE[1], SHAPE[0]))
    with pytest.raises(LabelError, match=msg):
        parse_box_correction(doc, SHAPE, geometry)


def test_slicer_markups_round_trip_through_our_own_writer():
    """What the stock panel sends back is our ROI JSON (possibly edited): it maps back to the same pixels,
    also for an image with spacing, origin and a flipped axis."""
    geom = ImageGeometry((SHAPE[1], SHAPE[0]), origin=(12.0, -40.0, 3.0), spacing=(0.7, 0.5, 1.0),
                         direction=((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)))
    boxes = np.array([[10, 20, 150, 300], [160, 30, 290, 310], [120, 60, 180, 120]], np.float32)
    pred = Prediction("x.png", SHAPE, (0, 8, 27), boxes, np.ones(3, np.float32), boxes, None,
                      ("decoder",) * 3, {})
    doc = slicer_roi_markups(pred, geom)
    c = parse_box_correction(json.dumps(doc), SHAPE, geom)
    assert list(c.boxes) == ["right lung", "left lung", "carina"]
    for k, name in enumerate(("right lung", "left lung", "carina")):
        np.testing.assert_allclose(c.boxes[name], boxes[k], atol=1e-3)
    with pytest.raises(LabelError, match="geometry"):
        parse_box_correction(doc, SHAPE, None)


def test_merge_keeps_untouched_regions_and_records_who_confirmed_what():
    prev = {"regions": [{"id": r.id, "name": r.name, "box": [1, 1, 2, 2], "score": 0.9} for r in REGIONS]}
    c1 = parse_box_correction({"regions": [{"id": 1, "box": [10, 20, 150, 300]}]}, SHAPE)
    lab = merge_box_label(prev, c1, "img", "ann1", "2026-11-23T18:00:00Z")
    assert len(lab["regions"]) == NUM_REGIONS
    assert lab["regions"][0]["box"] == [10, 20, 150, 300] and lab["regions"][1]["box"] == [1, 1, 2, 2]
    assert lab["confirmed"] == {"right lung": {"user": "ann1", "time": "2026-11-23T18:00:00Z"}}
    c2 = parse_box_correction({"regions": [{"name": "carina", "box": None}]}, SHAPE)
    lab2 = merge_box_label(lab, c2, "img", None, "2026-11-23T18:05:00Z")
    assert set(lab2["confirmed"]) == {"right lung", "carina"} and lab2["confirmed"]["carina"]["user"] == "unknown"
    assert lab2["regions"][0]["box"] == [10, 20, 150, 300]
    assert next(r for r in lab2["regions"] if r["name"] == "carina")["box"] is None
    # no previous label: only the corrected regions
    assert [r["name"] for r in merge_box_label(None, c1, "img", "a", "t")["regions"]] == ["right lung"]


def test_ids_and_mask_shapes():
    assert check_id("cxr_0001") == "cxr_0001" and check_id("real_rg1_uncr.v2") == "real_rg1_uncr.v2"
    for bad in ("../x", "a/b", "..", "", ".hidden", "x" * 300, None, 5, "a\\b"):
        with pytest.raises(LabelError, match="invalid image id"):
            check_id(bad)
    check_mask_shape(np.zeros((NUM_REGIONS, *SHAPE), bool), SHAPE)
    check_mask_shape(np.full(SHAPE, 29, np.uint8), SHAPE)
    with pytest.raises(LabelError, match="expected"):
        check_mask_shape(np.zeros((NUM_REGIONS, SHAPE[1], SHAPE[0]), bool), SHAPE)
    with pytest.raises(LabelError, match="0..29"):
        check_mask_shape(np.full(SHAPE, 30, np.uint8), SHAPE)


def test_mask_corrections_give_boxes_absences_and_confirmed_masks():
    from anatomy_vlm.labels import mask_correction

    H, W = 40, 50
    stack = np.zeros((NUM_REGIONS, H, W), bool)
    stack[0, 5:20, 3:11] = True  # right lung: rows 5-19, columns 3-10
    stack[28, 30:35, 0:50] = True  # abdomen
    corr = mask_correction(stack)
    assert corr.boxes == {"right lung": [3.0, 5.0, 11.0, 20.0], "abdomen": [0.0, 30.0, 50.0, 35.0]}
    assert corr.absent == []
    named = mask_correction(stack, ["right lung", "trachea"])
    assert set(named.boxes) == {"right lung"} and named.absent == ["trachea"]
    labelmap = np.zeros((H, W), np.int64)
    labelmap[5:20, 3:11] = 1
    assert mask_correction(labelmap).boxes == {"right lung": [3.0, 5.0, 11.0, 20.0]}
    with pytest.raises(LabelError, match="unknown region"):
        mask_correction(stack, ["spleen"])
    first = merge_box_label(None, named, "img", "ann", "t0", masks=True)
    assert first["confirmed_masks"] == ["right lung", "trachea"]
    later = merge_box_label(first, parse_box_correction({"regions": [{"name": "carina", "box": [1, 1, 4, 4]}]},
                                                        (H, W)), "img", "ann", "t1")
    assert later["confirmed_masks"] == ["right lung", "trachea"]  # a box-only correction adds no mask
    assert set(later["confirmed"]) == {"right lung", "trachea", "carina"}


def test_mask_corrections_take_the_served_box_convention_when_given_offsets():
    """With a checkpoint's box calibration, the box a corrected mask confirms is the one the model serves
    for that mask: the bounding box shifted by the region's relative edge offsets, clipped to the image."""
    from anatomy_vlm.labels import mask_correction

    H, W = 40, 50
    stack = np.zeros((NUM_REGIONS, H, W), bool)
    stack[0, 5:25, 10:20] = True  # right lung: box [10, 5, 20, 25], 10 wide, 20 high
    stack[28, 30:40, 0:50] = True  # abdomen, touching the bottom and both sides
    off = np.zeros((NUM_REGIONS, 4))
    off[0] = [0.1, 0.2, -0.1, 0.05]  # x0 +1, y0 +4, x1 -1, y1 +1 pixel(s)
    off[28] = [-0.5, 0.0, 0.5, 0.5]  # would leave the image: clipped
    corr = mask_correction(stack, box_offsets=off)
    assert corr.boxes["right lung"] == pytest.approx([11.0, 9.0, 19.0, 26.0])
    assert corr.boxes["abdomen"] == pytest.approx([0.0, 30.0, 50.0, 40.0])
    assert mask_correction(stack, box_offsets=np.zeros((NUM_REGIONS, 4))).boxes == mask_correction(stack).boxes
    with pytest.raises(LabelError, match="box offsets"):
        mask_correction(stack, box_offsets=np.zeros((3, 4)))
    with pytest.raises(LabelError, match="box offsets"):
        mask_correction(stack, box_offsets=np.full((NUM_REGIONS, 4), np.nan))
