"""Structured knowledge about findings: names, synonyms, where they occur, and report wording.

Pure data, no torch. The demo builder simulates exactly the findings in :data:`FINDINGS`; the
report parser and the zero-shot prompts read their synonyms and templates from here.

Conventions:
    * A finding's ``regions`` are registry names (see :mod:`anatomy_vlm.anatomy`) where the finding
      can be *seen*; when the demo inserts a finding, every listed region whose mask overlaps the
      inserted lesion gets the positive label.
    * ``{region}`` in a template is replaced by a region phrase, ``{finding}`` by a synonym.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .anatomy import REGION_NAMES, region

_LUNG_ZONES = tuple(f"{s} {z}" for s in ("right", "left") for z in (
    "lung", "upper lung zone", "mid lung zone", "lower lung zone", "apical zone"))


@dataclass(frozen=True)
class Finding:
    """A radiographic finding the demo simulates and the model scores.

    Attributes:
        name: Canonical name, e.g. ``"pleural effusion"``.
        synonyms: Other phrases that mean the same in reports (lower case).
        regions: Registry region names where the finding is seen.
        description: Knowledge text used for prompt enrichment.
        positive_templates: Report sentence templates asserting the finding.
        sites: Side-free region names (``"costophrenic angle"``) where the finding is seen when a
            report names no more than a side or a whole organ (an effusion collects at the lung base,
            cardiomegaly is the cardiac silhouette); empty when it can be anywhere in its regions.
    """

    name: str
    synonyms: tuple[str, ...]
    regions: tuple[str, ...]
    description: str
    positive_templates: tuple[str, ...] = field(default=())
    sites: tuple[str, ...] = field(default=())

    @property
    def terms(self) -> tuple[str, ...]:
        """The canonical name followed by its synonyms."""
        return (self.name,) + self.synonyms


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "consolidation",
        ("airspace opacity", "airspace disease", "opacity", "infiltrate", "pneumonia",
         "airspace consolidation"),
        _LUNG_ZONES,
        "Alveolar air replaced by fluid, pus or cells: a hazy to dense opacity, often with air "
        "bronchograms, that does not cause volume loss.",
        ("There is {finding} in the {region}.", "{Finding} is seen in the {region}.",
         "Patchy {finding} projects over the {region}.", "The {region} shows {finding}."),
    ),
    Finding(
        "pleural effusion",
        ("effusion", "pleural fluid", "fluid in the pleural space"),
        ("right lung", "right lower lung zone", "right costophrenic angle", "right hemidiaphragm",
         "left lung", "left lower lung zone", "left costophrenic angle", "left hemidiaphragm",
         "right mid lung zone", "left mid lung zone"),
        "Fluid in the pleural space collects at the lung base: blunting of the costophrenic angle, "
        "a meniscus, and loss of the hemidiaphragm outline.",
        ("There is a {side} {finding}.", "{Side} {finding} with blunting of the {region}.",
         "A {side}-sided {finding} is present.", "Blunting of the {region} consistent with {finding}."),
        sites=("costophrenic angle", "lower lung zone", "hemidiaphragm"),
    ),
    Finding(
        "cardiomegaly",
        ("enlarged cardiac silhouette", "enlarged heart", "cardiac enlargement", "heart is enlarged"),
        ("cardiac silhouette", "mediastinum"),
        "The cardiac silhouette is wider than half of the thoracic diameter on a PA radiograph.",
        ("There is {finding}.", "The cardiac silhouette is enlarged.", "{Finding} is present.",
         "The heart size is enlarged."),
        sites=("cardiac silhouette",),
    ),
    Finding(
        "pneumothorax",
        ("collapsed lung", "air in the pleural space", "ptx"),
        ("right lung", "right apical zone", "right upper lung zone", "right mid lung zone",
         "left lung", "left apical zone", "left upper lung zone", "left mid lung zone"),
        "Air in the pleural space separates the visceral pleural line from the chest wall, with no "
        "lung markings beyond it, most visible at the apex on an upright film.",
        ("There is a {side} {finding}.", "A {side} apical {finding} is seen.",
         "Small {side}-sided {finding}.", "{Side} {finding} is present."),
    ),
    Finding(
        "nodule",
        ("pulmonary nodule", "lung nodule", "nodular opacity", "small rounded opacity"),
        _LUNG_ZONES,
        "A rounded opacity up to 3 cm across within the lung.",
        ("There is a {finding} in the {region}.", "A {finding} projects over the {region}.",
         "{Finding} in the {region}.", "The {region} contains a {finding}."),
    ),
    Finding(
        "mass",
        ("lung mass", "pulmonary mass", "large rounded opacity", "tumour", "tumor"),
        _LUNG_ZONES + ("right hilar structures", "left hilar structures"),
        "A rounded opacity larger than 3 cm across within the lung or at the hilum.",
        ("There is a {finding} in the {region}.", "A large {finding} occupies the {region}.",
         "{Finding} in the {region}.", "The {region} contains a {finding}."),
    ),
    Finding(
        "atelectasis",
        ("volume loss", "collapse", "subsegmental atelectasis", "plate-like atelectasis",
         "linear atelectasis"),
        _LUNG_ZONES,
        "Incomplete expansion of lung: an opacity with volume loss, displaced fissures and shift of "
        "adjacent structures towards it.",
        ("There is {finding} in the {region}.", "{Finding} at the {region}.",
         "Linear {finding} in the {region}.", "The {region} shows {finding}."),
    ),
)

FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS)
_BY_NAME = {f.name: f for f in FINDINGS}

NORMAL_SENTENCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("The lungs are clear.", ("consolidation", "nodule", "mass", "atelectasis")),
    ("No focal consolidation.", ("consolidation",)),
    ("No pleural effusion or pneumothorax.", ("pleural effusion", "pneumothorax")),
    ("Heart size is normal.", ("cardiomegaly",)),
    ("The cardiomediastinal silhouette is within normal limits.", ("cardiomegaly",)),
    ("No acute cardiopulmonary process.", FINDING_NAMES),
    ("There is no evidence of pneumothorax.", ("pneumothorax",)),
    ("The costophrenic angles are sharp.", ("pleural effusion",)),
    ("No suspicious pulmonary nodule or mass.", ("nodule", "mass")),
    ("No atelectasis.", ("atelectasis",)),
)
"""Sentences of normal reports, each with the findings it negates (a sentence is only used when
none of them is present)."""

NEGATION_CUES: tuple[str, ...] = (
    "no ", "without ", "negative for ", "free of ", "no evidence of ", "resolved", "not seen",
    "clear", "normal", "sharp", "within normal limits", "unremarkable",
)


def finding(name: str) -> Finding:
    """Look a finding up by canonical name or synonym.

    Raises:
        KeyError: with the list of known findings.
    """
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    for f in FINDINGS:
        if key in f.synonyms:
            return f
    raise KeyError(f"unknown finding {name!r}; known: {', '.join(FINDING_NAMES)}")


def region_phrases(name: str) -> tuple[str, ...]:
    """Ways reports refer to a region (first item is the registry name)."""
    r = region(name)
    extra = {
        "svc": ("superior vena cava",),
        "cardiac silhouette": ("heart", "cardiac contour"),
        "right hilar structures": ("right hilum",),
        "left hilar structures": ("left hilum",),
        "right apical zone": ("right apex", "right lung apex"),
        "left apical zone": ("left apex", "left lung apex"),
        "right lower lung zone": ("right lung base", "right base"),
        "left lower lung zone": ("left lung base", "left base", "retrocardiac region"),
        "right mid lung zone": ("right midlung",),
        "left mid lung zone": ("left midlung", "lingula"),
        "aortic arch": ("aortic knob",),
        "abdomen": ("upper abdomen",),
    }.get(r.name, ())
    return (r.name,) + extra


def check_consistency() -> None:
    """Raise ``ValueError`` if a finding names a region the registry does not know."""
    for f in FINDINGS:
        for name in f.regions:
            if name not in REGION_NAMES:
                raise ValueError(f"finding {f.name!r} names unknown region {name!r}")


def region_knowledge_text(name: str) -> str:
    """The knowledge sentence of a region that enriches its embedding in the language stage: the
    registry's anatomical description, the phrases reports use for it, and the findings that can be
    seen there (with their descriptions' first clause)."""
    r = region(name)
    phrases = region_phrases(r.name)
    parts = [f"{r.display}: {r.description}"]
    if len(phrases) > 1:
        parts.append("Also called " + ", ".join(phrases[1:]) + ".")
    seen = [f.name for f in FINDINGS if r.name in f.regions]
    if seen:
        parts.append("Findings seen here: " + ", ".join(seen) + ".")
    else:
        parts.append("No finding of the knowledge base is assessed in this region.")
    return " ".join(parts)


def knowledge_texts() -> tuple[str, ...]:
    """:func:`region_knowledge_text` of every registry region, in id order."""
    return tuple(region_knowledge_text(n) for n in REGION_NAMES)


#: Zero-shot prompt templates (``{finding}`` is the user's finding text), written for scoring, not
#: copied from the demo report templates (those are what training sees). They name no region: the
#: region embeddings carry their region (knowledge enrichment), and region-filled templates ("{finding}
#: in the {region}.") scored the same on the validation split (region AUC 0.737 vs 0.736) at 29 times
#: the text-encoder work per new prompt.
ZERO_SHOT_POSITIVE: tuple[str, ...] = ("{finding}.", "Findings of {finding}.", "There is {finding}.")
ZERO_SHOT_NEGATIVE: tuple[str, ...] = ("No {finding}.", "There is no {finding}.", "Without {finding}.")
