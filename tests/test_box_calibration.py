"""Per-region box calibration (anatomy_vlm.box_calibration): fitting, applying, storing in the checkpoint,
and the predictor serving calibrated mask boxes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from anatomy_vlm.anatomy import NUM_REGIONS
from anatomy_vlm.box_calibration import (apply_box_calibration, calibrate_checkpoint, calibration_offsets,
                                         fit_box_calibration)

CHECKPOINT = Path(__file__).resolve().parents[1] / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt"


def _boxes(rng, n):
    x0, y0 = rng.uniform(0, 200, (n, NUM_REGIONS)), rng.uniform(0, 200, (n, NUM_REGIONS))
    w, h = rng.uniform(20, 200, (n, NUM_REGIONS)), rng.uniform(20, 200, (n, NUM_REGIONS))
    return np.stack([x0, y0, x0 + w, y0 + h], -1)


def test_fit_recovers_a_per_region_offset_and_ignores_outliers_and_rare_regions():
    rng = np.random.default_rng(0)
    pred = _boxes(rng, 40)
    true = rng.uniform(-0.2, 0.2, (NUM_REGIONS, 4))
    size = np.stack([pred[..., 2] - pred[..., 0], pred[..., 3] - pred[..., 1]] * 2, -1)[..., [0, 1, 2, 3]]
    gt = pred + true[None] * size + rng.normal(0, 0.5, pred.shape)
    gt[:3] += 500.0  # three failed masks: the median does not follow them
    present = np.ones((40, NUM_REGIONS), bool)
    present[4:, 7] = False  # region 8 present in 4 images only: below MIN_IMAGES
    off = fit_box_calibration(pred, gt, present)
    assert off.shape == (NUM_REGIONS, 4)
    keep = [k for k in range(NUM_REGIONS) if k != 7]
    np.testing.assert_allclose(off[keep], true[keep], atol=0.02)
    assert (off[7] == 0).all()
    with pytest.raises(ValueError, match="expected boxes"):
        fit_box_calibration(pred[:, :5], gt[:, :5], present[:, :5])


def test_apply_shifts_by_box_size_clips_to_the_image_and_never_turns_a_box_over():
    boxes = np.array([[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, 50.0, 50.0], [10.0, 10.0, 20.0, 20.0]], np.float32)
    off = np.array([[0.1, -0.2, 0.0, 0.5], [-0.5, 0.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]])
    out = apply_box_calibration(boxes, off, image_size=(80, 100))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [20.0, 10.0, 100.0, 80.0])  # x1 110 -> clipped to W, y1 95 -> H
    np.testing.assert_allclose(out[1], [0.0, 0.0, 50.0, 50.0])  # x0 -25 -> 0
    np.testing.assert_allclose(out[2], boxes[2])  # would turn over: kept


def test_offsets_in_metadata_are_checked():
    assert calibration_offsets({}) is None
    assert calibration_offsets({"box_calibration": {"offsets": [[0, 0, 0, 0]] * NUM_REGIONS}}).shape == (NUM_REGIONS, 4)
    with pytest.raises(ValueError, match="offsets must be"):
        calibration_offsets({"box_calibration": {"offsets": [[0, 0, 0]] * NUM_REGIONS}})


@pytest.mark.slow
def test_calibrate_writes_the_checkpoint_and_the_predictor_serves_the_shifted_mask_boxes(demo_studies, tmp_path,
                                                                                          two_torch_threads):
    from anatomy_vlm.checkpoint import read_checkpoint
    from anatomy_vlm.predict import Predictor

    ckpt = tmp_path / "ckpt.pt"
    shutil.copy2(CHECKPOINT, ckpt)
    with pytest.raises(ValueError, match="test is where it is measured"):
        calibrate_checkpoint(ckpt, demo_studies.root, split="test", progress=False)
    before = read_checkpoint(ckpt)
    # the six-study fixture has four train studies: min_images 1 so that every region gets an offset
    cal = calibrate_checkpoint(ckpt, demo_studies.root, split="train", cache_dir=tmp_path / "cache",
                               progress=False, min_images=1)
    after = read_checkpoint(ckpt)
    assert after["meta"]["box_calibration"] == cal and cal["split"] == "train" and cal["n_images"] == 4
    assert cal["map_after"] >= cal["map_before"]  # on the split it was fitted on
    for k, v in before["state_dict"].items():  # weights untouched
        assert np.array_equal(v.numpy(), after["state_dict"][k].numpy()), k
    assert not list(tmp_path.glob(".ckpt.pt.*.tmp"))

    p = Predictor.from_checkpoint(ckpt, cache_dir=tmp_path / "cache")
    image = sorted(demo_studies.studies.glob("cxr_*.dcm"))[0]
    served = p.predict(image)
    off = p.box_calibration
    assert off is not None and np.abs(off).sum() > 0
    p.box_calibration = None
    raw = p.predict(image)
    rows = np.array([s == "mask" for s in raw.box_source])
    assert rows.any()
    H, W = raw.image_shape
    np.testing.assert_allclose(served.boxes[rows], apply_box_calibration(raw.boxes, off, (H, W))[rows], atol=1e-3)
    np.testing.assert_array_equal(served.boxes[~rows], raw.boxes[~rows])  # decoder fallbacks unchanged
    sub = Predictor.from_checkpoint(ckpt, cache_dir=tmp_path / "cache").predict(image, regions=[3, 8])
    np.testing.assert_allclose(sub.boxes, served.boxes[[2, 7]], atol=1e-3)  # a subset gets its own rows' offsets


@pytest.mark.slow
def test_refit_on_corrections_fits_the_confirmed_regions_and_keeps_the_others(demo_studies, tmp_path,
                                                                                two_torch_threads):
    """Annotators' confirmed boxes refit the offsets of the regions confirmed on enough images; a region
    confirmed too rarely, or only confirmed absent, keeps the checkpoint's offset."""
    from anatomy_vlm.anatomy import REGION_NAMES
    from anatomy_vlm.box_calibration import refit_from_corrections
    from anatomy_vlm.checkpoint import read_checkpoint
    from anatomy_vlm.data import CorrectionsDataset
    from anatomy_vlm.io import write_json_atomic
    from anatomy_vlm.labels import merge_box_label, parse_box_correction
    from anatomy_vlm.predict import Predictor

    ckpt = tmp_path / "ckpt.pt"
    shutil.copy2(CHECKPOINT, ckpt)
    before = read_checkpoint(ckpt)
    prev = calibration_offsets(before["meta"])
    assert prev is not None  # the shipped checkpoint is calibrated
    studies = tmp_path / "studies"
    shutil.copytree(demo_studies.studies, studies)
    raw_p = Predictor.from_checkpoint(ckpt, cache_dir=tmp_path / "cache")
    raw_p.box_calibration = None
    want = np.array([0.02, 0.1, -0.03, -0.05])  # (inside the image: the box shrinks)  # the annotators' convention for the right lung
    images = sorted(studies.glob("cxr_*.dcm"))[:3]
    for n, image in enumerate(images):
        raw = raw_p.predict(image)
        assert raw.box_source[0] == "mask"
        b = raw.boxes[0].astype(np.float64)
        w, h = b[2] - b[0], b[3] - b[1]
        lung = (b + want * np.array([w, h, w, h])).tolist()
        regions = [{"name": "right lung", "box": lung}, {"name": "carina", "box": None}]
        if n == 0:  # the trachea confirmed on one image only
            regions.append({"name": "trachea", "box": raw.boxes[REGION_NAMES.index("trachea")].tolist()})
        corr = parse_box_correction({"regions": regions}, raw.image_shape)
        write_json_atomic(merge_box_label(None, corr, image.stem, "ann", "t0"),
                          studies / "labels" / "boxes" / f"{image.stem}.boxes.json")
    ds = CorrectionsDataset(studies)
    assert sorted(ds.ids) == sorted(i.stem for i in images)
    cal = refit_from_corrections(ckpt, ds, cache_dir=tmp_path / "cache", min_images=3)
    assert cal["refit_regions"] == ["right lung"] and cal["split"] == "corrections" and cal["n_images"] == 3
    off = calibration_offsets(read_checkpoint(ckpt)["meta"])
    np.testing.assert_allclose(off[0], want, atol=1e-3)
    rest = [k for k in range(NUM_REGIONS) if k != 0]
    np.testing.assert_allclose(off[rest], prev[rest], atol=1e-5)  # trachea (1 image), carina (absent), others
    np.testing.assert_allclose(np.asarray(cal["previous"]), prev, atol=1e-5)
    after = read_checkpoint(ckpt)
    for k, v in before["state_dict"].items():  # weights untouched
        assert np.array_equal(v.numpy(), after["state_dict"][k].numpy()), k
    # too few confirmations anywhere: nothing refitted, the file unchanged
    shutil.copy2(CHECKPOINT, ckpt)
    assert refit_from_corrections(ckpt, ds, cache_dir=tmp_path / "cache", min_images=4) is None
    np.testing.assert_allclose(calibration_offsets(read_checkpoint(ckpt)["meta"]), prev)
