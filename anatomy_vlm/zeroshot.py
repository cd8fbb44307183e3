"""Zero-shot findings per region and per image, and text grounding, from the aligned embeddings.

For any free-text finding ``f`` (trained or not) and region ``k``: the positive prompts
(:data:`anatomy_vlm.knowledge.ZERO_SHOT_POSITIVE`, "{finding}.", ...) and the negative ones
(:data:`~anatomy_vlm.knowledge.ZERO_SHOT_NEGATIVE`, "No {finding}.", ...) are encoded by the frozen
text encoder and the aligner's text projection; each set is averaged into one class vector (CLIP's
prompt ensemble) and

    p_k(f) = softmax(scale * [<r_k, c_pos(f)>, <r_k, c_neg(f)>])[0]

with ``r_k`` the region's unit embedding (which carries its region through knowledge enrichment) and
``scale`` the learned temperature. The **image-level** probability is the largest region probability
over the finding's sites ``S(f)``, ``p(f) = max_{k in S(f)} p_k(f)`` (the image shows ``f`` where some
region that can show it does), and it names that region. ``S(f)`` is where ``knowledge`` says the
finding can be seen when the text names a known finding (by name or synonym, read by the report parser:
"small left pleural effusion" -> pleural effusion), all 29 regions for any other text. The maximum
over all 29 regions, used before, let a false positive where the finding cannot be seen (an effusion
in the trachea) decide the image; measured on the demo's validation and test splits in the README
("Image level"), with the other poolings tried.
Grounding a sentence: its joint-space vector against the 29 region embeddings of the image, softmax
over regions.

Prompt embeddings are cached per text (:class:`anatomy_vlm.text.TextEncoder`): a new prompt costs one
text-encoder call for its six template sentences, then nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from .anatomy import REGION_NAMES
from .knowledge import FINDING_NAMES, ZERO_SHOT_NEGATIVE, ZERO_SHOT_POSITIVE, finding as _finding

__all__ = ["ZeroShotScorer", "evaluate_zero_shot", "score_zero_shot", "PARAPHRASES", "roc_auc"]

#: Finding wordings that appear nowhere in training (not in knowledge.py's names or synonyms, which the
#: demo reports are written from): the zero-shot check for prompts the model never saw.
PARAPHRASES: dict[str, str] = {
    "consolidation": "alveolar opacification",
    "pleural effusion": "hydrothorax",
    "cardiomegaly": "increased cardiothoracic ratio",
    "pneumothorax": "free air around the lung",
    "nodule": "small round lesion",
    "mass": "large tumorous lesion",
    "atelectasis": "incomplete expansion of the lung",
}


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC (MONAI's ``compute_roc_auc``); ``None`` unless both classes occur."""
    from monai.metrics import compute_roc_auc

    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        return None
    return float(compute_roc_auc(torch.as_tensor(np.asarray(scores, np.float64)), torch.as_tensor(y.astype(np.int64))))


