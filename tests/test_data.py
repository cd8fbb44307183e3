"""Dataset readers (demo studies, Chest ImaGenome layout) and the model-frame box contract."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anatomy_vlm.anatomy import NUM_REGIONS, region
from anatomy_vlm.data import (
    BoxMapping, ChestImaGenomeDataset, DemoDataset, collate_targets, model_boxes_to_pixels, to_model_targets,
)

RL, LL = region("right lung").id - 1, region("left lung").id - 1


def _mask_box(m: np.ndarray) -> list[float] | None:
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        return None
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


# ----------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_root(demo_studies) -> Path:
    """The session's small demo build (conftest), shared by this module."""
    return demo_studies.root


@pytest.fixture(scope="module")
def demo_all(demo_root) -> list[dict]:
    ds = DemoDataset(demo_root, "all")
    return [ds[i] for i in range(len(ds))]


def test_demo_sample_contract(demo_all):
    assert demo_all
    for s in demo_all:
        H, W = s["image"].shape
        assert s["image"].dtype == np.float32
        assert s["boxes"].shape == (NUM_REGIONS, 4) and s["boxes"].dtype == np.float32
        assert s["present"].shape == s["valid"].shape == (NUM_REGIONS,)
        assert s["valid"].all()
        assert s["masks"].shape == (NUM_REGIONS, H, W) and s["masks"].dtype == bool
        assert len(s["spacing"]) == 2 and s["meta"]["dataset"] == "demo"


def test_demo_boxes_equal_mask_boxes(demo_all):
    for s in demo_all:
        for k in range(NUM_REGIONS):
            box = _mask_box(s["masks"][k])
            assert s["present"][k] == (box is not None)
            if box is not None:
                assert s["boxes"][k].tolist() == box, (s["id"], k)


def test_demo_right_lung_is_left_of_left_lung(demo_all):
    for s in demo_all:
        rl, ll = s["boxes"][RL], s["boxes"][LL]
        assert s["present"][RL] and s["present"][LL]
        assert (rl[0] + rl[2]) / 2 < (ll[0] + ll[2]) / 2, s["id"]  # patient's right = image left
        assert rl[0] < ll[0] and rl[2] < ll[2]


