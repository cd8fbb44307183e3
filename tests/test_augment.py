"""Augmented copies for training on a frozen encoder (anatomy_vlm.augment, train.augment_copies)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anatomy_vlm.augment import augment_sample, augmented_digest, copy_seed
from anatomy_vlm.data import DemoDataset
from anatomy_vlm.train import load_config, train


@pytest.fixture(scope="module")
def sample(demo_studies):
    return DemoDataset(demo_studies.root, "train")[0]


def _mask_box(m):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_copy_is_seeded_and_its_boxes_are_its_masks_boxes(sample):
    a, b = augment_sample(sample, 7), augment_sample(sample, 7)
    np.testing.assert_array_equal(a["image"], b["image"])
    c = augment_sample(sample, 8)
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == np.asarray(sample["image"]).shape and a["masks"].shape == sample["masks"].shape
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    for k in range(a["masks"].shape[0]):
        if a["present"][k]:
            assert a["boxes"][k].tolist() == _mask_box(a["masks"][k])
        else:
            assert not a["masks"][k].any()
    # the geometry really changed: the boxes moved
    moved = np.abs(a["boxes"] - np.asarray(sample["boxes"], np.float32))[a["present"]].max()
    assert moved > 1.0
    # the original is untouched
    assert sample["id"] != a["id"]


def test_copy_needs_masks_and_keys_are_distinct(sample):
    with pytest.raises(ValueError, match="needs region masks"):
        augment_sample(dict(sample, masks=None), 0)
    assert copy_seed("abc", 0) != copy_seed("abc", 1)
    assert len({augmented_digest("abc", c) for c in range(3)} | {"abc"}) == 4


def test_training_with_augmented_copies_encodes_each_copy_once(demo_studies, tmp_path):
    cfg = load_config(None, {
        "data": {"kind": "demo", "root": str(demo_studies.root), "train_split": "train", "val_split": "val"},
        "model": {"decoder": {"d_model": 64, "num_layers": 1, "num_heads": 4, "dim_feedforward": 128,
                              "embed_dim": 64}},
        "train": {"epochs": 1, "batch_size": 4, "val_every": 1, "augment_copies": 1, "mask_every": 2,
                  "cache_dir": str(tmp_path / "cache")},
        "output": {"checkpoint": str(tmp_path / "model.pt"), "run_dir": str(tmp_path / "run")},
    })
    train(cfg, progress=False, command="test augment")
    n_train = len(DemoDataset(demo_studies.root, "train"))
    n_val = len(DemoDataset(demo_studies.root, "val"))
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 2 * n_train + n_val
    meta = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert meta["loss_bbox"] > 0 and "loss_mask_dice" in meta
    assert (tmp_path / "model.pt").is_file()
