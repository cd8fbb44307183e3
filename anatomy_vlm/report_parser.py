"""Report sentences to regions: which finding a sentence speaks of, where, and whether it is negated.

This is how a report corpus becomes (region, finding, negated) training pairs for the language stage.
Rule-based on purpose (no model to download, every decision readable), driven by the registry and
:mod:`anatomy_vlm.knowledge`:

1. **Sentences**: the report text is split at sentence ends; list numbers ("1.", "2.") and the
   anonymisation marks of public corpora ("XXXX") are dropped.
2. **Clauses**: a sentence is cut at contrast words ("but", "however", "although", ";") so that
   "No pneumothorax, but a small right effusion" negates only the pneumothorax.
3. **Findings**: the finding names and synonyms of ``knowledge.FINDINGS`` plus the plural and
   adjective forms reports use (:data:`EXTRA_TERMS`), matched as whole words, longest first; phrases
   that describe a normal state of a structure (:data:`NORMAL_PATTERNS`, e.g. "heart size is normal",
   "the lungs are clear", "no acute cardiopulmonary abnormality") negate the findings they rule out.
4. **Negation**: a cue ("no", "without", "negative for", "free of", "resolved", ...) negates every
   finding after it in the clause; a post-cue ("... is not seen", "... has resolved") negates the
   findings before it. Hedged findings ("possible", "may represent") count as positive: a
   radiologist names them because they may be there.
5. **Regions**: region phrases of the registry (``knowledge.region_phrases``), lobes mapped to
   zones (right upper lobe -> right upper lung zone, lingula -> left mid lung zone, ...), bases and
   apices with their side, "bibasilar"/"bilateral". A finding keeps the regions of its clause where
   ``knowledge`` says it can be seen; with none, its side ("right effusion" -> right lung); with no side,
   its default (:data:`DEFAULT_REGIONS`: both lungs, or the cardiac silhouette for cardiomegaly).

The parser's quality on real sentences (IU X-ray reports from ``torchxrayvision``, labelled by hand)
is measured by ``anatomy-vlm parse-reports --iu --labels docs/report_parser/iu_labels.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .knowledge import FINDING_NAMES, FINDINGS, region_phrases
from .anatomy import REGION_NAMES

__all__ = ["Mention", "split_sentences", "parse_sentence", "parse_report", "triples", "DEFAULT_REGIONS",
           "iu_sentences", "evaluate_labels", "evaluate_demo", "corpus_summary"]


@dataclass(frozen=True)
class Mention:
    """One finding spoken of in a sentence.

    Attributes:
        finding: Canonical finding name (``knowledge.FINDING_NAMES``).
        negated: True when the sentence rules the finding out.
        regions: Registry region names the statement applies to.
    """

    finding: str
    negated: bool
    regions: tuple[str, ...]


#: Word forms reports use beyond the knowledge synonyms (all lower case, matched as whole words).
EXTRA_TERMS: dict[str, tuple[str, ...]] = {
    "consolidation": ("consolidations", "consolidative", "opacities", "infiltrates", "airspace opacities",
                      "air space disease", "air space opacity", "airspace", "pneumonias", "focal airspace disease"),
    "pleural effusion": ("effusions", "pleural effusions", "blunting of the costophrenic",
                         "blunted costophrenic", "costophrenic blunting", "pleural thickening or effusion"),
    # "<heart> is (mildly) enlarged" is matched by _ENLARGED (which also sees "not")
    "cardiomegaly": ("enlarged heart size", "mildly enlarged heart", "enlarged cardiomediastinal silhouette"),
    "pneumothorax": ("pneumothoraces", "pneumothoraxes"),
    "nodule": ("nodules", "nodular opacities", "nodular densities", "nodular density"),
    "mass": ("masses", "tumors", "tumours"),
    "atelectasis": ("atelectatic", "atelectases", "subsegmental atelectases"),
}

#: Statements of normality -> the findings they rule out (compiled as regular expressions).
_LUNG_FINDINGS = tuple(f for f in FINDING_NAMES if f != "cardiomegaly")
NORMAL_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"\b(heart|cardiac)\b[^;]*?\b(within (the )?(normal limits|limits of normal)|upper limits? of normal|"
     r"(is|are|appears?|remains?) (normal|unremarkable|stable)|normal in size|not enlarged|unremarkable)\b"
     r"|\bnormal (heart|cardiac|cardiomediastinal) (size|silhouette|contours?)\b"
     r"|\b(cardiomediastinal|cardiac|heart) (silhouette|contours?|size)( is| are)? (normal|within normal limits|"
     r"unremarkable|stable)\b", ("cardiomegaly",)),
    (r"\b(the )?lungs (are |appear |remain )?(otherwise )?(clear|well expanded and clear)\b|\bclear lungs\b"
     r"|\blungs clear\b|\bboth lungs are clear\b", ("consolidation", "nodule", "mass", "atelectasis")),
    (r"\bcostophrenic (angles|sulci) (are )?(sharp|clear|preserved)\b", ("pleural effusion",)),
)
#: General statements ("no acute cardiopulmonary abnormality", "no active disease"): all findings, or
#: the lung findings when the statement says pulmonary; never when it is about bones.
_GENERAL = re.compile(r"\bno (evidence of )?(acute|active)(?P<what>[\w/ ]{0,40}?)\b(abnormalit(y|ies)|process(es)?|"
                      r"disease|findings?)\b|\bnormal chest\b")
_NOT_CHEST = re.compile(r"bon|osseous|skelet|fractur|abdomin|soft tissue")

#: A region a finding cannot be seen in, mapped to the nearest one it can (for lung findings).
_NEIGHBOUR = {f"{s} {a}": f"{s} {b}" for s in ("right", "left") for a, b in (
    ("costophrenic angle", "lower lung zone"), ("hemidiaphragm", "lower lung zone"),
    ("hilar structures", "mid lung zone"))}
#: Cardiomegaly said in words ("the heart is mildly enlarged"; "not" makes it a negation).
_ENLARGED = re.compile(r"\b(heart|cardiac silhouette|cardiomediastinal silhouette|heart size|cardiac size|cardiac contour)"
                       r"( is| are| appears| appear| remains| remain| has)?(?P<neg> not)?( been)?( mildly| moderately| markedly|"
                       r" severely| slightly| significantly| borderline| minimally| now| again)?( enlarged)\b")

#: Where a finding applies when the sentence names no region and no side.
DEFAULT_REGIONS: dict[str, tuple[str, ...]] = {f: ("right lung", "left lung") for f in FINDING_NAMES}
DEFAULT_REGIONS["cardiomegaly"] = ("cardiac silhouette",)

_PRE_NEG = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b", r"\babsence of\b",
            r"\bresolution of\b", r"\bresolved\b", r"\bclear of\b", r"\bno evidence of\b", r"\bnor\b",
            r"\bremoval of\b", r"\bruled out\b")
_POST_NEG = re.compile(r"\b(is|are|was|were|has|have)( been)? (not (seen|identified|present|visualized|demonstrated)|"
                       r"resolved|absent|no longer (seen|present|visible|identified))\b|\bhas cleared\b")
_CLAUSE = re.compile(r"\s*(?:;|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\bexcept\b|"
                     r"\bwith the exception of\b|\bwhich\b|\bwith (?:a |an )?(?:new|small|large|moderate|mild|"
                     r"trace|minimal|persistent|residual)\b)\s*")

# lobes, bases and other report phrases -> registry regions ({s} = side)
_SIDED = (
    (r"{s} upper lobes?", ("{s} upper lung zone",)),
    (r"{s} middle lobe|{s} mid(dle)? lung( zone)?|{s} midlung", ("{s} mid lung zone",)),
    (r"{s} lower lobes?|{s} (lung )?bases?|{s} basilar|{s} basal|{s} lower lung( zone)?|{s} lung base",
     ("{s} lower lung zone",)),
    (r"{s} (lung )?ap(ex|ices)|{s} apical", ("{s} apical zone",)),
    (r"{s} costophrenic( angle| sulcus| recess)?", ("{s} costophrenic angle",)),
    (r"{s} (hemi)?diaphragm", ("{s} hemidiaphragm",)),
    (r"{s} hil(um|a|ar)|{s} perihilar", ("{s} hilar structures",)),
    (r"{s} lung|{s} hemithorax|{s} chest|{s} pleural|{s}[- ]sided|{s} side", ("{s} lung",)),
)
_BOTH = (
    (r"\bbibasilar\b|\bbibasal\b|\b(both|bilateral|the|lung) bases\b|\bbilateral lower lobes?\b|\bbilateral basilar\b"
     r"|\bbasilar\b|\bbases\b", ("right lower lung zone", "left lower lung zone")),
    (r"\bbilateral (upper lobes?|apices|apical)\b|\bbiapical\b|\bapices\b", ("right apical zone", "left apical zone")),
    (r"\blingula(r)?\b", ("left mid lung zone",)),
    (r"\bretrocardiac\b", ("left lower lung zone",)),
    (r"\bcostophrenic angles\b", ("right costophrenic angle", "left costophrenic angle")),
    (r"\bbilateral(ly)?\b|\bboth lungs\b|\bbilateral lungs\b|\blungs\b", ("right lung", "left lung")),
)


def _term_table() -> list[tuple[str, str]]:
    table = []
    for f in FINDINGS:
        for t in f.terms + EXTRA_TERMS.get(f.name, ()):
            table.append((t.lower(), f.name))
    table.sort(key=lambda x: -len(x[0]))
    return table


_TERMS = _term_table()
_TERM_RE = re.compile(r"\b(" + "|".join(re.escape(t) for t, _ in _TERMS) + r")\b")
_TERM_OF = dict(_TERMS)
_NORMAL = [(re.compile(p), f) for p, f in NORMAL_PATTERNS]
_PRE_RE = re.compile("|".join(_PRE_NEG))
_ALLOWED = {f.name: set(f.regions) for f in FINDINGS}


def _region_patterns() -> list[tuple[re.Pattern, tuple[str, ...]]]:
    pats: list[tuple[re.Pattern, tuple[str, ...]]] = []
    for name in REGION_NAMES:  # registry names and their report phrases first (most specific)
        for ph in region_phrases(name):
            pats.append((re.compile(r"\b" + re.escape(ph) + r"s?\b"), (name,)))
    for side in ("right", "left"):
        for p, regs in _SIDED:
            pats.append((re.compile(r"\b(" + p.format(s=side) + r")\b"), tuple(r.format(s=side) for r in regs)))
    for p, regs in _BOTH:
        pats.append((re.compile(p), regs))
    return pats


_REGION_PATTERNS = _region_patterns()


def split_sentences(text: str) -> list[str]:
    """Sentences of a report, without list numbers and anonymisation marks; empty ones dropped."""
    text = re.sub(r"\bx-\s*XXXX\b", "x-ray", text or "", flags=re.I)
    text = re.sub(r"\bX{2,}\b", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    parts = re.split(r"(?<=[.!?])\s+(?=\S)", text)
    out = []
    for p in parts:
        p = re.sub(r"^\(?\d{1,2}[.)]\s*", "", p.strip())  # "1." / "2)" list numbers
        if re.search(r"[a-zA-Z]{2,}", p):
            out.append(p)
    return out


def _regions_in(clause: str) -> list[tuple[int, int, tuple[str, ...]]]:
    found: list[tuple[int, int, tuple[str, ...]]] = []
    taken = [False] * (len(clause) + 1)
    for pat, regs in _REGION_PATTERNS:
        for m in pat.finditer(clause):
            if any(taken[m.start():m.end()]):
                continue
            for i in range(m.start(), m.end()):
                taken[i] = True
            found.append((m.start(), m.end(), regs))
    return found


def _side_near(clause: str, start: int, end: int) -> tuple[str, ...]:
    """Sides named within a few words of a finding term ("small right effusion", "effusion on the left"),
    not elsewhere in the clause ("left IJ catheter ... without pneumothorax")."""
    before = " ".join(clause[:start].split()[-4:])
    after = " ".join(clause[end:].split()[:4])
    near = before + " | " + after
    sides = []
    if re.search(r"\bright\b", near):
        sides.append("right lung")
    if re.search(r"\bleft\b", near):
        sides.append("left lung")
    return tuple(sides)


def _place(finding: str, regions: Iterable[str], sides: tuple[str, ...]) -> tuple[str, ...]:
    allowed = _ALLOWED[finding]
    regs = tuple(dict.fromkeys(r if r in allowed else _NEIGHBOUR.get(r, r) for r in regions))
    regs = tuple(r for r in regs if r in allowed)
    if regs:
        return regs
    if finding != "cardiomegaly":
        side = tuple(r for r in sides if r in allowed)
        if side:
            return side
    return DEFAULT_REGIONS[finding]


_PREP = re.compile(r"^\W*(?:\w+\W+){0,1}?(in|within|at|of|involving|over|along|projecting over|overlying)\b")


def _regions_for(clause: str, term_end: int, regions: list[tuple[int, int, tuple[str, ...]]]) -> list[str]:
    """Regions introduced right after the term by a preposition ("atelectasis in the right base") win;
    otherwise every region of the clause."""
    after = [(a, b, r) for a, b, r in regions if a >= term_end]
    if after:
        a, _, regs = min(after)
        gap = clause[term_end:a]
        if len(gap.split()) <= 4 and _PREP.search(gap):
            return list(regs)
    return [r for _, _, regs in regions for r in regs]


def _parse_clause(clause: str) -> list[Mention]:
    out: list[Mention] = []
    covered = [False] * (len(clause) + 1)

    def cover(m: re.Match) -> None:
        for i in range(m.start(), m.end()):
            covered[i] = True

    for m in _GENERAL.finditer(clause):  # statements of normality
        what = m.group("what") or ""
        if _NOT_CHEST.search(what):
            continue
        cover(m)
        findings = _LUNG_FINDINGS if ("pulmonary" in what and "cardio" not in what) else FINDING_NAMES
        out += [Mention(f, True, DEFAULT_REGIONS[f]) for f in findings]
    for pat, findings in _NORMAL:
        for m in pat.finditer(clause):
            if any(covered[m.start():m.end()]):
                continue
            cover(m)
            out += [Mention(f, True, DEFAULT_REGIONS[f]) for f in findings]
    for m in _ENLARGED.finditer(clause):
        if any(covered[m.start():m.end()]):
            continue
        cover(m)
        negated = bool(m.group("neg")) or bool(_PRE_RE.search(clause[: m.start()]))
        out.append(Mention("cardiomegaly", negated, DEFAULT_REGIONS["cardiomegaly"]))
    regions = _regions_in(clause)
    post = _POST_NEG.search(clause)
    for m in _TERM_RE.finditer(clause):
        if any(covered[m.start():m.end()]):
            continue
        f = _TERM_OF[m.group(1)]
        negated = bool(_PRE_RE.search(clause[: m.start()])) or bool(post and post.start() >= m.end())
        out.append(Mention(f, negated, _place(f, _regions_for(clause, m.end(), regions),
                                              _side_near(clause, m.start(), m.end()))))
    return out


def parse_sentence(sentence: str) -> list[Mention]:
    """The findings a sentence speaks of (see the module docstring); one mention per (finding, negated),
    regions merged."""
    s = " " + re.sub(r"\s+", " ", sentence.lower()).replace("-", " ") + " "
    s = s.replace("x ray", "xray")
    merged: dict[tuple[str, bool], list[str]] = {}
    for clause in _CLAUSE.split(s):
        if not clause or not clause.strip():
            continue
        for m in _parse_clause(clause):
            merged.setdefault((m.finding, m.negated), []).extend(m.regions)
    # a finding both ruled out in general and stated somewhere (e.g. "no effusion on the left; small
    # right effusion"): keep both, the regions tell them apart
    return [Mention(f, n, tuple(dict.fromkeys(r))) for (f, n), r in merged.items()]


def parse_report(text: str) -> list[tuple[str, list[Mention]]]:
    """``[(sentence, mentions), ...]`` for a whole report."""
    return [(s, parse_sentence(s)) for s in split_sentences(text)]


def triples(mentions: Iterable[Mention]) -> set[tuple[str, str, bool]]:
    """``{(region, finding, negated)}``: the unit the parser is measured in."""
    return {(r, m.finding, m.negated) for m in mentions for r in m.regions}


# ----- real reports and the hand-labelled measurement ---------------------------------------------------

def iu_reports_path() -> Path:
    """``NLMCXR_reports.tgz`` as installed with ``torchxrayvision`` (read at run time, never copied)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.origin:
        raise FileNotFoundError("torchxrayvision is not installed: it carries the IU X-ray reports")
    p = Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the IU X-ray reports are not in this torchxrayvision install")
    return p