def test_demo_splits_partition_the_studies(demo_root):
    everything = DemoDataset(demo_root, "all", load_masks=False).ids
    parts = [DemoDataset(demo_root, sp, load_masks=False).ids for sp in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == sorted(everything)
    assert len(set(sum(parts, []))) == len(everything)
    assert parts[0], "the train split is empty"
    assert "real_rg1_uncr" not in everything  # the unlabelled real CR is in no split
    assert DemoDataset(demo_root, "train", load_masks=False)[0]["masks"] is None


def test_demo_unknown_split_and_missing_manifest(demo_root, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'.*train, val, test, all"):
        DemoDataset(demo_root, "validation")
    with pytest.raises(FileNotFoundError, match="manifest"):
        DemoDataset(tmp_path, "train")


# ----------------------------------------------------------------------------- model-frame boxes
@pytest.mark.parametrize("mapping", ["resize", "letterbox", "letterbox-center"])
def test_to_model_targets_round_trip_and_masks(demo_all, mapping):
    s = demo_all[0]
    H, W = s["image"].shape
    t = to_model_targets(s, input_size=64, mapping=mapping)
    b = t["boxes"]
    assert b.shape == (NUM_REGIONS, 4) and b.dtype == torch.float32
    assert ((b >= 0) & (b <= 1)).all()
    back = model_boxes_to_pixels(b[s["present"]], t["mapping"])
    np.testing.assert_allclose(back, s["boxes"][s["present"]], atol=1e-3)
    # the mapped masks lie where the mapped boxes say (nearest sampling at about half scale can drop a
    # thin edge row/column: allow 2 px of the 64 px grid; a flip, transpose or padding error is far larger)
    for k in np.flatnonzero(s["present"]):
        mb = np.asarray(_mask_box(t["masks"][k].numpy() > 0.5), float)
        cx, cy, w, h = (b[k] * 64).tolist()
        np.testing.assert_allclose(mb, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=2.0)


def test_resize_mapping_formula():
    s = {"image": np.zeros((100, 200), np.float32), "boxes": np.zeros((NUM_REGIONS, 4), np.float32),
         "present": np.zeros(NUM_REGIONS, bool)}
    s["boxes"][0] = [20, 10, 60, 50]
    s["present"][0] = True
    t = to_model_targets(s, input_size=256, mapping="resize")
    assert t["boxes"][0].tolist() == pytest.approx([40 / 200, 30 / 100, 40 / 200, 40 / 100])
    assert t["valid"][0] and not t["valid"][1]  # valid defaults to present
    lb = to_model_targets(s, input_size=256)  # default letterbox: scale 256/200, padding below only
    assert lb["boxes"][0].tolist() == pytest.approx([40 / 200, 30 / 200, 40 / 200, 40 / 200])
    assert lb["mapping"] == BoxMapping(256, 1.28, 1.28, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown mapping"):
        to_model_targets(s, mapping="crop")


@pytest.mark.parametrize("hw", [(119, 128), (1955, 1841), (80, 60), (5, 1001)])
def test_letterbox_matches_the_model_preprocessing(hw):
    preprocess = pytest.importorskip("anatomy_vlm.model.preprocess", reason="model preprocessing not present")
    H, W = hw
    lb = preprocess.Letterbox.for_size(H, W, 256)
    ours = BoxMapping.letterbox(H, W, 256)
    assert BoxMapping.from_letterbox(lb) == ours
    assert (ours.scale_x, ours.scale_y) == pytest.approx(lb.scale_xy)
    box = np.array([[0.0, 0.0, W, H], [W * 0.25, H * 0.5, W * 0.75, H * 0.9]])
    np.testing.assert_allclose(np.asarray(lb.boxes_to_input(box)),
                               box * [ours.scale_x, ours.scale_y, ours.scale_x, ours.scale_y])
    s = {"image": np.zeros((H, W), np.float32), "boxes": np.zeros((NUM_REGIONS, 4), np.float32),
         "present": np.zeros(NUM_REGIONS, bool)}
    s["boxes"][0], s["present"][0] = box[1], True
    a, b = to_model_targets(s), to_model_targets(s, mapping=lb)
    assert torch.equal(a["boxes"], b["boxes"])


def test_collated_targets_feed_the_criterion(demo_all):
    from anatomy_vlm.losses import AnatomyCriterion

    batch = collate_targets([to_model_targets(s, input_size=32) for s in demo_all[:2]])
    assert batch["boxes"].shape == (2, NUM_REGIONS, 4) and batch["masks"].shape == (2, NUM_REGIONS, 32, 32)
    pred = {"boxes": batch["boxes"], "presence_logits": torch.where(batch["present"], 20.0, -20.0),
            "mask_logits": (batch["masks"] * 2 - 1) * 30}
    out = AnatomyCriterion({"loss_bbox": 1, "loss_giou": 1, "loss_mask_bce": 1})(pred, batch)
    assert out["loss"].item() < 1e-4
    # a sample without masks (Chest ImaGenome) in the batch: zeros, and excluded by mask_valid
    nomask = dict(demo_all[2], masks=None)
    mixed = collate_targets([to_model_targets(s, input_size=32) for s in (demo_all[0], nomask)])
    assert mixed["mask_valid"][0].all() and not mixed["mask_valid"][1].any()
    assert mixed["masks"][1].sum() == 0
    assert collate_targets([to_model_targets(nomask, input_size=32)])["masks"] is None


# ------------------------------------------------------------------------------ Chest ImaGenome
def _obj(dicom_id: str, name: str, box: list[float], W: int, H: int) -> dict:
    """One scene-graph object in the Chest ImaGenome format (224 grid + original coordinates)."""
    x1, y1, x2, y2 = box
    s = 224 / max(W, H)
    g = [round(v * s) for v in box]
    return {"object_id": f"{dicom_id}_{name}", "x1": g[0], "y1": g[1], "x2": g[2], "y2": g[3],
            "width": g[2] - g[0], "height": g[3] - g[1], "bbox_name": name, "synsets": ["C0000000"],
            "name": name.title(), "original_x1": x1, "original_y1": y1, "original_x2": x2, "original_y2": y2,
            "original_width": x2 - x1, "original_height": y2 - y1}


def _write_case(root: Path, subject: str, study: str, dicom_id: str, W: int, H: int,
                objects: list[tuple[str, list[float]]], image: bool = True) -> None:
    from PIL import Image

    if image:
        d = root / "mimic" / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        d.mkdir(parents=True, exist_ok=True)
        arr = (np.arange(H)[:, None] * 2 + np.zeros((1, W))).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{dicom_id}.jpg", quality=95)
    graph = {"image_id": dicom_id, "viewpoint": "PA", "patient_id": int(subject), "study_id": int(study),
             "objects": [_obj(dicom_id, n, b, W, H) for n, b in objects],
             "attributes": [{"bbox_name": "right lung", "name": "Right lung", "object_id": f"{dicom_id}_right lung",
                             "attributes": [["anatomicalfinding|no|lung opacity", "nlp|yes|normal"]],
                             "phrases": ["The lungs are clear."]}],
             "relationships": []}
    sg = root / "scene_graph"
    sg.mkdir(parents=True, exist_ok=True)
    (sg / f"{dicom_id}_SceneGraph.json").write_text(json.dumps(graph))


def _write_split(path: Path, rows: list[tuple[str, str, str]], index_col: bool = True) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([""] if index_col else []) + ["subject_id", "study_id", "dicom_id", "path", "ViewPosition"])
        for i, (subject, study, did) in enumerate(rows):
            rel = f"files/p{subject[:2]}/p{subject}/s{study}/{did}.dcm"
            w.writerow(([i] if index_col else []) + [subject, study, did, rel, "PA"])


A = ("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014")
B = ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4")
C = ("11000011", "51029426", "1e2a4ede-3c0d2a5e-3a7a0aa8-1d5d6d5c-c0e4a3ba")  # scene graph, no image


@pytest.fixture
def imagenome(tmp_path) -> Path:
    W, H = 60, 80
    _write_case(tmp_path, *A, W, H, [
        ("right lung", [5, 10, 28, 70]), ("left lung", [32.5, 9.5, 56, 71]),
        ("svc", [26, 12, 31, 30]), ("cavoatrial junction", [25, 30, 31, 36]),
        ("left cardiac silhouette", [30, 40, 50, 65]),     # real silver-set box, not a registry region
        ("right clavicle", [-6, 4, 20, 12]),               # partly outside: clipped to x0 = 0
        ("abdomen", [10, 85, 50, 95]),                      # wholly below the image: rejected
        ("spine", [28, 5, 28, 75]),                         # zero width: rejected
    ])
    _write_case(tmp_path, *B, 50, 40, [("right lung", [2, 2, 24, 38]), ("trachea", [23, 0, 27, 15])])
    _write_case(tmp_path, *C, 50, 40, [("right lung", [2, 2, 24, 38])], image=False)
    _write_split(tmp_path / "train.csv", [A, B, C, ("10000099", "50000001", "no-scene-graph-for-this-id")])
    _write_split(tmp_path / "images_to_avoid.csv", [B], index_col=False)
    return tmp_path


def test_imagenome_reads_original_coordinates_and_maps_names(imagenome):
    ds = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "train.csv")
    assert ds.ids == [A[2], B[2], C[2]]
    assert ds.warnings["missing scene graph"] == 1
    s = ds[0]
    assert s["id"] == A[2] and s["image"].shape == (80, 60) and s["image"].dtype == np.float32
    assert s["masks"] is None
    assert s["boxes"][region("right lung").id - 1].tolist() == [5, 10, 28, 70]
    assert s["boxes"][region("left lung").id - 1].tolist() == [32.5, 9.5, 56, 71]
    for name in ("right lung", "left lung", "svc", "cavoatrial junction", "right clavicle"):
        assert s["present"][region(name).id - 1] and s["valid"][region(name).id - 1], name
    assert s["present"].sum() == 5
    assert not s["present"][region("cardiac silhouette").id - 1]       # not merged with its left half
    assert s["meta"]["subject_id"] == A[0] and s["meta"]["study_id"] == A[1]


def test_imagenome_unknown_names_and_bad_boxes(imagenome):
    ds = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "train.csv")
    s = ds[0]
    assert ds.warnings["unknown bbox_name: left cardiac silhouette"] == 1
    assert s["boxes"][region("right clavicle").id - 1].tolist() == [0, 4, 20, 12]  # clipped
    assert ds.warnings["box clipped to image"] == 1
    assert ds.warnings["box outside image"] == 2                                  # abdomen, spine
    for name in ("abdomen", "spine"):
        k = region(name).id - 1
        assert not s["present"][k] and not s["valid"][k] and s["boxes"][k].tolist() == [0, 0, 0, 0]
    # unlisted regions are unknown by default, absent on request
    assert s["valid"].sum() == 5
    s2 = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "train.csv",
                               unlisted_is_absent=True)[0]
    assert s2["valid"].sum() == NUM_REGIONS - 2 and s2["present"].sum() == 5  # rejected boxes stay unknown


