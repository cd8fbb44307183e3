"""Fine-tuning on annotators' corrections (data.kind: corrections, train.init_checkpoint)."""

from __future__ import annotations

import json
import shutil

import torch

from anatomy_vlm.anatomy import NUM_REGIONS, REGIONS
from anatomy_vlm.checkpoint import load_model, read_checkpoint, save_checkpoint
from anatomy_vlm.data import CorrectionsDataset
from anatomy_vlm.labels import merge_box_label, parse_box_correction
from anatomy_vlm.model import build_model
from anatomy_vlm.train import load_config, train

TINY = {"decoder": {"d_model": 64, "num_layers": 1, "num_heads": 4, "dim_feedforward": 128, "embed_dim": 64}}


def _correct(studies, image_id, regions, user="ann"):
    path = studies / "labels" / "boxes" / f"{image_id}.boxes.json"
    prev = json.loads(path.read_text())
    shape = (prev["height"], prev["width"])
    corr = parse_box_correction({"regions": [r for r in prev["regions"] if r["name"] in regions]}, shape)
    path.write_text(json.dumps(merge_box_label(prev, corr, image_id, user, "2026-11-23T19:00:00Z")))


def test_only_confirmed_regions_are_labels_and_fine_tuning_starts_from_the_checkpoint(demo_studies, tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(demo_studies.studies, studies)
    ids = sorted(p.name[: -len(".boxes.json")] for p in (studies / "labels" / "boxes").glob("*.boxes.json"))
    _correct(studies, ids[0], {"right lung", "carina"})
    _correct(studies, ids[1], {"left lung"})
    _correct(studies, ids[2], {"cardiac silhouette"})
    ds = CorrectionsDataset(studies)
    assert ds.ids == ids[:3]  # uncorrected studies are not corrections
    s = ds[0]
    assert s["valid"].sum() == 2 and {REGIONS[k].name for k in range(NUM_REGIONS) if s["valid"][k]} == {
        "right lung", "carina"}
    assert s["masks"] is None

    start = tmp_path / "start.pt"
    torch.manual_seed(0)
    save_checkpoint(start, build_model(TINY), {"data": "random start (test)"})
    cfg = load_config(None, {
        "data": {"kind": "corrections", "studies": str(studies), "val_ids": [ids[2]],
                 "replay_root": str(demo_studies.root)},
        "train": {"epochs": 1, "batch_size": 4, "val_every": 1, "init_checkpoint": str(start),
                  "cache_dir": str(tmp_path / "cache")},
        "output": {"checkpoint": str(tmp_path / "tuned.pt"), "run_dir": str(tmp_path / "run")},
    })
    train(cfg, progress=False, command="test finetune")
    meta = read_checkpoint(tmp_path / "tuned.pt")["meta"]
    assert meta["data"]["kind"] == "corrections"
    assert meta["config"]["model"]["decoder"]["d_model"] == 64  # the start checkpoint's architecture
    tuned, _ = load_model(tmp_path / "tuned.pt")
    before, _ = load_model(start)
    assert not torch.equal(tuned.decoder.box_head[-1].weight, before.decoder.box_head[-1].weight)
    torch.testing.assert_close(tuned.decoder.box_prior_logits, before.decoder.box_prior_logits)


def test_no_corrections_is_a_clear_error(demo_studies, tmp_path):
    import pytest

    cfg = load_config(None, {"data": {"kind": "corrections", "studies": str(demo_studies.studies)},
                             "output": {"checkpoint": str(tmp_path / "x.pt"), "run_dir": str(tmp_path / "r")}})
    with pytest.raises(ValueError, match="no corrected study"):
        train(cfg, progress=False)