class ZeroShotScorer:
    """Scores free-text findings against aligned region / image embeddings.

    Args:
        aligner: The model's :class:`~anatomy_vlm.model.aligner.RegionAligner` (eval mode).
        text_encoder: The frozen :class:`~anatomy_vlm.text.TextEncoder` the aligner was trained with.
    """

    def __init__(self, aligner, text_encoder):
        self.aligner, self.text = aligner, text_encoder
        self._classes: dict[tuple[str, ...], torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, J)`` joint-space unit vectors of texts (text-encoder cache first)."""
        return self.aligner.encode_text(self.text.encode(list(texts)))

    @torch.no_grad()
    def _class_vector(self, texts: tuple[str, ...]) -> torch.Tensor:
        v = self._classes.get(texts)
        if v is None:
            v = torch.nn.functional.normalize(self.embed(texts).mean(0), dim=-1)
            self._classes[texts] = v
        return v

    @staticmethod
    def _fill(templates: Sequence[str], finding: str) -> tuple[str, ...]:
        out = []
        for t in templates:
            x = t.format(finding=finding)
            out.append(x[0].upper() + x[1:])
        return tuple(out)

    @torch.no_grad()
    def class_vectors(self, findings: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, J)`` positive and ``(F, J)`` negative prompt-ensemble vectors of finding texts."""
        self.text.encode([t for f in findings for t in self._fill(ZERO_SHOT_POSITIVE + ZERO_SHOT_NEGATIVE, f)])
        pos = torch.stack([self._class_vector(self._fill(ZERO_SHOT_POSITIVE, f)) for f in findings])
        neg = torch.stack([self._class_vector(self._fill(ZERO_SHOT_NEGATIVE, f)) for f in findings])
        return pos, neg

    @torch.no_grad()
    def region_probs(self, regions: torch.Tensor, findings: Sequence[str]) -> np.ndarray:
        """``(F, K)`` probabilities of each finding text in each region.

        Args:
            regions: ``(K, J)`` unit region embeddings of one image.
            findings: Finding texts (checked by the caller).
        """
        if not findings:
            return np.zeros((0, regions.shape[0]), np.float32)
        pos, neg = self.class_vectors(findings)
        r = regions.float()
        logits = float(self.aligner.scale) * torch.stack([pos @ r.T, neg @ r.T], -1)  # (F, K, 2)
        return torch.softmax(logits, -1)[..., 0].numpy().astype(np.float32)

    @staticmethod
    def sites(text: str, num_regions: int = len(REGION_NAMES)) -> np.ndarray:
        """``(K,)`` boolean: the regions where the finding a text names can be seen (``knowledge``), or all
        regions when the text names no known finding (or several, or rules one out)."""
        f = _known_finding(text)
        out = np.zeros(num_regions, bool)
        if f is None:
            out[:] = True
        else:
            out[[k for k in _allowed(f) if k < num_regions]] = True
        return out

    @classmethod
    def image_probs(cls, region_probs: np.ndarray, findings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Image-level ``(F,)`` probabilities from ``(F, K)`` region ones (:meth:`region_probs` of the same
        finding texts): the maximum over each text's :meth:`sites`, and the ``(F,)`` index of the region
        that gives it."""
        if region_probs.shape[0] == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if len(findings) != region_probs.shape[0]:
            raise ValueError(f"{region_probs.shape[0]} rows of region probabilities for {len(findings)} finding texts")
        sites = np.stack([cls.sites(f, region_probs.shape[1]) for f in findings])
        masked = np.where(sites, region_probs, -1.0)
        return masked.max(1).astype(np.float32), masked.argmax(1)

    @torch.no_grad()
    def ground(self, regions: torch.Tensor, sentence: str) -> np.ndarray:
        """``(K,)`` probability that ``sentence`` refers to each region (softmax over the image's regions)."""
        t = self.embed([sentence])[0]
        return torch.softmax(float(self.aligner.scale) * (regions.float() @ t), 0).numpy()


def _allowed(f: str) -> list[int]:
    return [REGION_NAMES.index(n) for n in _finding(f).regions]


@functools.lru_cache(maxsize=4096)
def _known_finding(text: str) -> str | None:
    """The one known finding a text asserts (canonical name), or ``None`` (cached per text: asked once
    per image and prompt)."""
    from .report_parser import parse_sentence

    try:
        return _finding(text).name
    except KeyError:
        pass
    mentions = parse_sentence(text)
    found = {m.finding for m in mentions}
    if len(found) != 1 or any(m.negated for m in mentions):
        return None
    return found.pop()


def region_auc(f: str, scores: Sequence, records: Sequence[dict]) -> float | None:
    """AUC of finding ``f`` over the (image, region) pairs where ``knowledge`` says it can be seen:
    ``scores[i][k]`` for image ``i`` and region ``k``, labels from ``records[i]["region_findings"]``."""
    s, y = [], []
    for i, rec in enumerate(records):
        rf = rec.get("region_findings", {})
        for k in _allowed(f):
            s.append(float(scores[i][k]))
            y.append(f in rf.get(REGION_NAMES[k], []))
    return roc_auc(s, y)


def evaluate_zero_shot(model, text_encoder, feats: dict[str, torch.Tensor], records: Sequence[dict],
                       wordings: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Zero-shot AUCs and grounding accuracy on images with ground truth.

    Args:
        model: ``AnatomyVLM`` with a trained aligner.
        text_encoder: Its text encoder.
        feats: :func:`anatomy_vlm.alignment.precompute` output for the images.
        records: Per image ``{"region_findings": {region: [finding]}, "image_findings": [...],
            "report_sentences": [{"text", "finding", "regions", "negated"}]}`` (the demo manifest's).
        wordings: ``{"name": {finding: prompt text}}`` prompt sets to score (default: the canonical
            finding names and :data:`PARAPHRASES`).

    Returns:
        ``{"n_images", "<name>": {"region_auc_macro", "image_auc_macro", "region_auc": {f: auc},
        "image_auc": {f: auc}, "prompts": {f: text}}, "grounding": {"n_sentences", "top1_correct"}}``;
        region AUCs are over the (image, region) pairs where ``knowledge`` says the finding can be seen.
    """
    from .alignment import aligned_features

    al = model.aligner
    n = feats["pooled"].shape[0]
    with torch.no_grad():  # in batches: a lesion branch runs on the images here
        regions = torch.cat([aligned_features(al, feats, slice(s, s + 16)).regions for s in range(0, n, 16)])
    return score_zero_shot(ZeroShotScorer(al, text_encoder), regions, records, wordings)


def score_zero_shot(scorer: ZeroShotScorer, regions: torch.Tensor | Sequence[torch.Tensor], records: Sequence[dict],
                    wordings: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """:func:`evaluate_zero_shot` from the images' ``(K, J)`` aligned region embeddings (one per record),
    e.g. the served ones (``Predictor.predict(..., align=True)``)."""
    wordings = wordings or {"canonical": {f: f for f in FINDING_NAMES}, "paraphrased": dict(PARAPHRASES)}
    res: dict[str, Any] = {"n_images": len(records)}
    for name, prompts in wordings.items():
        fs = list(prompts)
        texts = [prompts[f] for f in fs]
        reg_scores = [scorer.region_probs(regions[i], texts) for i in range(len(records))]  # (F, K) each
        img_scores = np.stack([scorer.image_probs(r, texts)[0] for r in reg_scores])  # (N, F)
        r_auc, i_auc = {}, {}
        for j, f in enumerate(fs):
            r_auc[f] = region_auc(f, [r[j] for r in reg_scores], records)
            i_auc[f] = roc_auc(img_scores[:, j], [f in rec.get("image_findings", []) for rec in records])
        valid_r = [v for v in r_auc.values() if v is not None]
        valid_i = [v for v in i_auc.values() if v is not None]
        res[name] = {"region_auc_macro": float(np.mean(valid_r)) if valid_r else None,
                     "image_auc_macro": float(np.mean(valid_i)) if valid_i else None,
                     "region_auc": r_auc, "image_auc": i_auc, "prompts": prompts}
    n = hit = 0
    for i, rec in enumerate(records):
        rf = rec.get("region_findings", {})
        for s in rec.get("report_sentences", []):
            if s.get("negated") or not s.get("finding"):
                continue
            correct = {REGION_NAMES.index(r) for r in s.get("regions", [])}
            correct |= {REGION_NAMES.index(r) for r, fl in rf.items() if s["finding"] in fl}
            if not correct:
                continue
            p = scorer.ground(regions[i], s["text"])
            n += 1
            hit += int(int(np.argmax(p)) in correct)
    res["grounding"] = {"n_sentences": n, "top1_correct": (hit / n) if n else None}
    return res
