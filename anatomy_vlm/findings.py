"""Findings and grounding answers for one image: what ``region_findings``, ``text_grounding`` and
``anatomy-vlm predict --prompt`` return.

    >>> p = Predictor.from_checkpoint("apps/anatomy_vlm/model/anatomy_vlm.pt")
    >>> pred = p.predict("study.dcm", align=True)
    >>> region_findings(pred, p.language(), ["pleural effusion", "hydrothorax"])["findings"][0]
    {'finding': 'pleural effusion', 'score': 0.71, 'region': 'right costophrenic angle'}

Both answers are computed from the language stage's joint-space embeddings of the image's 29 regions
(:class:`~anatomy_vlm.zeroshot.ZeroShotScorer`): per-region probabilities of a finding text from
positive/negative prompt ensembles, the image-level probability as the largest of them over the regions
where the finding can be seen (all regions for a text naming no known finding), and a sentence's
grounding as a softmax over the 29 regions. Scores are model outputs on a demo-trained model, not calibrated clinical probabilities; the README gives what they were measured to be worth.

User text goes through :func:`parse_prompts` / :func:`anatomy_vlm.text.check_prompt` first: empty,
over-long or non-text prompts raise ``ValueError`` with a message (HTTP 400 in the server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .anatomy import REGIONS
from .knowledge import FINDING_NAMES
from .text import check_prompt

__all__ = ["MAX_PROMPTS", "parse_prompts", "region_findings", "ground_sentence", "grounding_heatmap"]

MAX_PROMPTS = 64
"""At most this many finding texts per request."""


def parse_prompts(value: Any) -> list[str]:
    """Finding texts from a request value: a list of strings, or one string with one prompt per line
    (or separated by ``;``). ``None`` / ``""`` / ``[]`` give ``[]`` (the caller's default set).

    Raises:
        ValueError: a prompt that is not text, empty, over-long or has no words; more than
            :data:`MAX_PROMPTS` prompts; a value that is neither a string nor a list.
    """
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        items: list[Any] = [s for s in value.replace(";", "\n").split("\n") if s.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"prompts must be a list of finding texts or one text, got {type(value).__name__}")
    out: list[str] = []
    for item in items:
        t = check_prompt(item)
        if t not in out:
            out.append(t)
    if len(out) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(out)}")
    return out


def _need_aligned(pred) -> None:
    if getattr(pred, "aligned", None) is None:
        raise ValueError("the prediction has no aligned embeddings (predict with align=True)")


def region_findings(pred, scorer, prompts: Sequence[str] | None = None, top_k: int | None = 3) -> dict[str, Any]:
    """Zero-shot findings per region and for the image.

    Args:
        pred: A :class:`~anatomy_vlm.predict.Prediction` made with ``align=True``.
        scorer: The predictor's :class:`~anatomy_vlm.zeroshot.ZeroShotScorer` (``Predictor.language()``).
        prompts: Finding texts (checked with :func:`parse_prompts`); default the knowledge base's findings.
        top_k: Findings listed per region, best first (``None`` or ``0``: all).

    Returns:
        ``pred.to_json()`` plus ``"prompts"`` (the texts scored), per region ``"findings": [{"finding",
        "score"}]`` (best first) and for the image ``"findings": [{"finding", "score", "region"}]`` (best
        first; ``region`` is the region whose probability it is).
    """
    _need_aligned(pred)
    texts = parse_prompts(list(prompts)) if prompts else list(FINDING_NAMES)
    probs = scorer.region_probs(pred.aligned.regions[0], texts)  # (F, 29)
    img, arg = scorer.image_probs(probs, texts)
    out = pred.to_json()
    k = len(texts) if not top_k else min(int(top_k), len(texts))
    for row, i in zip(out["regions"], pred.indices):
        order = np.argsort(-probs[:, i], kind="stable")[:k]
        row["findings"] = [{"finding": texts[j], "score": round(float(probs[j, i]), 4)} for j in order]
    order = np.argsort(-img, kind="stable")
    out["findings"] = [{"finding": texts[j], "score": round(float(img[j]), 4), "region": REGIONS[int(arg[j])].name}
                       for j in order]
    out["prompts"] = texts
    return out


def ground_sentence(pred, scorer, sentence: Any, top_k: int = 3) -> tuple[dict[str, Any], np.ndarray]:
    """The regions a sentence most likely refers to.

    Args:
        pred: A prediction made with ``align=True`` (its boxes are reported for the top regions).
        scorer: ``Predictor.language()``.
        sentence: The user's text (checked with :func:`anatomy_vlm.text.check_prompt`).
        top_k: How many regions to list.

    Returns:
        ``(json, probabilities)``: ``{"image", "image_shape", "sentence", "regions": [{"name", "id", "box",
        "score", "probability"}] (best first, the predicted regions only), "probabilities": {name: p}}``
        and the ``(29,)`` probabilities (softmax over all regions of the image).
    """
    _need_aligned(pred)
    text = check_prompt(sentence)
    p = scorer.ground(pred.aligned.regions[0], text)
    base = pred.to_json()
    rows = {r["id"] - 1: r for r in base["regions"]}
    order = [int(i) for i in np.argsort(-p, kind="stable") if int(i) in rows][:max(1, int(top_k))]
    out = {"image": base["image"], "image_shape": base["image_shape"], "sentence": text,
           "regions": [dict(rows[i], probability=round(float(p[i]), 4)) for i in order],
           "probabilities": {REGIONS[i].name: round(float(p[i]), 4) for i in rows}}
    return out, p


def grounding_heatmap(pred, probabilities: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 heatmap of a grounded sentence: each pixel takes the largest probability of the
    regions covering it, relative to the top region (255 = the most likely region), from the masks
    of the prediction's regions.

    Raises:
        ValueError: the prediction has no masks.
    """
    if pred.masks is None:
        raise ValueError("the prediction has no masks (predict with with_masks=True)")
    p = np.asarray(probabilities, np.float64)
    rel = p / max(float(p.max()), 1e-12)
    H, W = pred.image_shape
    heat = np.zeros((H, W), np.float32)
    for k, i in enumerate(pred.indices):
        np.maximum(heat, np.where(pred.masks[k], rel[i], 0.0).astype(np.float32), out=heat)
    return np.clip(np.rint(heat * 255.0), 0, 255).astype(np.uint8)
