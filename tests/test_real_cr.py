"""The shipped demo checkpoint on the REAL chest radiograph RG1_UNCR.dcm (pydicom-data): are the boxes
anatomically plausible? Sides, vertical order and nesting, in original-image pixels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt"


def _real_cr() -> Path:
    spec = importlib.util.find_spec("data_store")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "RG1_UNCR.dcm"


@pytest.fixture(scope="module")
def boxes(tmp_path_factory):
    from anatomy_vlm.predict import Predictor

    pred = Predictor.from_checkpoint(CHECKPOINT, cache_dir=tmp_path_factory.mktemp("emb"))
    p = pred.predict(_real_cr(), with_masks=True)
    assert p.image_shape == (1955, 1841)
    return {n: np.asarray(b, float) for n, b in zip(p.names, p.boxes)}


def _cx(b):
    return (b[0] + b[2]) / 2


def _cy(b):
    return (b[1] + b[3]) / 2


def test_boxes_are_inside_the_image_and_not_degenerate(boxes):
    for name, b in boxes.items():
        assert 0 <= b[0] < b[2] <= 1841 and 0 <= b[1] < b[3] <= 1955, name


def test_patient_right_on_image_left(boxes):
    for part in ("lung", "clavicle", "hilar structures", "costophrenic angle", "hemidiaphragm",
                 "upper lung zone", "lower lung zone"):
        assert _cx(boxes[f"right {part}"]) < _cx(boxes[f"left {part}"]), part
    assert _cx(boxes["cardiac silhouette"]) > _cx(boxes["trachea"]) - 20


def test_vertical_order(boxes):
    for side in ("right", "left"):
        up, mid, low = (_cy(boxes[f"{side} {z} lung zone"]) for z in ("upper", "mid", "lower"))
        assert up < mid < low, side
        assert _cy(boxes[f"{side} apical zone"]) < mid < _cy(boxes[f"{side} costophrenic angle"])
    assert boxes["trachea"][1] < _cy(boxes["carina"]) < _cy(boxes["cardiac silhouette"])
    assert _cy(boxes["abdomen"]) > _cy(boxes["cardiac silhouette"])


def test_nesting(boxes):
    """Zones lie (mostly) inside their lung's box."""
    def inside(inner, outer, tol=0.1):
        w, h = outer[2] - outer[0], outer[3] - outer[1]
        return (inner[0] >= outer[0] - tol * w and inner[2] <= outer[2] + tol * w
                and inner[1] >= outer[1] - tol * h and inner[3] <= outer[3] + tol * h)

    for side in ("right", "left"):
        for z in ("upper lung zone", "mid lung zone", "lower lung zone", "apical zone"):
            assert inside(boxes[f"{side} {z}"], boxes[f"{side} lung"]), (side, z)
