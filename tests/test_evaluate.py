"""Evaluation: COCO-style box AP (hand-computed cases, cross-check with MONAI), mask Dice, the
``run_evaluation`` pipeline with an injected predictor, overlays and the ``evaluate`` CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES
from anatomy_vlm.evaluate import (IOU_THRESHOLDS, box_ious, evaluate_detection, evaluate_segmentation,
                                  run_evaluation)

K = NUM_REGIONS


def _gt_boxes(rng: np.random.Generator | None = None) -> np.ndarray:
    """29 distinct boxes, 100 x 100 px each, on a grid (xyxy pixel edges)."""
    b = np.zeros((K, 4), np.float32)
    for k in range(K):
        x, y = (k % 6) * 120.0, (k // 6) * 120.0
        b[k] = [x, y, x + 100, y + 100]
    return b


def _case(n: int = 2):
    """``n`` images with every region present and predicted perfectly at score 0.9."""
    gts = [{"id": f"im{i}", "boxes": _gt_boxes(), "present": np.ones(K, bool)} for i in range(n)]
    preds = [{"id": f"im{i}", "boxes": _gt_boxes(), "scores": np.full(K, 0.9, np.float32)} for i in range(n)]
    return preds, gts


def _with_height(box: np.ndarray, h: float) -> np.ndarray:
    """Same box with its height set to ``h`` (IoU with a 100 px box = h / 100 for h <= 100)."""
    b = box.copy()
    b[3] = b[1] + h
    return b


# ------------------------------------------------------------------------------------- detection
def test_iou_thresholds_are_cocos():
    assert np.allclose(IOU_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


def test_box_ious_elementwise_and_degenerate():
    g = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    p = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [10, 10, 0, 0]], np.float32)  # last one inverted
    assert np.allclose(box_ious(p, g), [1.0, 0.5, 0.0], atol=1e-6)


def test_box_ious_match_monai_and_keep_float64_thresholds():
    from monai.data.box_utils import box_iou

    rng = np.random.default_rng(1)
    a = rng.uniform(0, 50, (40, 2))
    p = np.concatenate([a, a + rng.uniform(1, 60, (40, 2))], 1)
    g = p + rng.normal(0, 8, (40, 4))
    g[:, 2:] = np.maximum(g[:, 2:], g[:, :2] + 1)
    assert np.allclose(box_ious(p, g), np.diagonal(box_iou(p, g)), atol=1e-6)
    # IoU exactly 0.65 counts at the 0.65 threshold, as in pycocotools (MONAI's float32 gives 0.64999998)
    preds, gts = _case(1)
    preds[0]["boxes"][0] = _with_height(preds[0]["boxes"][0], 65.0)
    r = evaluate_detection(preds, gts)["per_region"][REGION_NAMES[0]]
    assert r["AP_by_threshold"] == pytest.approx([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_perfect_predictions_give_map_one():
    preds, gts = _case(3)
    r = evaluate_detection(preds, gts)
    assert r["mAP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    assert r["mean_iou"] == pytest.approx(1.0, abs=1e-6)
    assert set(r["per_region"]) == set(REGION_NAMES)
    assert all(v["AP"] == pytest.approx(1.0) for v in r["per_region"].values())
    assert r["n_gt"] == 3 * K and r["n_absent_predicted"] == 0 and r["regions_without_gt"] == []
    json.dumps(r)  # JSON-able


def test_iou_062_box_counts_at_thresholds_050_to_060_only():
    preds, gts = _case(2)
    k = REGION_NAMES.index("carina")
    for p in preds:
        p["boxes"][k] = _with_height(p["boxes"][k], 62.0)  # IoU 0.62
    r = evaluate_detection(preds, gts)["per_region"]["carina"]
    assert r["AP_by_threshold"] == pytest.approx([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(0.0)
    assert r["AP"] == pytest.approx(0.3)
    assert r["mean_iou"] == pytest.approx(0.62, abs=1e-5)
    other = evaluate_detection(preds, gts)["per_region"]["trachea"]
    assert other["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("score, expected", [(0.1, 67 / 101), (0.95, 67 / 101 * 2 / 3)])
def test_missed_region_lowers_ap_by_its_score_rank(score, expected):
    """3 images, region missed (IoU 0) in one. Low score: TP, TP, FP -> precision 1 up to recall 2/3
    (67 of the 101 recall points, 0.00..0.66). High score: FP first -> precision 2/3 on those points."""
    preds, gts = _case(3)
    k = REGION_NAMES.index("svc")
    preds[1]["boxes"][k] = [900, 900, 950, 950]
    preds[1]["scores"][k] = score
    r = evaluate_detection(preds, gts)
    assert r["per_region"]["svc"]["AP"] == pytest.approx(expected)
    assert r["per_region"]["svc"]["recall"] == pytest.approx(2 / 3)
    others = [v["AP"] for n, v in r["per_region"].items() if n != "svc"]
    assert r["mAP"] == pytest.approx((sum(others) + expected) / K)


@pytest.mark.parametrize("score, expected", [(0.95, 2 / 3), (0.1, 1.0)])
def test_absent_region_predicted_is_a_false_positive(score, expected):
    """Region absent in image 2 but predicted: FP at its score. Above the TPs (0.9): precision 0, 1/2,
    2/3 -> envelope 2/3 everywhere -> AP 2/3. Below them: the FP comes after full recall -> AP 1."""
    preds, gts = _case(3)
    k = REGION_NAMES.index("abdomen")
    gts[2]["present"][k] = False
    gts[2]["boxes"][k] = 0.0
    preds[2]["scores"][k] = score
    r = evaluate_detection(preds, gts)
    a = r["per_region"]["abdomen"]
    assert a["AP"] == pytest.approx(expected) and a["n_gt"] == 2 and a["n_absent_predicted"] == 1
    assert a["mean_iou"] == pytest.approx(1.0, abs=1e-6)  # IoU only over present regions
    assert r["n_absent_predicted"] == 1 and r["n_gt"] == 3 * K - 1


def test_region_without_any_gt_is_not_scored():
    preds, gts = _case(2)
    k = REGION_NAMES.index("right atrium")
    for g in gts:
        g["present"][k] = False
    r = evaluate_detection(preds, gts)
    assert r["per_region"]["right atrium"]["AP"] is None
    assert r["regions_without_gt"] == ["right atrium"]
    assert r["mAP"] == pytest.approx(1.0)  # COCO: mean over classes with ground truth only


def test_nonfinite_score_means_no_detection():
    preds, gts = _case(2)
    k = REGION_NAMES.index("trachea")
    preds[0]["scores"][k] = np.nan
    r = evaluate_detection(preds, gts)["per_region"]["trachea"]
    assert r["AP"] == pytest.approx(51 / 101)  # recall 1/2 at precision 1: points 0.00..0.50
    assert r["recall"] == pytest.approx(0.5)


def test_hand_computed_two_image_example():
    """One region, 2 images: A IoU 0.72 at score 0.9, B IoU 0.92 at score 0.6.
    t <= 0.70 (5 thresholds): both TP -> AP 1. t in 0.75..0.90 (4): A is FP then B TP: precision 1/2
    on recall points 0.00..0.50 (51 of 101) -> 25.5/101. t = 0.95: both FP -> 0."""
    preds, gts = _case(2)
    k = REGION_NAMES.index("cavoatrial junction")
    preds[0]["boxes"][k] = _with_height(preds[0]["boxes"][k], 72.0)
    preds[1]["boxes"][k] = _with_height(preds[1]["boxes"][k], 92.0)
    preds[1]["scores"][k] = 0.6
    r = evaluate_detection(preds, gts)["per_region"]["cavoatrial junction"]
    half = 25.5 / 101
    assert r["AP_by_threshold"] == pytest.approx([1] * 5 + [half] * 4 + [0])
    assert r["AP"] == pytest.approx((5 + 4 * half) / 10)
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(half)
    assert r["mean_iou"] == pytest.approx(0.82, abs=1e-5)


def test_input_validation():
    preds, gts = _case(2)
    with pytest.raises(ValueError, match="ground-truth images"):
        evaluate_detection(preds[:1], gts)
    preds[1]["id"] = "other"
    with pytest.raises(ValueError, match="id"):
        evaluate_detection(preds, gts)
    preds, gts = _case(1)
    preds[0]["scores"] = preds[0]["scores"][:5]
    with pytest.raises(ValueError, match="expected boxes"):
        evaluate_detection(preds, gts)


def test_matches_monai_coco_metric():
    """Random jittered boxes, random scores, some absent regions: same AP as MONAI's matching_batch +
    COCOMetric. 7 images so that each region has 6 or 7 GT boxes: recalls k/6, k/7 never sit on a
    recall point where MONAI's float32 cumsum and COCO's float64 would round differently."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    rng = np.random.default_rng(0)
    n = 7
    preds, gts = [], []
    for i in range(n):
        g = _gt_boxes() + rng.uniform(-10, 10, (K, 4)).astype(np.float32)
        present = np.ones(K, bool)
        present[[k for k in range(K) if k % 7 == i and k % 3 == 0]] = False
        p = g + rng.normal(0, 12, (K, 4)).astype(np.float32)
        p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
        gts.append({"id": str(i), "boxes": g, "present": present})
        preds.append({"id": str(i), "boxes": p, "scores": rng.uniform(0, 1, K).astype(np.float32)})
    ours = evaluate_detection(preds, gts)
    assert ours["n_absent_predicted"] > 0

    metric = COCOMetric(classes=list(REGION_NAMES), iou_list=(0.5, 0.75), iou_range=(0.5, 0.95, 0.05),
                        max_detection=(100,), verbose=False)
    labels = np.arange(K)
    matched = matching_batch(
        iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
        pred_boxes=[p["boxes"].astype(np.float64) for p in preds], pred_classes=[labels for _ in preds],
        pred_scores=[p["scores"].astype(np.float64) for p in preds],
        gt_boxes=[g["boxes"][g["present"]].astype(np.float64) for g in gts],
        gt_classes=[labels[g["present"]] for g in gts], max_detections=100)
    theirs, _ = metric(matched)
    assert ours["mAP"] == pytest.approx(theirs["mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=1e-6)
    assert ours["AP50"] == pytest.approx(theirs["AP_IoU_0.50_MaxDet_100"], abs=1e-6)
    assert ours["AP75"] == pytest.approx(theirs["AP_IoU_0.75_MaxDet_100"], abs=1e-6)
    for name in REGION_NAMES:
        assert ours["per_region"][name]["AP"] == pytest.approx(
            theirs[f"{name}_mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=1e-6), name
        assert ours["per_region"][name]["AP50"] == pytest.approx(
            theirs[f"{name}_AP_IoU_0.50_MaxDet_100"], abs=1e-6), name
    assert 0.05 < ours["mAP"] < 0.95  # a non-trivial case


# ---------------------------------------------------------------------------------- segmentation
def test_segmentation_dice_on_hand_made_masks():
    H = W = 8
    gt = np.zeros((K, H, W), bool)
    pred = np.zeros((K, H, W), bool)
    heart, rl, ll, ab = (REGION_NAMES.index(n) for n in
                         ("cardiac silhouette", "right lung", "left lung", "abdomen"))
    gt[heart, 0, 0:4] = True          # 4 px
    pred[heart, 0, 2:6] = True        # 4 px, 2 overlap -> Dice 0.5, IoU 1/3
    gt[rl, 2:4, 0:4] = True
    pred[rl] = gt[rl]                 # perfect
    gt[ll, 5, 5] = True               # present, nothing predicted -> Dice 0
    pred[ab, 7, 7] = True             # absent in GT, predicted
    present = np.zeros(K, bool)
    present[[heart, rl, ll]] = True
    r = evaluate_segmentation([pred, gt.copy()], [gt, gt], [present, present])
    assert r["per_region"]["cardiac silhouette"]["dice"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["per_region"]["cardiac silhouette"]["iou"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert r["per_region"]["cardiac silhouette"]["dice_min"] == pytest.approx(0.5)
    assert r["dice_heart"] == pytest.approx(0.75) and r["dice_right_lung"] == pytest.approx(1.0)
    assert r["dice_left_lung"] == pytest.approx(0.5)
    assert r["per_region"]["abdomen"]["dice"] is None and r["per_region"]["abdomen"]["n_absent_predicted"] == 1
    assert r["mean_dice"] == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert len(r["regions_without_gt"]) == K - 3
    perfect = evaluate_segmentation([gt], [gt], [present])
    assert perfect["mean_dice"] == pytest.approx(1.0) and perfect["mean_iou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected"):
        evaluate_segmentation([pred[:, :4]], [gt], [present])


# ------------------------------------------------------------------------- pipeline with a fake model
@dataclass
class _Prediction:
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None
    image_shape: tuple[int, int]


class _OraclePredictor:
    """Answers the ground truth of the demo studies (optionally with a box shift), like
    ``anatomy_vlm.predict.Predictor.predict(path, with_masks)``."""

    meta = {"command": "oracle (test)", "data": "ground truth"}

    def __init__(self, root, shift: float = 0.0):
        from anatomy_vlm.data import DemoDataset

        ds = DemoDataset(root, "all", load_masks=True)
        self.by_path = {s["meta"]["image_path"]: s for s in (ds[i] for i in range(len(ds)))}
        self.shift, self.calls = shift, []

    def predict(self, image, with_masks: bool, regions=None):
        s = self.by_path[str(image)]
        self.calls.append((str(image), with_masks))
        boxes = s["boxes"] + np.float32(self.shift) * s["present"][:, None]
        return _Prediction(boxes, np.where(s["present"], 0.9, 0.05).astype(np.float32),
                           s["masks"].copy() if with_masks else None, s["image"].shape)


def test_run_evaluation_detection_and_overlays(demo_studies, tmp_path):
    oracle = _OraclePredictor(demo_studies.root)
    res = run_evaluation(tmp_path / "none.pt", demo_studies.root, "detection", split="all",
                         overlays_dir=tmp_path / "ov", limit=3, predictor=oracle)
    json.dumps(res)
    d = res["data"]
    assert d["source"].startswith("demo studies projected from the real chest CT")
    assert d["split"] == "all" and d["n_images"] == 3 and d["manifest_seed"] == 0
    assert "build-demo" in d["manifest_command"] and len(d["ids"]) == 3
    assert res["task"] == "detection" and res["checkpoint"]["meta"]["command"] == "oracle (test)"
    assert res["metrics"]["mAP"] == pytest.approx(1.0) and res["metrics"]["mean_iou"] == pytest.approx(1.0, abs=1e-5)
    assert all(w is False for _, w in oracle.calls)  # detection scores the served (decoder) boxes
    n = len(oracle.calls)
    run_evaluation(tmp_path / "none.pt", demo_studies.root, "detection", split="all", limit=1,
                   predictor=oracle, mask_boxes=True)
    assert [w for _, w in oracle.calls[n:]] == [True]
    pngs = sorted((tmp_path / "ov").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(d["ids"])
    from PIL import Image

    with Image.open(pngs[0]) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[0] > 128 and (np.abs(a[..., 0].astype(int) - a[..., 1]) > 60).any()  # coloured boxes drawn


def test_run_evaluation_segmentation_and_imperfect_boxes(demo_studies, tmp_path):
    res = run_evaluation(None, demo_studies.root, "segmentation", split="train", limit=2,
                         predictor=_OraclePredictor(demo_studies.root), overlays_dir=tmp_path / "ov")
    m = res["metrics"]
    assert m["mean_dice"] == pytest.approx(1.0) and m["dice_heart"] == pytest.approx(1.0)
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
    shifted = run_evaluation(None, demo_studies.root, "detection", split="train", limit=2,
                             predictor=_OraclePredictor(demo_studies.root, shift=3.0))
    assert shifted["metrics"]["mAP"] < 1.0 and shifted["metrics"]["mean_iou"] < 1.0
    with pytest.raises(ValueError, match="unknown task"):
        run_evaluation(None, demo_studies.root, "classification", predictor=object())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_evaluation(tmp_path / "missing.pt", demo_studies.root, "detection", split="train")


def test_cli_evaluate(demo_studies, tmp_path, monkeypatch, capsys):
    import anatomy_vlm.evaluate as ev
    from anatomy_vlm.cli import main

    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"not used: the predictor is injected")
    monkeypatch.setattr(ev, "_load_predictor", lambda path: _OraclePredictor(demo_studies.root, shift=2.0))
    args = ["evaluate", "--checkpoint", str(ck), "--demo", str(demo_studies.root), "--task", "detection",
            "--split", "train", "--limit", "2", "--threads", "1", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mAP@[.5:.95]" in out and "AP50" in out and "worst 5 regions by AP" in out
    assert "demo studies projected from the real chest CT" in out
    assert main(args + ["--json", "--output", str(tmp_path / "r.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"]["n_images"] == 2 and res["checkpoint"]["path"] == str(ck.resolve())
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["mAP"] == res["metrics"]["mAP"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--demo", str(demo_studies.root)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