def iu_sentences(path: str | Path | None = None) -> dict[tuple[str, str, int], str]:
    """``{(report stem, section, index): sentence}`` for the FINDINGS and IMPRESSION of every IU report."""
    import tarfile
    import xml.etree.ElementTree as ET

    out: dict[tuple[str, str, int], str] = {}
    with tarfile.open(path or iu_reports_path()) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            stem = Path(member.name).stem
            root = ET.parse(tar.extractfile(member)).getroot()
            for a in root.iter("AbstractText"):
                sec = a.get("Label")
                if sec in ("FINDINGS", "IMPRESSION") and a.text:
                    for i, s in enumerate(split_sentences(a.text)):
                        out[(stem, sec, i)] = s
    return out


def _expand(labels: list) -> set[tuple[str, str, bool]]:
    out = set()
    for f, negated, regions in labels:
        regs = DEFAULT_REGIONS[f] if regions == "default" else tuple(regions)
        out |= {(r, f, bool(negated)) for r in regs}
    return out


def evaluate_labels(labels_path: str | Path, sentences: dict[tuple[str, str, int], str] | None = None) -> dict:
    """Precision and recall of (region, finding, negated) triples against hand labels, overall and on the
    development (even ``n``) and held-out (odd ``n``) halves; also (finding, negated) pairs ignoring regions.

    Raises:
        ValueError: a labelled sentence is missing or its text changed (SHA-1 mismatch).
    """
    import hashlib
    import json

    data = json.loads(Path(labels_path).read_text())
    sentences = sentences if sentences is not None else iu_sentences()
    parts: dict[str, dict[str, list[int]]] = {k: {"triples": [0, 0, 0], "pairs": [0, 0, 0]}
                                              for k in ("all", "development", "held_out")}
    for item in data["sentences"]:
        key = (item["report"], item["section"], int(item["index"]))
        text = sentences.get(key)
        if text is None or hashlib.sha1(text.encode()).hexdigest()[:10] != item["sha1"]:
            raise ValueError(f"labelled sentence {key} not found or changed (sentence splitting changed?)")
        gold = _expand(item["labels"])
        pred = triples(parse_sentence(text))
        for part in ("all", "development" if item["n"] % 2 == 0 else "held_out"):
            for unit, g, p in (("triples", gold, pred),
                               ("pairs", {(f, n) for _, f, n in gold}, {(f, n) for _, f, n in pred})):
                c = parts[part][unit]
                c[0] += len(g & p)
                c[1] += len(p)
                c[2] += len(g)
    res: dict = {"labels": str(labels_path), "n_sentences": len(data["sentences"]),
                 "data": "IU X-ray reports (Open-i), torchxrayvision data/NLMCXR_reports.tgz"}
    for part, units in parts.items():
        res[part] = {}
        for unit, (tp, npred, ngold) in units.items():
            res[part][unit] = {"precision": round(tp / npred, 4) if npred else None,
                               "recall": round(tp / ngold, 4) if ngold else None, "gold": ngold, "predicted": npred}
    return res


