"""Training on cached embeddings: a tiny run on the session's demo studies (real LiteMedSAM encoder)."""

from __future__ import annotations

import json

import pytest
import torch

from anatomy_vlm.checkpoint import CheckpointFormatError, load_model, read_checkpoint
from anatomy_vlm.model.query_mask_head import mask_boxes
from anatomy_vlm.train import load_config, train

TINY = {"decoder": {"d_model": 64, "num_layers": 2, "num_heads": 4, "dim_feedforward": 128, "embed_dim": 64}}


@pytest.fixture(scope="module")
def run(demo_studies, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(None, {
        "data": {"kind": "demo", "root": str(demo_studies.root), "train_split": "train", "val_split": "val"},
        "model": TINY,
        "train": {"epochs": 2, "batch_size": 3, "val_every": 1, "cache_dir": str(tmp / "cache")},
        "output": {"checkpoint": str(tmp / "model.pt"), "run_dir": str(tmp / "run")},
    })
    summary = train(cfg, progress=False, command="test")
    return cfg, summary, tmp


def test_training_writes_a_loadable_checkpoint_with_metadata(run):
    cfg, summary, tmp = run
    assert summary["best"] is not None and (tmp / "model.pt").is_file()
    obj = read_checkpoint(tmp / "model.pt")
    meta = obj["meta"]
    assert meta["data"]["kind"] == "demo" and meta["data"]["train_images"] >= 1
    assert "projected from the real chest CT" in meta["data"]["source"]
    assert {"iou_decoder", "iou_mask", "dice"} <= set(meta["metrics"]["val"])
    assert not meta["encoder_in_file"]  # the frozen encoder comes from the installed weights
    model, meta2 = load_model(tmp / "model.pt")
    assert meta2["epoch"] == meta["epoch"]
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["loss"] > 0 for r in log)


def test_embeddings_are_cached_and_reused(run, demo_studies):
    cfg, _, tmp = run
    files = list((tmp / "cache").rglob("*.pt"))
    n_images = sum(1 for _ in demo_studies.root.joinpath("studies").glob("cxr_*"))
    assert 0 < len(files) <= n_images


@pytest.mark.slow
def test_calibrate_boxes_after_training_stores_the_calibration(demo_studies, tmp_path):
    cfg = load_config(None, {
        "data": {"kind": "demo", "root": str(demo_studies.root), "train_split": "train", "val_split": "val"},
        "model": dict(TINY, mask_head={"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
                      box_refiner={"enabled": False}),
        "train": {"epochs": 1, "batch_size": 3, "val_every": 1, "cache_dir": str(tmp_path / "cache")},
        "output": {"checkpoint": str(tmp_path / "model.pt"), "run_dir": str(tmp_path / "run"),
                   "calibrate_boxes": "train", "fit_familiarity": True},
    })
    summary = train(cfg, progress=False, command="test")
    meta = read_checkpoint(tmp_path / "model.pt")["meta"]
    cal = meta["box_calibration"]
    assert cal["split"] == "train" and cal["n_images"] == 4 and len(cal["offsets"]) == 29
    assert summary["box_calibration"]["map_after"] == cal["map_after"]
    fam = meta["familiarity"]  # the embedding reference (anatomy_vlm.familiarity), fitted after training
    assert (fam["n_train"], fam["n_heldout"]) == (4, 1) and len(fam["mean"]) == 256
    assert fam["data"]["kind"] == "demo" and fam["command"] == "test"
    assert fam["threshold"] > 0 and summary["familiarity"]["threshold"] == fam["threshold"]
    with pytest.raises(ValueError, match="calibrate_boxes needs demo data"):
        train(load_config(None, {"data": {"kind": "chest_imagenome", "root": str(tmp_path)},
                                 "output": {"calibrate_boxes": "val"}}), progress=False)



def test_resume_continues_from_the_last_epoch(run):
    cfg, _, tmp = run
    cfg = json.loads(json.dumps(cfg))
    cfg["train"]["epochs"] = 3
    train(cfg, resume=True, progress=False, command="test resume")
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_bad_configs_and_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config section"):
        load_config(None, {"trian": {}})
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, {"train": {"epoch": 3}})
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid config"):
        load_config(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(CheckpointFormatError):
        read_checkpoint(junk)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointFormatError, match="not an Anatomy-VLM checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")


def test_mask_boxes_are_pixel_edges():
    m = torch.zeros(2, 8, 10, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    assert mask_boxes(m).tolist() == [[3, 2, 7, 5], [0, 0, 0, 0]]


def test_extra_train_roots_join_the_training_set_only(demo_studies, tmp_path):
    from anatomy_vlm.data import DemoDataset
    from anatomy_vlm.demo import build_demo
    from anatomy_vlm.train import _datasets

    extra = tmp_path / "extra"
    build_demo(extra, n=4, seed=3, size=128, progress=False)
    data = {"kind": "demo", "root": str(demo_studies.root), "extra_train_roots": [str(extra)]}
    train_ds, val_ds = _datasets(data)
    own, more = DemoDataset(demo_studies.root, "train"), DemoDataset(extra, "train")
    assert len(more) >= 1 and len(train_ds) == len(own) + len(more)
    paths = {str(train_ds.path_of(i)) for i in range(len(train_ds))}
    assert {str(extra / e["image"]) for e in more.entries} <= paths
    assert val_ds.ids == DemoDataset(demo_studies.root, "val").ids  # validation stays on `root`
    assert {s["id"] for s in (train_ds[i] for i in range(len(train_ds)))} >= set(more.ids)
    with pytest.raises(ValueError, match="data.extra_train_roots: .* holds no demo build"):
        _datasets(dict(data, extra_train_roots=[str(tmp_path / "missing")]))
    with pytest.raises(ValueError, match="must be a list"):
        _datasets(dict(data, extra_train_roots=str(extra)))
