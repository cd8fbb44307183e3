"""Short reports for demo studies: one sentence per inserted finding, naming finding and region in
varied wording (templates and synonyms from :mod:`anatomy_vlm.knowledge`), plus normal sentences
that negate only findings that are absent.

Each sentence is returned with its structured meaning (finding, regions, negated), which is the
ground truth for the report parser of a later stage.
"""

from __future__ import annotations

import numpy as np

from ..knowledge import NORMAL_SENTENCES, finding, region_phrases

# more specific regions are preferred when a sentence names one region
_SPECIFICITY = ("costophrenic angle", "apical zone", "hilar structures", "upper lung zone",
                "mid lung zone", "lower lung zone", "hemidiaphragm", "lung")


def _pick_region(regions: list[str]) -> str | None:
    for key in _SPECIFICITY:
        for r in regions:
            if r.endswith(key):
                return r
    return regions[0] if regions else None


def sentence_for(name: str, side: str | None, regions: list[str], rng: np.random.Generator) -> dict:
    """One report sentence for a finding; returns ``{"text", "finding", "regions", "negated"}``."""
    f = finding(name)
    term = f.terms[rng.integers(len(f.terms))]
    template = f.positive_templates[rng.integers(len(f.positive_templates))]
    reg = _pick_region(regions)
    phrase = region_phrases(reg)[rng.integers(len(region_phrases(reg)))] if reg else "lung"
    side_word = side or ""
    text = template.format(finding=term, Finding=term[0].upper() + term[1:], region=phrase,
                           side=side_word, Side=side_word.capitalize())
    text = " ".join(text.split())
    text = text[0].upper() + text[1:]
    return {"text": text, "finding": name, "regions": [reg] if reg else [], "negated": False}


def make_report(lesions: list[dict], rng: np.random.Generator) -> list[dict]:
    """Sentences for a study whose lesions are ``[{"name", "side", "regions"}]``."""
    sentences = [sentence_for(le["name"], le["side"], le["regions"], rng) for le in lesions]
    present = {le["name"] for le in lesions}
    normals = [(t, neg) for t, neg in NORMAL_SENTENCES if not present.intersection(neg)]
    if len(present) and any(t.startswith("No acute") for t, _ in normals):
        normals = [(t, n) for t, n in normals if not t.startswith("No acute")]
    k = min(len(normals), int(rng.integers(1, 4)))
    for i in rng.permutation(len(normals))[:k]:
        t, neg = normals[i]
        for name in neg:
            sentences.append({"text": t, "finding": name, "regions": [], "negated": True})
    # one entry per (text, finding); the text appears once in the report
    return sentences


def report_text(sentences: list[dict]) -> str:
    seen = []
    for s in sentences:
        if s["text"] not in seen:
            seen.append(s["text"])
    return " ".join(seen)

