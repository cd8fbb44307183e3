"""Per-image uncertainty (anatomy_vlm.uncertainty) with the shipped demo checkpoint, and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anatomy_vlm.anatomy import NUM_REGIONS
from anatomy_vlm.predict import Predictor
from anatomy_vlm.uncertainty import UncertaintyCache, image_uncertainty, model_version

CHECKPOINT = Path(__file__).resolve().parents[1] / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.from_checkpoint(CHECKPOINT, cache_dir=tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def images(demo_studies, tmp_path_factory):
    d = tmp_path_factory.mktemp("unc")
    chest = sorted(demo_studies.studies.glob("cxr_*.png"))[0]
    noise = d / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)).save(noise)
    return {"chest": chest, "noise": noise}


def test_uncertainty_parts_and_a_non_chest_image_scores_higher(predictor, images):
    u = image_uncertainty(predictor, images["chest"])
    assert len(u["per_region"]) == NUM_REGIONS and u["score"] >= 0
    assert u["score"] == pytest.approx(sum(u["parts"].values()), rel=1e-4)
    n = image_uncertainty(predictor, images["noise"])
    assert n["score"] > u["score"], (n, u)


def test_scores_are_cached_per_model_version_and_image(predictor, images, tmp_path):
    cache = UncertaintyCache(tmp_path)
    v = model_version(predictor)
    assert cache.known(v, images["chest"]) is None
    s = cache.score(predictor, images["chest"])
    assert cache.computed == 1 and cache.score(predictor, images["chest"]) == s and cache.computed == 1
    assert json.loads((tmp_path / f"{v}.json").read_text())  # persisted
    fresh = UncertaintyCache(tmp_path)
    assert fresh.known(v, images["chest"]) == s and fresh.computed == 0
    assert fresh.known("another-model", images["chest"]) is None
