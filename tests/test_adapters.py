"""Low-rank adapters in the encoder's last blocks: exact start, merge, split forward, fine-tuning with them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

from anatomy_vlm.model.adapters import (LoRALinear, adapter_parameters, adapter_settings, add_adapters, has_adapters,
                                        map_to_tokens, merge_adapters, tokens_to_map)


def test_an_adapter_starts_as_its_base_layer_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    ref = base(x).detach()
    lora = LoRALinear(base, rank=3, alpha=6.0)
    torch.testing.assert_close(lora(x), ref)  # B = 0: the pretrained layer, unchanged
    assert [p.requires_grad for p in lora.base.parameters()] == [False, False]
    lora(x).square().sum().backward()
    assert lora.lora_b.grad is not None and lora.lora_b.grad.abs().sum() > 0
    with torch.no_grad():
        lora.lora_b.normal_()
    y = lora(x).detach()
    assert (y - ref).abs().max() > 1e-3
    torch.testing.assert_close(lora.merged()(x), y, rtol=1e-5, atol=1e-5)


def test_adapter_arguments_are_checked():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="exceeds the layer's size"):
        LoRALinear(nn.Linear(4, 2), rank=3, alpha=1.0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_adapters([nn.Conv2d(1, 1, 1)])


def test_adapter_settings_get_defaults_and_clear_errors():
    assert adapter_settings(None) is None and adapter_settings({}) is None
    assert adapter_settings({"rank": 4}) == {"blocks": 2, "rank": 4, "alpha": None}
    with pytest.raises(ValueError, match=r"x\.blocks must be an integer"):
        adapter_settings({"blocks": "2"}, "x")
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        adapter_settings({"alpha": -1})


def test_tokens_and_maps_round_trip():
    x = torch.randn(2, 16, 5)
    m = tokens_to_map(x)
    assert m.shape == (2, 5, 4, 4) and torch.equal(m[1, :, 2, 3], x[1, 2 * 4 + 3])
    assert torch.equal(map_to_tokens(m), x)
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(torch.zeros(1, 15, 2))


def test_add_and_merge_walk_nested_modules():
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 3)))
    assert add_adapters([net], rank=2) == 2 and has_adapters(net)
    assert len(adapter_parameters(net)) == 4
    assert merge_adapters(net) == 2 and not has_adapters(net)
    assert isinstance(net[0], nn.Linear) and isinstance(net[1][1], nn.Linear)


@pytest.fixture(scope="module")
def encoder():
    from anatomy_vlm.model.encoder import LiteMedSAMEncoder

    return LiteMedSAMEncoder().eval()


def test_the_encoder_runs_in_two_parts_and_adapts_only_its_last_blocks(encoder):
    import copy

    enc = copy.deepcopy(encoder)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = enc(x)
        for k in (3, 14, 16):
            torch.testing.assert_close(enc.run_units(enc.run_units(x, 0, k), k), ref)
    assert enc.first_trainable_unit() is None  # frozen
    with pytest.raises(ValueError, match="adapter blocks must be an integer in 1..12"):
        enc.add_adapters(0)
    assert enc.add_adapters(2, rank=4) == 8  # qkv, proj, fc1, fc2 of the last two TinyViT blocks
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(n.startswith("trunk.layers.3.") for n in trainable)  # stage 3 holds the last two blocks
    assert enc.first_trainable_unit() == 14  # the units before it can run once and be cached
    enc.train()
    assert not any(m.training for m in enc.trunk.modules())  # the frozen encoder stays in eval mode
    with pytest.raises(ValueError, match="already has adapters"):
        enc.add_adapters(1)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref)  # adapters start at zero
        for p in adapter_parameters(enc):
            p.add_(torch.randn_like(p) * 0.02)
        adapted = enc(x)
    assert (adapted - ref).abs().max() > 1e-3
    enc.merge_adapters()
    assert not has_adapters(enc) and not any(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        torch.testing.assert_close(enc(x), adapted, rtol=1e-4, atol=1e-4)


def test_fine_tuning_with_adapters_stores_the_merged_encoder_and_later_rounds_keep_it(
        demo_studies, tmp_path, monkeypatch, two_torch_threads):
    from anatomy_vlm.checkpoint import load_model, read_checkpoint, save_checkpoint
    from anatomy_vlm.model import build_model
    from anatomy_vlm.train import load_config, train
    from tests.test_finetune import DENSE_TINY, _correct

    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "torch")  # no ONNX export of each new encoder here
    studies = tmp_path / "studies"
    shutil.copytree(demo_studies.studies, studies)
    ids = sorted(p.name[: -len(".boxes.json")] for p in (studies / "labels" / "boxes").glob("*.boxes.json"))
    for i in ids[:3]:
        _correct(studies, i, {"right lung", "left lung", "cardiac silhouette"})
    start = tmp_path / "start.pt"
    torch.manual_seed(0)
    fam = {"mean": [0.0] * 256, "precision": torch.eye(256).tolist(), "threshold": 20.0}
    save_checkpoint(start, build_model(DENSE_TINY), {"data": "random start (test)", "familiarity": fam})
    assert not read_checkpoint(start)["meta"]["encoder_in_file"]

    def run(init, out, adapters):
        cfg = load_config(None, {
            "data": {"kind": "corrections", "studies": str(studies), "val_ids": [ids[2]],
                     "replay_root": str(demo_studies.root), "replay_n": 1},
            "train": {"epochs": 1, "batch_size": 4, "val_every": 1, "init_checkpoint": str(init), "lr": 1e-2,
                      "cache_dir": str(tmp_path / "cache" / "embeddings"), "encoder_adapters": adapters,
                      "feature_affine": {"prob": 1.0} if adapters else None},
            "output": {"checkpoint": str(out), "run_dir": str(tmp_path / f"run_{out.stem}")},
        })
        train(cfg, progress=False, command="test adapters")
        return read_checkpoint(out)

    tuned = run(start, tmp_path / "tuned.pt", {"blocks": 1, "rank": 2})
    assert tuned["meta"]["encoder_in_file"]
    assert tuned["meta"]["encoder_adapters"] == {"blocks": 1, "rank": 2, "merged": True, "first_trainable_unit": 15}
    assert not any("lora_" in k for k in tuned["state_dict"])  # merged: the plain TinyViT layout
    assert "familiarity" not in tuned["meta"]  # described the parent's encoder features, which changed
    assert list((tmp_path / "cache" / "encoder_prefix").rglob("*.pt"))  # the frozen part ran once, cached
    model, _ = load_model(tmp_path / "tuned.pt")
    pre, _ = load_model(start)
    changed = {k.split(".")[2] + "." + k.split(".")[4] for k, v in model.encoder.state_dict().items()
               if not torch.equal(v, pre.encoder.state_dict()[k])}
    assert changed == {"3.1"}  # only the last block (stage 3, block 1) moved
    # a later round with the encoder frozen must keep the parent's adapted encoder in its file
    again = run(tmp_path / "tuned.pt", tmp_path / "again.pt", None)
    assert again["meta"]["encoder_in_file"]
    m2, _ = load_model(tmp_path / "again.pt")
    torch.testing.assert_close(m2.encoder.trunk.layers[3].blocks[1].mlp.fc2.weight,
                               model.encoder.trunk.layers[3].blocks[1].mlp.fc2.weight)


def test_adapters_and_trainable_blocks_exclude_each_other(tmp_path):
    from anatomy_vlm.finetune import finetune_round

    with pytest.raises(ValueError, match="exclude each other"):
        finetune_round(tmp_path, tmp_path / "x.pt", None, {"encoder_adapters": {"blocks": 1}, "encoder_blocks": 2})
    with pytest.raises(ValueError, match=r"encoder_adapters: unknown keys \['layers'\]"):
        finetune_round(tmp_path, tmp_path / "x.pt", None, {"encoder_adapters": {"layers": 1}})
    with pytest.raises(ValueError, match="encoder_adapters must be null or an object"):
        finetune_round(tmp_path, tmp_path / "x.pt", None, {"encoder_adapters": 2})
