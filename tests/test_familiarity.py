"""How familiar an image looks to the model (anatomy_vlm.familiarity): the statistics on synthetic features,
then the shipped checkpoint's reference on studies projected from the real CT inside and outside the
training ranges, the real chest CR and real non-chest DICOM files of pydicom-data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anatomy_vlm.familiarity import (FAR_RATIO, Familiarity, fit_familiarity, metadata_notes,
                                     pooled_features)

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt"


def _pydicom_data(name: str) -> Path:
    spec = importlib.util.find_spec("data_store")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


# ---- the statistics ------------------------------------------------------------------------------------
def test_pooling_leaves_the_letterbox_padding_out():
    emb = np.full((4, 64, 64), 100.0)  # padding cells: 100
    emb[:, :32, :48] = np.arange(4)[:, None, None]  # the image covers 128 x 192 of the 256 input: 32 x 48 cells
    np.testing.assert_allclose(pooled_features(emb, (128, 192)), [0, 1, 2, 3])
    np.testing.assert_allclose(pooled_features(emb, (127, 190)), [0, 1, 2, 3])  # partly covered cells count
    with pytest.raises(ValueError, match=r"embedding \(C, h, w\)"):
        pooled_features(np.zeros((64, 64)), (256, 256))


def test_fitted_reference_grades_new_in_range_shifted_and_foreign_features():
    rng = np.random.default_rng(0)
    C = 16
    scales = np.linspace(0.5, 3.0, C)  # unequal variances: the Mahalanobis distance must account for them
    train, held, new = (rng.normal(size=(n, C)) * scales for n in (300, 60, 200))
    ref = fit_familiarity(train, held, split="val")
    assert ref["split"] == "val" and ref["n_train"] == 300 and ref["n_heldout"] == 60
    fam = Familiarity.from_meta({"familiarity": ref})
    assert fam.threshold == pytest.approx(fam.distance(held).max(), rel=1e-3)
    # new draws from the same distribution: nearly all in range
    assert np.mean([fam.grade(f)["level"] == "in range" for f in new]) >= 0.9
    # a shift of 3 standard deviations along the two narrowest channels: a small change in absolute terms
    shifted = new[0] + np.r_[3 * scales[:2], np.zeros(C - 2)] * 3
    g = fam.grade(shifted)
    assert g["level"] == "outside the training range" and 1 < g["ratio"] <= FAR_RATIO
    # the same absolute shift on the widest channels is within their spread
    assert fam.distance(new[0] + np.r_[np.zeros(C - 2), 3 * scales[:2]]) < fam.distance(shifted)
    far = fam.grade(new[0] + 10 * scales)
    assert far["level"] == "far outside the training range" and far["ratio"] > FAR_RATIO
    assert far["distance"] == pytest.approx(far["ratio"] * far["threshold"], rel=0.01)


def test_bad_inputs_and_references_are_clear_errors():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="at least 2 training and 1 held-out"):
        fit_familiarity(rng.normal(size=(1, 4)), rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match=r"\(N, C\) training and \(M, C\) held-out"):
        fit_familiarity(rng.normal(size=(10, 4)), rng.normal(size=(3, 5)))
    bad = rng.normal(size=(10, 4))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_familiarity(bad, rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match="precision"):
        Familiarity.from_meta({"familiarity": {"mean": [0.0] * 4, "precision": np.eye(3).tolist(), "threshold": 1}})
    with pytest.raises(ValueError, match="threshold"):
        Familiarity.from_meta({"familiarity": {"mean": [0.0] * 2, "precision": np.eye(2).tolist(), "threshold": 0}})
    fam = Familiarity(np.zeros(4), np.eye(4), 1.0)
    with pytest.raises(ValueError, match="5 channels, the reference 4"):
        fam.grade(np.zeros(5))
    assert Familiarity.from_meta({"box_calibration": {}}) is None and Familiarity.from_meta(None) is None


def test_dicom_attributes_that_say_the_image_is_not_a_frontal_chest_radiograph():
    assert metadata_notes({"modality": "CR", "body_part_examined": "CHEST", "view_position": "PA"}) == []
    assert metadata_notes({"modality": "DX", "body_part_examined": "PORT CHEST", "view_position": "AP"}) == []
    assert metadata_notes({}) == [] and metadata_notes(None) == []  # PNG, JPEG: nothing to check
    notes = metadata_notes({"modality": "MR", "body_part_examined": "KNEE", "view_position": "LL"})
    assert len(notes) == 3
    assert "Modality is MR" in notes[0] and "BodyPartExamined is KNEE" in notes[1] and "ViewPosition is LL" in notes[2]


# ---- the shipped checkpoint on real data -------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from anatomy_vlm.predict import Predictor

    p = Predictor.from_checkpoint(CHECKPOINT, cache_dir=tmp_path_factory.mktemp("emb"))
    assert p.familiarity is not None, "the shipped checkpoint carries a familiarity reference"
    return p


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Three 512 px studies projected from the real CT inside the training ranges (val draws) and three
    outside them (test draws), a seed the shipped checkpoint never saw."""
    from anatomy_vlm.demo import build_demo

    out = {}
    for split in ("val", "test"):
        root = tmp_path_factory.mktemp(f"drawn_{split}")
        build_demo(root, n=3, seed=11, size=512, progress=False, split=split)
        out[split] = sorted(p for p in (root / "studies").glob("cxr_*") if p.is_file())
    return out


