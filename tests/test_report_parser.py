"""Report sentences -> (regions, finding, negated): rules on written sentences, the demo reports,
and the hand-labelled real IU X-ray sentences (read from torchxrayvision at run time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anatomy_vlm.report_parser import (
    evaluate_demo,
    evaluate_labels,
    iu_sentences,
    parse_report,
    parse_sentence,
    split_sentences,
    triples,
)

LABELS = Path(__file__).resolve().parents[1] / "docs" / "report_parser" / "iu_labels.json"
LUNGS = ("right lung", "left lung")


def _m(sentence):
    return {(m.finding, m.negated): m.regions for m in parse_sentence(sentence)}


def test_sentences_drop_list_numbers_and_anonymisation():
    assert split_sentences("1. No acute disease. 2. Heart size normal. Normal chest x-XXXX.") == [
        "No acute disease.", "Heart size normal.", "Normal chest x-ray."]
    assert split_sentences("  ") == [] and split_sentences(". .") == []


def test_negation_scope_lists_and_contrast():
    assert _m("No pleural effusion or pneumothorax.") == {("pleural effusion", True): LUNGS,
                                                          ("pneumothorax", True): LUNGS}
    got = _m("No pneumothorax, but there is a small left effusion.")
    assert got == {("pneumothorax", True): LUNGS, ("pleural effusion", False): ("left lung",)}
    assert _m("Previous right lower lobe opacity has resolved.") == {("consolidation", True): ("right lower lung zone",)}
    assert _m("Possible early pneumonia in the lingula.") == {("consolidation", False): ("left mid lung zone",)}


def test_regions_lobes_bases_and_sides():
    assert _m("Bibasilar atelectasis.") == {("atelectasis", False): ("right lower lung zone", "left lower lung zone")}
    assert _m("A 1 cm nodule projects over the right upper lobe.") == {("nodule", False): ("right upper lung zone",)}
    # the side of a device is not the side of the finding
    assert _m("A left internal jugular line ends in the superior vena cava, without pneumothorax.") == {
        ("pneumothorax", True): LUNGS}
    # a region the finding cannot be seen in maps to its neighbour (costophrenic angle -> lower zone)
    assert _m("Right costophrenic opacity.") == {("consolidation", False): ("right lower lung zone",)}
    # the prepositional region wins over another region of the clause
    assert _m("Bibasilar hypoventilation and atelectasis in the left lower lobe.") == {
        ("atelectasis", False): ("left lower lung zone",)}


def test_statements_of_normality():
    assert _m("Heart size and pulmonary vascularity are within normal limits.") == {
        ("cardiomegaly", True): ("cardiac silhouette",)}
    assert _m("The heart is not enlarged.") == {("cardiomegaly", True): ("cardiac silhouette",)}
    assert _m("The cardiac silhouette is moderately enlarged.") == {("cardiomegaly", False): ("cardiac silhouette",)}
    assert {f for f, n in _m("No acute cardiopulmonary abnormality.") if n} == {
        "consolidation", "pleural effusion", "cardiomegaly", "pneumothorax", "nodule", "mass", "atelectasis"}
    assert "cardiomegaly" not in {f for f, _ in _m("No acute pulmonary disease.")}
    assert _m("No acute bony abnormality.") == {}
    assert {f for f, _ in _m("The lungs are clear.")} == {"consolidation", "nodule", "mass", "atelectasis"}


def test_report_and_triples():
    rep = parse_report("Small right pleural effusion. Heart size is normal.")
    assert [s for s, _ in rep] == ["Small right pleural effusion.", "Heart size is normal."]
    assert triples(rep[0][1]) == {("right lung", "pleural effusion", False)}


def test_demo_reports_parse_back_to_their_structured_sentences(demo_studies):
    res = evaluate_demo(demo_studies.root)
    assert res["triples"]["gold"] > 0
    assert res["triples"]["precision"] >= 0.85 and res["triples"]["recall"] >= 0.85, res


def test_hand_labelled_real_sentences():
    pytest.importorskip("torchxrayvision", reason="the IU X-ray reports come with torchxrayvision")
    sentences = iu_sentences()
    assert len(sentences) > 20000
    res = evaluate_labels(LABELS, sentences)
    assert res["n_sentences"] >= 150
    held = res["held_out"]["triples"]
    assert held["gold"] > 100 and held["precision"] >= 0.9 and held["recall"] >= 0.9, res
    # a labelled sentence whose text changed is an error, not a silent mismatch
    item = json.loads(LABELS.read_text())["sentences"][0]
    key = (item["report"], item["section"], item["index"])
    changed = dict(sentences)
    changed[key] = sentences[key] + " changed"
    with pytest.raises(ValueError, match="changed"):
        evaluate_labels(LABELS, changed)
