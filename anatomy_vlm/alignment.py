"""The language stage's training data and training: reports -> region/sentence pairs -> aligned embeddings.

Pairs come from the report text alone, through :mod:`anatomy_vlm.report_parser`, so a user's own report
corpus becomes training data the same way the demo reports do (the demo's structured labels are used
only to *evaluate*). Per image:

* a **positive mention** (finding ``f`` at regions ``R``) pairs each region of ``R`` and its parent
  (the lung of a zone) with the sentence; category ``f``; a finding with typical sites (``knowledge``:
  an effusion at the costophrenic angle, lower zone and hemidiaphragm, cardiomegaly at the cardiac
  silhouette) pairs only the sites: those of ``R``, or the sites on ``R``'s side when ``R`` names none
  (:func:`positive_regions`);
* a **negated mention** ("No pneumothorax.", "The lungs are clear.") pairs the regions where ``f`` can be
  seen (``knowledge``), on the sides the sentence speaks of, and not positive for anything in this
  report, with the sentence; category ``normal`` (at most ``normal_per_image`` such pairs per image);
* the whole report pairs with the image; its category is the set of findings it asserts.

Losses (:mod:`anatomy_vlm.losses`: ``calibrated_infonce``, ``grounding_loss``), trained in stages as
Anatomy-VLM does, after detection (``anatomy_vlm.train``): ``global`` (image <-> report only), then
``all`` (image, region <-> sentence, and grounding: a positive sentence against the 29 regions of its
own image). False negatives are calibrated as fVLM does: pairs of the same category (two normal
regions, or two regions with the same finding) are never each other's negatives.

The detection parts are frozen in this stage, so the inputs of the aligner (pooled region features,
region tokens, global token) are computed once per training item (:func:`precompute`) and the stage
costs seconds per epoch; detection and segmentation cannot regress.

With a lesion branch (``align.lesion_channels`` > 0, :mod:`anatomy_vlm.model.lesion`) a stage ``lesion``
comes first: the branch, on the model-input images, learns the per-region finding labels the reports
imply (:func:`region_finding_labels`; :func:`train_lesion_branch`, with image and region weights
warped alike); it is then frozen, its pooled features are computed once, and ``global`` and ``all``
train the aligner on them as on the other inputs.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .anatomy import NUM_REGIONS, REGION_NAMES, region
from .knowledge import FINDING_NAMES, finding as _finding
from .report_parser import parse_report

__all__ = ["ReportPairs", "report_pairs", "positive_regions", "region_finding_labels", "precompute",
           "train_alignment", "train_lesion_branch", "lesion_features", "lesion_probe_auc", "aligned_features",
           "ALIGN_DEFAULTS"]

_INDEX = {n: i for i, n in enumerate(REGION_NAMES)}
NORMAL = "normal"


@dataclass
class ReportPairs:
    """What one report gives the language stage.

    Attributes:
        report: The report text (paired with the image).
        findings: Findings the report asserts (sorted): the image's category.
        regions: ``[(region index, sentence, category)]`` region-level pairs.
        ground: ``[(sentence, positive region indices)]`` for positive sentences (grounding).
    """

    report: str
    findings: tuple[str, ...]
    regions: list[tuple[int, str, str]] = field(default_factory=list)
    ground: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)


def _with_parents(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        r = region(n)
        for x in (r.name, r.parent):
            if x and x not in out:
                out.append(x)
    return out


def _base(name: str) -> str:
    for side in ("right ", "left "):
        if name.startswith(side):
            return name[len(side):]
    return name


def positive_regions(finding_name: str, names: Sequence[str]) -> list[str]:
    """The regions a positive mention of ``finding_name`` at ``names`` (the parser's) pairs with: the
    names and their parents; for a finding with typical ``sites`` (``knowledge``), only the named regions
    that are sites, or, when the report names none (``"right pleural effusion"``: the right lung), the
    sites on the named side(s)."""
    regs = _with_parents(names)
    sites = _finding(finding_name).sites
    if not sites:
        return regs
    at_site = [r for r in regs if _base(r) in sites]
    if at_site:
        return at_site
    sides = {region(n).side for n in regs}
    return [n for n in _finding(finding_name).regions if _base(n) in sites and region(n).side in sides] or regs


def report_pairs(report: str, normal_per_image: int = 8, seed: int = 0) -> ReportPairs:
    """Parse ``report`` into language-stage pairs (see the module docstring)."""
    parsed = parse_report(report or "")
    pos_regions: set[str] = set()
    asserted: set[str] = set()
    for _, mentions in parsed:
        for m in mentions:
            if not m.negated:
                asserted.add(m.finding)
                pos_regions.update(_with_parents(m.regions))
    out = ReportPairs(report=report or "", findings=tuple(sorted(asserted)))
    normals: list[tuple[int, str, str]] = []
    for sentence, mentions in parsed:
        for m in mentions:
            if not m.negated:
                regs = positive_regions(m.finding, m.regions)
                if not regs:
                    continue
                out.regions += [(_INDEX[n], sentence, m.finding) for n in regs]
                out.ground.append((sentence, tuple(_INDEX[n] for n in regs)))
            else:
                sides = {region(n).side for n in m.regions} or {"right", "left", "midline"}
                for n in _finding(m.finding).regions:
                    if n not in pos_regions and region(n).side in sides:
                        normals.append((_INDEX[n], sentence, NORMAL))
    if normals:
        normals = list(dict.fromkeys(normals))
        rng = np.random.default_rng(int(hashlib.sha1(f"{seed}/{report}".encode()).hexdigest()[:8], 16))
        pick = rng.permutation(len(normals))[:normal_per_image]
        out.regions += [normals[i] for i in sorted(pick)]
    return out


def region_finding_labels(pairs: ReportPairs) -> torch.Tensor:
    """Per-region finding labels a report implies, for the lesion branch's auxiliary classifier.

    Returns:
        ``(K, F)`` int8 over the registry's regions and :data:`~anatomy_vlm.knowledge.FINDING_NAMES`:
        ``1`` a region the report names (or the parent of one) for a finding it asserts; ``0`` a region
        where the finding can be seen (``knowledge``) when the report does not assert the finding, or
        asserts it only on the other side; ``-1`` (unknown) elsewhere: regions where the finding cannot
        be seen, and same-side neighbours of an asserted finding the report does not name (a lesion
        can reach into them).
    """
    labels = torch.full((NUM_REGIONS, len(FINDING_NAMES)), -1, dtype=torch.int8)
    for j, f in enumerate(FINDING_NAMES):
        pos = {k for k, _, c in pairs.regions if c == f}
        sides = {region(REGION_NAMES[k]).side for k in pos}
        for n in _finding(f).regions:
            k = _INDEX[n]
            if k in pos:
                labels[k, j] = 1
            elif f not in pairs.findings or region(n).side not in sides:
                labels[k, j] = 0
    return labels


@torch.no_grad()
def precompute(model, items: Sequence[dict], embeddings: Sequence[torch.Tensor], progress: bool = True,
               batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Aligner inputs for training items, from the frozen detection model (one forward per item).

    Args:
        model: An :class:`~anatomy_vlm.model.AnatomyVLM` with a dense mask head.
        items: Prepared items (``image`` ``(1, S, S)``), in order.
        embeddings: Their encoder embeddings ``(C, h, w)``.

    Returns:
        ``{"pooled": (N, K, 2C) float16, "tokens": (N, K, D) float16, "global": (N, D) float16}``, and
        with a lesion branch (it trains, so its input is kept, not its output) ``"images"``
        ``(N, 1, S, S)`` float16 and ``"weights"`` ``(N, K, S/4, S/4)`` float16 region weights.
    """
    from .model.aligner import pool_regions, region_weights

    model.eval()
    lesion = getattr(model.aligner, "lesion", None) is not None
    pooled, tokens, glob, images, weights = [], [], [], [], []
    for s in tqdm(range(0, len(items), batch_size), desc="align: region features", unit="batch",
                  disable=not progress, file=sys.stderr):
        its = items[s:s + batch_size]
        x = torch.stack([it["image"].float().expand(3, -1, -1) for it in its])
        e = torch.stack([embeddings[s + j].float() for j in range(len(its))])
        out = model(images=x, embeddings=e, with_masks=True, align=False)
        pooled.append(pool_regions(e, out.masks).half())
        tokens.append(out.region_embeddings.half())
        g = out.global_embedding if out.global_embedding is not None else torch.zeros_like(out.region_embeddings[:, 0])
        glob.append(g.half())
        if lesion:
            images.append(x[:, :1].half())
            weights.append(region_weights(out.masks, (x.shape[-1] // model.aligner.lesion.stride,) * 2).half())
    feats = {"pooled": torch.cat(pooled), "tokens": torch.cat(tokens), "global": torch.cat(glob)}
    if lesion:
        feats["images"], feats["weights"] = torch.cat(images), torch.cat(weights)
    return feats


def aligned_features(aligner, feats: dict[str, torch.Tensor], idx=None, images: torch.Tensor | None = None):
    """The aligner's output for :func:`precompute` features (rows ``idx``, default all); with a lesion
    branch its features are computed here from ``feats["images"]`` (or ``images``, e.g. jittered)."""
    idx = slice(None) if idx is None else idx
    lesion = None
    if aligner.lesion is not None:
        x = feats["images"][idx] if images is None else images
        lesion = aligner.pool_lesion(x.float(), feats["weights"][idx].float())
    return aligner(feats["pooled"][idx].float(), feats["tokens"][idx].float(), feats["global"][idx].float(), lesion)


ALIGN_DEFAULTS: dict[str, Any] = {
    "enabled": False, "global_epochs": 20, "all_epochs": 60, "batch_size": 32, "lr": 1e-3, "lr_min": 1e-5,
    "weight_decay": 1e-4, "normal_per_image": 8,
    "weights": {"loss_image": 1.0, "loss_region": 1.0, "loss_ground": 1.0},
    "text_model": None, "text_cache": None, "seed": 0, "lesion_channels": None,
    "image_jitter": {"prob": 0.5, "gamma": 1.5, "noise": 0.03}, "lesion_epochs": 20, "lesion_batch_size": 16,
    "lesion_lr": 1e-3, "lesion_affine": {"rotate_deg": 10.0, "scale": 0.15, "shift": 0.08},
    "extra_roots": [], "fresh_aligner": False,
}
"""The ``align`` section of a training config (``anatomy_vlm.train``). Lesion branch keys:
``lesion_channels`` (``None`` keeps the model's aligner as it is, 0 removes the branch, ``L`` > 0 gives
the aligner a new branch of ``L`` channels), ``lesion_epochs``, ``lesion_batch_size``, ``lesion_lr``,
``lesion_affine`` (``null``: no warping), ``image_jitter``. ``extra_roots``: more demo builds whose
training split adds report-image pairs to this stage only (detection never sees them). ``fresh_aligner``:
start from a new, untrained aligner even when the model already has one (retrain the language stage on a
served checkpoint's detection; the new aligner's initial weights follow ``seed``)."""


def _cosine(opt, total: int, floor: float):
    """Cosine decay of ``opt``'s learning rate over ``total`` steps down to ``floor`` times the start."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def _batches(n: int, bs: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen).tolist()
    for s in range(0, n, bs):
        yield order[s:s + bs]


def train_lesion_branch(al, feats: dict[str, torch.Tensor], pairs: Sequence[ReportPairs], cfg: dict[str, Any],
                        gen: torch.Generator, progress: bool = True, log=None, t0: float | None = None) -> dict:
    """Stage ``lesion``: the aligner's lesion branch and its auxiliary finding classifier, on the
    report-derived per-region labels (:func:`region_finding_labels`), BCE over the known labels, with
    image and region weights warped alike (``lesion_affine``: a random similarity transform,
    :func:`anatomy_vlm.model.dense_mask_head.affine_augment`) and the images jittered (``image_jitter``:
    gamma and noise, :func:`anatomy_vlm.train.jitter_images`).
    Returns the last epoch's record."""
    from .model.dense_mask_head import affine_augment
    from .train import jitter_images

    labels = torch.stack([region_finding_labels(p) for p in pairs])  # (N, K, F)
    jitter = cfg.get("image_jitter") or None
    affine = cfg.get("lesion_affine") or None
    params = list(al.lesion.parameters())
    for prm in params:
        prm.requires_grad_(True)
    epochs = int(cfg.get("lesion_epochs", 20))
    N, bs = feats["images"].shape[0], int(cfg.get("lesion_batch_size", 16))
    opt = torch.optim.AdamW(params, lr=float(cfg.get("lesion_lr", 1e-3)), weight_decay=float(cfg["weight_decay"]))
    total = max(1, epochs * math.ceil(N / bs))
    sched = _cosine(opt, total, 0.02)
    t0 = time.time() if t0 is None else t0
    rec: dict[str, Any] = {"stage": "lesion", "epoch": 0}
    bar = tqdm(range(epochs), desc="align: lesion", unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in bar:
        al.lesion.train()
        tot, nb = 0.0, 0
        for idx in _batches(N, bs, gen):
            x, wts = feats["images"][idx].float(), feats["weights"][idx].float()
            if affine:  # image and region weights warped alike; the report's labels still hold
                wts, x, _ = affine_augment(wts, x, None, gen, rotate_deg=float(affine.get("rotate_deg", 10.0)),
                                           scale=float(affine.get("scale", 0.15)), shift=float(affine.get("shift", 0.08)))
            if jitter:
                x = jitter_images(x, jitter, gen)
            les = al.pool_lesion(x, wts)
            y = labels[idx]
            known = y >= 0
            if not known.any():
                continue
            loss = torch.nn.functional.binary_cross_entropy_with_logits(al.lesion.finding_head(les)[known],
                                                                        y[known].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach())
            nb += 1
        rec = {"stage": "lesion", "epoch": epoch + 1, "loss_finding": round(tot / max(nb, 1), 5),
               "seconds": round(time.time() - t0, 1)}
        bar.set_postfix({"loss_finding": f"{rec['loss_finding']:.3f}"})
        if log:
            log(rec)
    al.lesion.eval()
    return rec


@torch.no_grad()
def lesion_features(al, feats: dict[str, torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """The lesion branch's pooled features ``(N, K, 2L)`` of :func:`precompute` features, in batches."""
    n = feats["images"].shape[0]
    return torch.cat([al.pool_lesion(feats["images"][s:s + batch_size].float(),
                                     feats["weights"][s:s + batch_size].float()) for s in range(0, n, batch_size)])


@torch.no_grad()
def lesion_probe_auc(al, feats: dict[str, torch.Tensor], records: Sequence[dict]) -> dict[str, Any]:
    """Region AUC per finding of the lesion branch's auxiliary classifier (a supervised probe, not the
    zero-shot score) on images with ground truth, over the regions where the finding can be seen."""
    from .zeroshot import region_auc

    logits = al.lesion.finding_head(lesion_features(al, feats))  # (N, K, F)
    out = {f: region_auc(f, logits[..., j], records) for j, f in enumerate(FINDING_NAMES)}
    vals = [v for v in out.values() if v is not None]
    return {"region_auc": out, "region_auc_macro": float(np.mean(vals)) if vals else None}


def train_alignment(model, feats: dict[str, torch.Tensor], pairs: Sequence[ReportPairs], text_encoder,
                    cfg: dict[str, Any], val: tuple[dict, Sequence[dict]] | None = None,
                    progress: bool = True, log=None) -> dict[str, Any]:
    """Train ``model.aligner`` (detection parts frozen) on precomputed features and report pairs.

    Args:
        model: ``AnatomyVLM`` with an ``aligner``.
        feats: :func:`precompute` output for the training items.
        pairs: One :class:`ReportPairs` per training item, same order.
        text_encoder: :class:`anatomy_vlm.text.TextEncoder` (frozen; its embeddings are cached).
        cfg: The ``align`` section (:data:`ALIGN_DEFAULTS`).
        val: ``(val feats, val GT records)`` for a zero-shot check after each stage (see
            :func:`anatomy_vlm.zeroshot.evaluate_zero_shot`), or ``None``.
        log: A callable taking one JSON-able dict per epoch.

    Returns:
        ``{"seconds", "stages": {name: last epoch's losses}, "val": ...}``.
    """
    from .losses import calibrated_infonce, grounding_loss

    al = model.aligner
    if al is None:
        raise ValueError("the model has no aligner (config aligner.enabled is false)")
    texts = sorted({p.report for p in pairs} | {t for p in pairs for _, t, _ in p.regions}
                   | {t for p in pairs for t, _ in p.ground})
    tindex = {t: i for i, t in enumerate(texts)}
    temb = text_encoder.encode(texts) if texts else torch.zeros(0, text_encoder.dim)
    cat_ids = {c: i for i, c in enumerate((NORMAL,) + FINDING_NAMES)}
    image_groups = {}
    for p in pairs:
        image_groups.setdefault(p.findings, len(image_groups))
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in al.parameters():
        prm.requires_grad_(True)
    params = [p for p in al.parameters() if p.requires_grad]
    lesion = al.lesion is not None
    w = dict(ALIGN_DEFAULTS["weights"], **(cfg.get("weights") or {}))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    torch.manual_seed(int(cfg.get("seed", 0)))
    summary: dict[str, Any] = {"stages": {}}
    t0 = time.time()
    if lesion:  # stage "lesion" first; the branch is frozen afterwards and its pooled features kept
        summary["stages"]["lesion"] = train_lesion_branch(al, feats, pairs, cfg, gen, progress, log, t0)
        feats = dict(feats, lesion=lesion_features(al, feats))
        for prm in al.lesion.parameters():
            prm.requires_grad_(False)
        params = [p for p in al.parameters() if p.requires_grad]
        if val is not None:  # diagnostic: the auxiliary classifier's region AUC on the val ground truth
            summary["lesion_probe_val"] = lesion_probe_auc(al, val[0], val[1])
    N = feats["pooled"].shape[0]
    bs = int(cfg["batch_size"])
    for stage, epochs in (("global", int(cfg["global_epochs"])), ("all", int(cfg["all_epochs"]))):
        if epochs <= 0:
            continue
        opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        total = epochs * math.ceil(N / bs)
        lr_min = float(cfg["lr_min"]) / float(cfg["lr"])
        sched = _cosine(opt, total, lr_min)
        bar = tqdm(range(epochs), desc=f"align: {stage}", unit="epoch", disable=not progress, file=sys.stderr)
        for epoch in bar:
            al.train()
            sums: dict[str, float] = {}
            nb = 0
            for idx in _batches(N, bs, gen):
                losses = {}
                out = al(feats["pooled"][idx].float(), feats["tokens"][idx].float(), feats["global"][idx].float(),
                         feats["lesion"][idx].float() if lesion else None)
                rep = al.encode_text(temb[[tindex[pairs[i].report] for i in idx]])
                losses["loss_image"] = calibrated_infonce(out.image, rep, torch.tensor(
                    [image_groups[pairs[i].findings] for i in idx]), al.scale)
                if stage == "all":
                    rr, tt, cc = [], [], []
                    gi, gs, gp = [], [], []
                    for b, i in enumerate(idx):
                        for k, t, c in pairs[i].regions:
                            rr.append((b, k))
                            tt.append(tindex[t])
                            cc.append(cat_ids[c])
                        for t, pos in pairs[i].ground:
                            gi.append(b)
                            gs.append(tindex[t])
                            m = torch.zeros(NUM_REGIONS, dtype=torch.bool)
                            m[list(pos)] = True
                            gp.append(m)
                    if rr:
                        bi = torch.tensor([r[0] for r in rr])
                        ki = torch.tensor([r[1] for r in rr])
                        losses["loss_region"] = calibrated_infonce(out.regions[bi, ki], al.encode_text(temb[tt]),
                                                                   torch.tensor(cc), al.scale)
                    if gi:
                        losses["loss_ground"] = grounding_loss(out.regions, al.encode_text(temb[gs]),
                                                               torch.tensor(gi), torch.stack(gp), al.scale)
                loss = sum(w[k] * v for k, v in losses.items())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                nb += 1
            rec = {"stage": stage, "epoch": epoch + 1, **{k: round(v / nb, 5) for k, v in sums.items()},
                   "scale": round(float(al.scale.detach()), 3), "seconds": round(time.time() - t0, 1)}
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k.startswith("loss")})
            if log:
                log(rec)
            summary["stages"][stage] = rec
    al.eval()
    for prm in al.parameters():
        prm.requires_grad_(False)
    summary["seconds"] = round(time.time() - t0, 1)
    summary["texts"] = len(texts)
    if val is not None:
        from .zeroshot import evaluate_zero_shot

        vfeats, vrecords = val
        summary["val"] = evaluate_zero_shot(model, text_encoder, vfeats, vrecords)
    return summary