@pytest.mark.slow
def test_shipped_reference_separates_the_training_ranges_from_outside_them(predictor, drawn):
    ratios = {split: [predictor.predict(p).input_check["ratio"] for p in paths] for split, paths in drawn.items()}
    assert len(ratios["val"]) == len(ratios["test"]) == 3
    assert np.median(ratios["val"]) <= 1.0 < np.median(ratios["test"]), ratios
    assert max(ratios["test"]) <= FAR_RATIO  # projections of a chest: outside the ranges, not foreign
    assert np.mean(ratios["val"]) < np.mean(ratios["test"])


def test_real_films_are_graded_and_named_in_every_answer(predictor):
    from anatomy_vlm.io import read_image

    chest = predictor.predict(_pydicom_data("RG1_UNCR.dcm"))  # a real chest CR: unlike the projections
    c = chest.to_json()["input_check"]
    assert c["level"] == "outside the training range" and 1 < c["ratio"] <= FAR_RATIO and c["notes"] == []
    tibia = predictor.predict(_pydicom_data("RG3_UNCR.dcm"))  # a real CR of a tibia
    t = tibia.to_json()["input_check"]
    assert t["level"] == "far outside the training range" and t["ratio"] > FAR_RATIO
    assert t["notes"] == ["DICOM BodyPartExamined is EXTREMITY: the model knows the chest"]
    mr = predictor.predict(read_image(_pydicom_data("MR2_UNCR.dcm")))  # an in-memory Radiograph: its meta
    assert mr.input_check["ratio"] > FAR_RATIO and any("Modality is MR" in n for n in mr.input_check["notes"])
    assert chest.subset(["right lung"]).to_json()["input_check"] == c  # kept for a subset of regions


def test_a_checkpoint_without_a_reference_says_so(predictor, tmp_path):
    from anatomy_vlm.predict import Predictor

    bare = Predictor(predictor.model, {k: v for k, v in predictor.meta.items() if k != "familiarity"},
                     cache_dir=predictor.cache.root)
    check = bare.predict(_pydicom_data("RG1_UNCR.dcm")).input_check
    assert check["level"] == "unknown" and "anatomy-vlm fit-familiarity" in check["message"]
    broken = dict(predictor.meta, familiarity=dict(predictor.meta["familiarity"], precision=[[1.0]]))
    p = Predictor(predictor.model, broken, cache_dir=predictor.cache.root).predict(_pydicom_data("RG1_UNCR.dcm"))
    assert len(p.boxes) == 29  # the boxes are still served; the check says why it cannot grade
    assert p.input_check["level"] == "unknown" and "unusable" in p.input_check["message"]