def corpus_summary(sentences: Iterable[str]) -> dict:
    """How a corpus parses: sentences, those with at least one mention, mentions per finding."""
    from collections import Counter

    n = with_mention = 0
    per: Counter[str] = Counter()
    for s in sentences:
        n += 1
        ms = parse_sentence(s)
        with_mention += bool(ms)
        for m in ms:
            per[f"{m.finding} ({'negated' if m.negated else 'present'})"] += 1
    return {"sentences": n, "with_a_mention": with_mention, "mentions": dict(sorted(per.items()))}


def evaluate_demo(root: str | Path) -> dict:
    """Triples against the demo builder's structured ``report_sentences`` (manifest.json). The builder
    places a sided effusion at the costophrenic angle and a pneumothorax at the apex where the text only
    gives the side; the parser then says "that lung", which counts as a miss here."""
    import json
    from collections import defaultdict

    m = json.loads((Path(root) / "manifest.json").read_text())
    tp = npred = ngold = 0
    for e in m["studies"]:
        gold: dict[str, set] = defaultdict(set)
        for s in e.get("report_sentences", []):
            regs = s["regions"] or DEFAULT_REGIONS[s["finding"]]
            gold[s["text"]] |= {(r, s["finding"], bool(s["negated"])) for r in regs}
        for text, g in gold.items():
            p = triples(parse_sentence(text))
            tp, npred, ngold = tp + len(g & p), npred + len(p), ngold + len(g)
    return {"data": f"demo reports ({root})", "studies": len(m["studies"]),
            "triples": {"precision": round(tp / npred, 4) if npred else None,
                        "recall": round(tp / ngold, 4) if ngold else None, "gold": ngold, "predicted": npred}}
