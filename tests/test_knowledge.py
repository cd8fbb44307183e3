"""Structured findings knowledge: consistent with the registry, every phrase resolvable."""

from __future__ import annotations

import string

import pytest

from anatomy_vlm import knowledge
from anatomy_vlm.anatomy import REGION_NAMES, REGIONS, region
from anatomy_vlm.knowledge import (FINDING_NAMES, FINDINGS, NORMAL_SENTENCES, Finding, check_consistency,
                                   finding, region_phrases)

PLACEHOLDERS = {"region", "finding", "Finding", "side", "Side"}


def test_check_consistency_passes():
    assert check_consistency() is None


def test_check_consistency_catches_unknown_region(monkeypatch):
    bad = Finding("splenomegaly", ("big spleen",), ("spleen",), "An enlarged spleen.")
    monkeypatch.setattr(knowledge, "FINDINGS", FINDINGS + (bad,))
    with pytest.raises(ValueError, match="'splenomegaly' names unknown region 'spleen'"):
        check_consistency()


def test_names_unique_and_listed():
    assert len(FINDINGS) >= 5
    assert FINDING_NAMES == tuple(f.name for f in FINDINGS)
    assert len(set(FINDING_NAMES)) == len(FINDINGS)


@pytest.mark.parametrize("f", FINDINGS, ids=lambda f: f.name)
def test_every_finding_is_complete(f):
    assert f.synonyms and f.positive_templates and f.regions
    assert len(f.description) > 20
    assert all(s == s.strip().lower() and s for s in f.synonyms)
    assert len(set(f.terms)) == len(f.terms) and f.terms[0] == f.name
    assert len(set(f.regions)) == len(f.regions)
    for name in f.regions:
        assert name in REGION_NAMES and region(name).name == name


@pytest.mark.parametrize("f", FINDINGS, ids=lambda f: f.name)
def test_templates_use_known_placeholders_and_format(f):
    for template in f.positive_templates:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field}
        assert fields <= PLACEHOLDERS, (template, fields - PLACEHOLDERS)
        text = template.format(region=f.regions[0], finding=f.synonyms[0], Finding=f.synonyms[0].capitalize(),
                               side="right", Side="Right")
        assert "{" not in text and text.endswith(".")


def test_every_term_resolves_to_exactly_its_finding():
    owner: dict[str, str] = {}
    for f in FINDINGS:
        for term in f.terms:
            assert term not in owner, f"{term!r} is used by {owner[term]!r} and {f.name!r}"
            owner[term] = f.name
    for term, name in owner.items():
        assert finding(term).name == name
        assert finding(f"  {term.upper()} ").name == name


def test_lookup_by_synonym():
    assert finding("effusion").name == "pleural effusion"
    assert finding("enlarged heart").name == "cardiomegaly"
    assert finding("Tumor").name == "mass"


def test_unknown_finding_raises_key_error_listing_known():
    with pytest.raises(KeyError) as excinfo:
        finding("fracture")
    assert "unknown finding 'fracture'" in str(excinfo.value)
    assert all(name in str(excinfo.value) for name in FINDING_NAMES)


def test_region_phrases_start_with_registry_name_and_do_not_collide():
    owner: dict[str, str] = {}
    for r in REGIONS:
        phrases = region_phrases(r.name)
        assert phrases[0] == r.name
        for p in phrases:
            assert p not in owner, f"{p!r} names both {owner[p]!r} and {r.name!r}"
            owner[p] = r.name
    assert region_phrases("heart")[0] == "cardiac silhouette"
    with pytest.raises(KeyError):
        region_phrases("spleen")


def test_normal_sentences_negate_known_findings():
    assert NORMAL_SENTENCES
    for sentence, negated in NORMAL_SENTENCES:
        assert sentence.endswith(".") and sentence[0].isupper()
        assert negated and set(negated) <= set(FINDING_NAMES), (sentence, negated)
    covered = {name for _, negated in NORMAL_SENTENCES for name in negated}
    assert covered == set(FINDING_NAMES), "every finding can be negated by some normal sentence"
