"""Zero-shot findings and text grounding with the shipped (aligned) demo checkpoint on a demo study:
the answers' structure and invariants, the text cache, and the checks on user text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES
from anatomy_vlm.findings import MAX_PROMPTS, ground_sentence, grounding_heatmap, parse_prompts, region_findings
from anatomy_vlm.knowledge import FINDING_NAMES, finding
from anatomy_vlm.zeroshot import ZeroShotScorer

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt"


@pytest.fixture(scope="module")
def served(demo_studies, tmp_path_factory, two_torch_threads):
    from anatomy_vlm.predict import Predictor

    p = Predictor.from_checkpoint(CHECKPOINT, cache_dir=tmp_path_factory.mktemp("cache") / "embeddings")
    image = demo_studies.studies / f"{demo_studies.ids('.png')[0]}.png"
    return p, p.predict(image, with_masks=True, align=True)


def test_shipped_checkpoint_carries_the_language_stage(served):
    p, pred = served
    assert p.has_language
    assert pred.aligned.regions.shape == (1, NUM_REGIONS, p.model.aligner.joint_dim)
    assert np.allclose(pred.aligned.regions[0].norm(dim=-1).numpy(), 1.0, atol=1e-4)


def test_region_findings_lists_every_region_and_the_image_best_first(served):
    p, pred = served
    out = region_findings(pred, p.language(), top_k=3)
    assert out["prompts"] == list(FINDING_NAMES)
    assert [r["name"] for r in out["regions"]] == list(REGION_NAMES)
    for r in out["regions"]:
        scores = [f["score"] for f in r["findings"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert len(r["box"]) == 4 and 0 <= r["score"] <= 1
    img = out["findings"]
    assert [f["finding"] for f in img] and {f["finding"] for f in img} == set(FINDING_NAMES)
    assert [f["score"] for f in img] == sorted((f["score"] for f in img), reverse=True)
    # the image-level score is the largest region score where the finding can be seen, and names that region
    full = region_findings(pred, p.language(), top_k=0)
    per_region = {r["name"]: {f["finding"]: f["score"] for f in r["findings"]} for r in full["regions"]}
    for f in full["findings"]:
        sites = set(finding(f["finding"]).regions)
        assert f["score"] == pytest.approx(max(per_region[n][f["finding"]] for n in sites), abs=1e-4)
        assert f["region"] in sites and per_region[f["region"]][f["finding"]] == pytest.approx(f["score"], abs=1e-4)


def test_sites_of_a_finding_text():
    sites = ZeroShotScorer.sites
    effusion = {REGION_NAMES.index(n) for n in finding("pleural effusion").regions}
    assert set(np.flatnonzero(sites("pleural effusion"))) == effusion
    assert set(np.flatnonzero(sites("pleural fluid"))) == effusion  # a synonym
    assert set(np.flatnonzero(sites("Small left pleural effusion."))) == effusion  # read by the report parser
    assert set(np.flatnonzero(sites("Enlarged heart shadow"))) == {REGION_NAMES.index("cardiac silhouette"),
                                                                  REGION_NAMES.index("mediastinum")}
    for text in ("hydrothorax", "no pneumothorax", "effusion and cardiomegaly", "rib fracture"):
        assert sites(text).all(), text  # unknown, ruled out, or two findings: every region


def test_image_level_ignores_regions_where_the_finding_cannot_be_seen(served):
    p, pred = served
    scorer = p.language()
    regions = pred.aligned.regions[0].clone()
    texts = ["pleural effusion", "hydrothorax"]
    before, _ = scorer.image_probs(scorer.region_probs(regions, texts), texts)
    pos, _ = scorer.class_vectors(texts[:1])
    outside = REGION_NAMES.index("trachea")
    assert outside not in {REGION_NAMES.index(n) for n in finding("pleural effusion").regions}
    moved = regions.clone()
    moved[outside] = pos[0]  # the trachea now looks like an effusion
    probs = scorer.region_probs(moved, texts)
    assert probs[0, outside] > 0.9
    after, arg = scorer.image_probs(probs, texts)
    assert after[0] == pytest.approx(before[0], abs=1e-6) and int(arg[0]) != outside  # not an effusion site
    assert after[1] == pytest.approx(probs[1].max()) and after[1] >= probs[1, outside]  # no known finding: all 29
    site = REGION_NAMES.index("right costophrenic angle")
    moved = regions.clone()
    moved[site] = pos[0]
    probs = scorer.region_probs(moved, texts)
    raised, _ = scorer.image_probs(probs, texts)
    assert raised[0] >= probs[0, site] > 0.9
    with pytest.raises(ValueError, match="finding texts"):
        scorer.image_probs(probs, texts[:1])


def test_a_new_prompt_costs_one_text_encoder_call_then_nothing(served):
    p, pred = served
    scorer = p.language()
    prompts = ["hazy veil over the left base", "enlarged heart shadow"]
    calls, texts = scorer.text.encoder_calls, scorer.text.texts_encoded
    first = region_findings(pred, scorer, prompts, top_k=0)
    assert scorer.text.encoder_calls == calls + 1  # six template sentences per prompt, one batch
    assert scorer.text.texts_encoded == texts + 6 * len(prompts)
    again = region_findings(pred, scorer, prompts, top_k=0)
    assert scorer.text.encoder_calls == calls + 1 and again == first
    assert first["prompts"] == prompts


def test_grounding_probabilities_top_regions_and_heatmap(served):
    p, pred = served
    out, probs = ground_sentence(pred, p.language(), "  Opacity at the   right lung base. ", top_k=4)
    assert out["sentence"] == "Opacity at the right lung base."
    assert probs.shape == (NUM_REGIONS,) and probs.sum() == pytest.approx(1.0, abs=1e-4)
    ranked = [r["probability"] for r in out["regions"]]
    assert len(ranked) == 4 and ranked == sorted(ranked, reverse=True)
    assert ranked[0] == pytest.approx(float(probs.max()), abs=1e-4)
    assert set(out["probabilities"]) == set(REGION_NAMES)
    heat = grounding_heatmap(pred, probs)
    assert heat.shape == pred.image_shape and heat.dtype == np.uint8
    top = REGION_NAMES.index(out["regions"][0]["name"])
    assert (heat[pred.masks[top]] == 255).all()  # the most likely region is at full scale
    assert (heat[~pred.masks.any(0)] == 0).all()  # nothing outside every region


def test_grounding_a_subset_prediction_ranks_only_its_regions(served):
    p, pred = served
    sub = pred.subset(["left lung", "trachea"])
    out, _ = ground_sentence(sub, p.language(), "The trachea is midline.", top_k=5)
    assert {r["name"] for r in out["regions"]} == {"left lung", "trachea"}


@pytest.mark.parametrize("value,message", [
    (["ok", ""], "must not be empty"),
    (["x" * 1001], "at most 1000 characters"),
    ([42], "must be text"),
    (["1234"], "must contain words"),
    ({"a": 1}, "must be a list"),
    ([f"finding {i}" for i in range(MAX_PROMPTS + 1)], f"at most {MAX_PROMPTS} prompts"),
])
def test_bad_prompts_are_refused_with_a_message(value, message):
    with pytest.raises(ValueError, match=message):
        parse_prompts(value)


def test_prompts_from_text_lines_and_semicolons_deduplicated():
    assert parse_prompts("effusion\n  small  nodule ;effusion") == ["effusion", "small nodule"]
    assert parse_prompts(None) == parse_prompts("  ") == parse_prompts([]) == []


def test_without_aligned_embeddings_is_a_clear_error(served):
    p, pred = served
    from dataclasses import replace

    with pytest.raises(ValueError, match="align=True"):
        region_findings(replace(pred, aligned=None), p.language())