def test_imagenome_missing_image_is_a_clear_error(imagenome):
    ds = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "train.csv")
    with pytest.raises(FileNotFoundError, match=rf"{C[2]}: image not found at .*p11/p{C[0]}/s{C[1]}/{C[2]}\.jpg"):
        ds[2]


def test_imagenome_without_split_csv_and_with_exclusions(imagenome):
    ds = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph")  # ids from the graph files
    assert ds.ids == sorted([A[2], B[2], C[2]])
    s = ds[ds.ids.index(B[2])]
    assert s["image"].shape == (40, 50)
    assert s["boxes"][region("trachea").id - 1].tolist() == [23, 0, 27, 15]
    kept = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "train.csv",
                                 exclude_csv=imagenome / "images_to_avoid.csv")
    assert kept.ids == [A[2], C[2]]
    with pytest.raises(FileNotFoundError, match="scene graph folder"):
        ChestImaGenomeDataset(imagenome / "mimic", imagenome / "nowhere")
    (imagenome / "bad.csv").write_text("image,split\nx,train\n")
    with pytest.raises(ValueError, match="no 'dicom_id' column"):
        ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "bad.csv")


def test_imagenome_sample_maps_to_model_targets(imagenome):
    s = ChestImaGenomeDataset(imagenome / "mimic", imagenome / "scene_graph", imagenome / "train.csv")[0]
    t = to_model_targets(s, input_size=256)
    k = region("right lung").id - 1
    f = 3.2 / 256  # letterbox of 80 x 60 (H x W) into 256: scale 3.2, image in columns 0..192
    assert t["boxes"][k].tolist() == pytest.approx([16.5 * f, 40 * f, 23 * f, 60 * f])
    assert torch.equal(t["valid"], torch.as_tensor(s["valid"])) and t["masks"] is None
