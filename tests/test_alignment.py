"""The language stage: report pairs, calibrated InfoNCE, grounding loss, region pooling, knowledge enrichment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anatomy_vlm.alignment import NORMAL, report_pairs
from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES
from anatomy_vlm.knowledge import knowledge_texts, region_knowledge_text
from anatomy_vlm.losses import calibrated_infonce, grounding_loss
from anatomy_vlm.model import build_model, resolve_config
from anatomy_vlm.model.aligner import RegionAligner, pool_regions

IDX = {n: i for i, n in enumerate(REGION_NAMES)}


def test_report_pairs_positive_sentence_pairs_region_and_parent():
    p = report_pairs("There is consolidation in the right lower lung zone. No pneumothorax.")
    assert p.findings == ("consolidation",)
    pos = {(k, c) for k, _, c in p.regions if c != NORMAL}
    assert (IDX["right lower lung zone"], "consolidation") in pos
    assert (IDX["right lung"], "consolidation") in pos  # the zone's parent
    assert p.ground and set(p.ground[0][1]) == {IDX["right lower lung zone"], IDX["right lung"]}


def test_report_pairs_normals_avoid_positive_regions_and_are_capped():
    p = report_pairs("There is consolidation in the right lower lung zone. The lungs are clear elsewhere. "
                     "No pneumothorax.", normal_per_image=5)
    normals = [(k, t) for k, t, c in p.regions if c == NORMAL]
    assert 0 < len(normals) <= 5
    assert all(k not in (IDX["right lower lung zone"], IDX["right lung"]) for k, _ in normals)
    # pneumothorax can only be seen in lung regions
    assert all("lung" in REGION_NAMES[k] or "apical" in REGION_NAMES[k] for k, _ in normals)


def test_report_pairs_empty_report():
    p = report_pairs("")
    assert p.findings == () and p.regions == [] and p.ground == []


def test_calibrated_infonce_ignores_same_group_pairs():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(4, 8), dim=-1)
    y = x.clone()
    y[1] = x[0]  # pair 1's text is identical to pair 0's: a false negative unless calibrated
    groups_same = torch.tensor([0, 0, 1, 2])
    groups_diff = torch.tensor([0, 1, 2, 3])
    l_cal = calibrated_infonce(x, y, groups_same, 10.0)
    l_raw = calibrated_infonce(x, y, groups_diff, 10.0)
    assert l_cal < l_raw
    # one group only: nothing to contrast -> zero
    assert float(calibrated_infonce(x, y, torch.zeros(4, dtype=torch.long), 10.0)) == pytest.approx(0.0, abs=1e-6)


def test_calibrated_infonce_matches_clip_when_all_groups_differ():
    torch.manual_seed(1)
    x = F.normalize(torch.randn(5, 8), dim=-1)
    y = F.normalize(torch.randn(5, 8), dim=-1)
    logits = 7.0 * x @ y.t()
    t = torch.arange(5)
    clip = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t))
    assert float(calibrated_infonce(x, y, torch.arange(5), 7.0)) == pytest.approx(float(clip), rel=1e-5)


def test_grounding_loss_prefers_the_named_region():
    regions = F.normalize(torch.eye(NUM_REGIONS, 32)[None].repeat(2, 1, 1), dim=-1)
    s = regions[0, 3:4].clone()
    pos_right = torch.zeros(1, NUM_REGIONS, dtype=torch.bool)
    pos_right[0, 3] = True
    pos_wrong = torch.zeros(1, NUM_REGIONS, dtype=torch.bool)
    pos_wrong[0, 5] = True
    idx = torch.tensor([1])
    assert grounding_loss(regions, s, idx, pos_right, 10.0) < grounding_loss(regions, s, idx, pos_wrong, 10.0)


def test_pool_regions_mean_and_max_inside_the_mask():
    emb = torch.zeros(1, 2, 64, 64)
    emb[0, 0, 10:20, 10:20] = 1.0
    emb[0, 1, 12, 12] = 5.0
    logits = torch.full((1, 2, 256, 256), -20.0)
    logits[0, 0, 40:80, 40:80] = 20.0   # covers embedding cells 10..19
    logits[0, 1, 200:240, 200:240] = 20.0
    p = pool_regions(emb, logits)
    assert p.shape == (1, 2, 4)
    assert p[0, 0, 0] == pytest.approx(1.0, abs=1e-3)   # mean of channel 0 inside region 0
    assert p[0, 0, 3] == pytest.approx(5.0, abs=1e-3)   # max of channel 1 inside region 0
    assert p[0, 1, 0] == pytest.approx(0.0, abs=1e-3) and p[0, 1, 3] == pytest.approx(0.0, abs=1e-3)


def test_knowledge_texts_come_from_registry_and_knowledge():
    t = knowledge_texts()
    assert len(t) == NUM_REGIONS
    assert "upper third of the right lung" in region_knowledge_text("right upper lung zone")
    assert "consolidation" in region_knowledge_text("right upper lung zone")
    assert "No finding" in region_knowledge_text("spine")


def test_knowledge_enrichment_changes_the_region_embedding():
    """Swapping two regions' knowledge rows swaps what the MLP is told: their embeddings change."""
    torch.manual_seed(0)
    know = F.normalize(torch.randn(NUM_REGIONS, 384), dim=-1)
    al = RegionAligner(in_channels=8, token_dim=16, knowledge=know, dropout=0.0).eval()
    pooled = torch.randn(1, NUM_REGIONS, 16)
    tokens = torch.randn(1, NUM_REGIONS, 16)
    # same visual input for regions 0 and 1
    pooled[0, 1], tokens[0, 1] = pooled[0, 0], tokens[0, 0]
    with torch.no_grad():
        a = al(pooled, tokens, None).regions
        assert not torch.allclose(a[0, 0], a[0, 1])  # only their knowledge differs
        swapped = know.clone()
        swapped[[0, 1]] = know[[1, 0]]
        al.set_knowledge(swapped)
        b = al(pooled, tokens, None).regions
    torch.testing.assert_close(b[0, 0], a[0, 1])
    torch.testing.assert_close(b[0, 1], a[0, 0])
    assert torch.allclose(a.norm(dim=-1), torch.ones(1, NUM_REGIONS))
    with pytest.raises(ValueError, match="knowledge must be"):
        al.set_knowledge(torch.zeros(3, 384))


def test_aligner_config_needs_masks_and_builds():
    with pytest.raises(ValueError, match="aligner.enabled needs mask_head.enabled"):
        resolve_config({"aligner": {"enabled": True}, "mask_head": {"enabled": False}})
    m = build_model({"aligner": {"enabled": True, "joint_dim": 32, "hidden": 64},
                     "mask_head": {"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
                     "decoder": {"d_model": 32, "num_heads": 2, "dim_feedforward": 64, "embed_dim": 16},
                     "box_refiner": {"enabled": False}}).eval()
    with torch.no_grad():
        out = m(images=torch.rand(2, 3, 256, 256), embeddings=torch.randn(2, 256, 64, 64), with_masks=True)
    assert out.aligned_regions.shape == (2, NUM_REGIONS, 32) and out.aligned_image.shape == (2, 32)
    assert math.isclose(float(out.aligned_image[0].norm()), 1.0, rel_tol=1e-5)


def test_fresh_aligner_starts_over_from_its_seed_and_keeps_detection():
    from anatomy_vlm.train import _attach_aligner

    cfg = {"aligner": {"enabled": True, "joint_dim": 32, "hidden": 64},
           "mask_head": {"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
           "decoder": {"d_model": 32, "num_heads": 2, "dim_feedforward": 64, "embed_dim": 16},
           "box_refiner": {"enabled": False}}
    m = build_model(cfg)
    old = {k: v.clone() for k, v in m.aligner.state_dict().items()}
    dec = {k: v.clone() for k, v in m.decoder.state_dict().items()}
    kept = m.aligner
    _attach_aligner(m)  # an aligner of the configured size is kept as it is
    assert m.aligner is kept
    _attach_aligner(m, fresh=True, seed=3)
    first = {k: v.clone() for k, v in m.aligner.state_dict().items()}
    assert m.aligner is not kept and any(not torch.equal(old[k], first[k]) for k in old)
    torch.rand(100)  # the global random state moves on; the new aligner does not depend on it
    _attach_aligner(m, fresh=True, seed=3)
    assert all(torch.equal(first[k], v) for k, v in m.aligner.state_dict().items())
    _attach_aligner(m, fresh=True, seed=4)
    assert any(not torch.equal(first[k], v) for k, v in m.aligner.state_dict().items())
    assert all(torch.equal(dec[k], v) for k, v in m.decoder.state_dict().items())  # detection untouched
    assert m.config["aligner"]["enabled"]


# ----- the lesion branch ------------------------------------------------------------------------------

def test_lesion_branch_shape_and_per_image_normalisation():
    """Features on the S/4 grid; a global change of exposure (intensities scaled) changes nothing."""
    from anatomy_vlm.model.lesion import LesionBranch

    torch.manual_seed(0)
    b = LesionBranch(channels=8, width=4).eval()
    x = torch.rand(2, 3, 64, 64) * 0.8 + 0.1
    x[:, :, :, :8] = 0.0  # letterbox padding
    with torch.no_grad():
        y = b(x)
        assert y.shape == (2, 8, 16, 16)
        torch.testing.assert_close(b(x * 0.5), y, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(b(x.flip(-1)), y, atol=1e-3)  # it does see the image
    n = LesionBranch.normalise(x)
    assert float(n[:, :, :, :8].abs().max()) == 0.0
    inside = n[:, :, :, 8:]
    assert float(inside.mean()) == pytest.approx(0.0, abs=1e-4) and float(inside.std()) == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(ValueError, match="expects"):
        b(torch.rand(1, 64, 64))


def test_region_finding_labels_from_the_report_only():
    from anatomy_vlm.alignment import region_finding_labels
    from anatomy_vlm.knowledge import FINDING_NAMES

    lab = region_finding_labels(report_pairs("Consolidation in the right lower lung zone. No pneumothorax."))
    assert lab.shape == (NUM_REGIONS, len(FINDING_NAMES))
    c = FINDING_NAMES.index("consolidation")
    assert lab[IDX["right lower lung zone"], c] == 1 and lab[IDX["right lung"], c] == 1  # named, and its parent
    assert lab[IDX["right upper lung zone"], c] == -1  # same side, not named: unknown
    assert lab[IDX["left lower lung zone"], c] == 0  # other side: negative
    assert lab[IDX["spine"], c] == -1  # consolidation is not seen there
    p = FINDING_NAMES.index("pneumothorax")
    assert lab[IDX["left apical zone"], p] == 0 and lab[IDX["right apical zone"], p] == 0  # not asserted
    assert (lab[:, FINDING_NAMES.index("nodule")] <= 0).all()


def test_aligner_with_lesion_branch_needs_lesion_features_and_images():
    m = build_model({"aligner": {"enabled": True, "joint_dim": 32, "hidden": 64, "lesion_channels": 8},
                     "mask_head": {"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
                     "decoder": {"d_model": 32, "num_heads": 2, "dim_feedforward": 64, "embed_dim": 16},
                     "box_refiner": {"enabled": False}}).eval()
    assert m.aligner.lesion is not None and m.config["aligner"]["lesion_channels"] == 8
    x, e = torch.rand(2, 3, 256, 256), torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        out = m(images=x, embeddings=e, with_masks=True)
        assert out.aligned_regions.shape == (2, NUM_REGIONS, 32)
        # the lesion branch looks at the image: another image, same embedding -> other region embeddings
        other = m(images=torch.rand(2, 3, 256, 256), embeddings=e, with_masks=True)
        assert not torch.allclose(other.aligned_regions, out.aligned_regions, atol=1e-4)
        with pytest.raises(ValueError, match="needs the model-input images"):
            m.align(e, out)
        with pytest.raises(ValueError, match="lesion features are required"):
            m.aligner(torch.randn(2, NUM_REGIONS, 512), torch.randn(2, NUM_REGIONS, 16), None)
    with pytest.raises(ValueError, match="lesion_channels must be an integer >= 0"):
        resolve_config({"aligner": {"enabled": True, "lesion_channels": -1}})


def _blob_study(rng, nodule: bool):
    """A 64x64 image with 29 region masks (region 'right upper lung zone' a left-half square), and a
    bright small blob inside it when ``nodule``; its report says so."""
    x = torch.full((1, 64, 64), 0.4) + torch.from_numpy(rng.normal(0, 0.03, (1, 64, 64))).float()
    w = torch.zeros(NUM_REGIONS, 16, 16)
    w[IDX["right upper lung zone"], 2:8, 2:8] = 1.0
    w[IDX["left upper lung zone"], 2:8, 8:14] = 1.0
    for k in range(NUM_REGIONS):
        if w[k].sum() == 0:
            w[k, 10:14, 2:14] = 1.0
    if nodule:
        cy, cx = (int(v) for v in rng.integers(10, 24, 2))
        x[0, cy:cy + 6, cx:cx + 6] = 0.95
    report = "Nodule in the right upper lung zone." if nodule else "No nodule. The lungs are clear."
    return x.clamp(0.01, 1), w, report


def test_lesion_stage_learns_what_the_reports_say():
    """Trained on report-derived labels only, the branch's probe finds the blob on new studies."""
    import numpy as np

    from anatomy_vlm.alignment import lesion_probe_auc, train_lesion_branch

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    al = RegionAligner(in_channels=8, token_dim=16, dropout=0.0, lesion_channels=8)
    studies = [_blob_study(rng, i % 2 == 0) for i in range(24)]
    feats = {"images": torch.stack([s[0] for s in studies]), "weights": torch.stack([s[1] for s in studies])}
    pairs = [report_pairs(s[2]) for s in studies]
    rec = train_lesion_branch(al, feats, pairs, {"lesion_epochs": 30, "lesion_batch_size": 8, "lesion_lr": 3e-3,
                                                 "weight_decay": 0.0, "image_jitter": None},
                              torch.Generator().manual_seed(0), progress=False)
    assert rec["stage"] == "lesion" and rec["epoch"] == 30
    test = [_blob_study(rng, i % 2 == 0) for i in range(16)]
    tfeats = {"images": torch.stack([s[0] for s in test]), "weights": torch.stack([s[1] for s in test])}
    records = [{"region_findings": {"right upper lung zone": ["nodule"]} if i % 2 == 0 else {}} for i in range(16)]
    auc = lesion_probe_auc(al, tfeats, records)["region_auc"]["nodule"]
    assert auc is not None and auc >= 0.9


def test_train_alignment_runs_the_lesion_stage_first_then_freezes_the_branch(tmp_path):
    """Stages lesion -> global -> all; the branch is frozen after its stage, and the zero-shot check
    computes its features from the kept images (the same function the serving path uses)."""
    import numpy as np

    from anatomy_vlm.alignment import ALIGN_DEFAULTS, aligned_features, train_alignment
    from anatomy_vlm.text import TextEncoder

    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    m = build_model({"aligner": {"enabled": True, "joint_dim": 32, "hidden": 64, "lesion_channels": 8},
                     "mask_head": {"kind": "dense", "widths": [16, 16, 16], "fine": [8, 8]},
                     "decoder": {"d_model": 32, "num_heads": 2, "dim_feedforward": 64, "embed_dim": 16},
                     "box_refiner": {"enabled": False}})
    studies = [_blob_study(rng, i % 2 == 0) for i in range(8)]
    feats = {"pooled": torch.randn(8, NUM_REGIONS, 512).half(), "tokens": torch.randn(8, NUM_REGIONS, 16).half(),
             "global": torch.randn(8, 16).half(), "images": torch.stack([s[0] for s in studies]).half(),
             "weights": torch.stack([s[1] for s in studies]).half()}
    pairs = [report_pairs(s[2]) for s in studies]
    cfg = dict(ALIGN_DEFAULTS, global_epochs=1, all_epochs=1, lesion_epochs=2, batch_size=4)
    before = {k: v.clone() for k, v in m.aligner.lesion.state_dict().items()}
    records = [{"region_findings": {"right upper lung zone": ["nodule"]} if i % 2 == 0 else {},
                "image_findings": ["nodule"] if i % 2 == 0 else [], "report_sentences": []} for i in range(8)]
    text = TextEncoder(cache_dir=tmp_path / "text")
    summary = train_alignment(m, feats, pairs, text, cfg, val=(feats, records), progress=False)
    assert list(summary["stages"]) == ["lesion", "global", "all"]
    assert "lesion_probe_val" in summary and "canonical" in summary["val"]
    assert any(not torch.equal(before[k], v) for k, v in m.aligner.lesion.state_dict().items())
    assert not any(p.requires_grad for p in m.aligner.parameters())
    with torch.no_grad():
        a = aligned_features(m.aligner.eval(), feats).regions
        b = aligned_features(m.aligner, feats, images=feats["images"].float().flip(-1)).regions
    assert a.shape == (8, NUM_REGIONS, 32) and not torch.allclose(a, b, atol=1e-4)


def test_findings_with_typical_sites_pair_the_sites_not_the_whole_organ():
    """'Right pleural effusion' names only the right lung: the pairs go to where an effusion is seen on
    that side; a named site stays the only one; cardiomegaly is the cardiac silhouette, not the
    mediastinum; findings without sites keep region and parent."""
    from anatomy_vlm.alignment import positive_regions, region_finding_labels
    from anatomy_vlm.knowledge import FINDING_NAMES

    p = report_pairs("There is a right pleural effusion.")
    assert {REGION_NAMES[k] for k, _, c in p.regions if c != NORMAL} == {
        "right costophrenic angle", "right lower lung zone", "right hemidiaphragm"}
    assert positive_regions("pleural effusion", ["left costophrenic angle"]) == ["left costophrenic angle"]
    assert positive_regions("cardiomegaly", ["cardiac silhouette", "mediastinum"]) == ["cardiac silhouette"]
    assert positive_regions("nodule", ["left upper lung zone"]) == ["left upper lung zone", "left lung"]
    lab = region_finding_labels(p)
    e = FINDING_NAMES.index("pleural effusion")
    assert lab[IDX["right costophrenic angle"], e] == 1 and lab[IDX["right lung"], e] == -1
    assert lab[IDX["left costophrenic angle"], e] == 0
