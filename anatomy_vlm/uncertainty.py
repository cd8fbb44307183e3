"""Per-image uncertainty for active learning: how much the model disagrees with itself on an image.

For one image (one encoder pass, usually cached) the model gives each region three answers: the anatomy
decoder's own box, the refined box, and the bounding box of the region's mask. Where the model knows
the anatomy they agree; where it does not (an unusual pose, exposure, a device, pathology) they drift
apart. Per region::

    u_k = (1 - IoU(decoder box, refined box)) + (1 - IoU(refined box, mask box)) + H(presence_k)
          + mean H(mask_k) over the region's support

with ``H`` the binary entropy (bits) of the presence score and of each mask pixel's probability (averaged
over the pixels where the probability exceeds 0.1: a crisp mask scores near 0, a fuzzy one near 1); the
image's uncertainty is the mean over the regions. (Without a box refiner, the dense-head checkpoints,
the first term is 0 and the decoder's box is compared with the mask's.) Scores are cached per (model version, image digest) in a small JSON file, so a strategy can rank
a whole datastore without recomputing what it has seen; a new checkpoint is a new model version.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import file_digest

__all__ = ["image_uncertainty", "UncertaintyCache", "model_version"]


def image_uncertainty(predictor: Any, image: str | os.PathLike) -> dict[str, Any]:
    """``{"score", "per_region": [...], "parts": {...}}`` for one image (see the module docstring)."""
    from .evaluate import box_ious as _iou
    from .model import box_cxcywh_to_xyxy

    emb, box, _, _, x = predictor._embedding(image, need_input=True)
    model = predictor.model
    with torch.no_grad():
        out = model(images=x[None], embeddings=emb[None], with_masks=True, refine_steps=predictor.refine_steps)
    S = float(model.input_size)
    refined = (out.boxes_xyxy[0] * S).numpy()
    if model.box_refiner is not None:
        n_stages = len(model.box_refiner.stages)
        dec = (box_cxcywh_to_xyxy(out.aux_outputs[-n_stages].boxes[0]) * S).numpy()
    else:
        dec = refined
    from .model.query_mask_head import mask_boxes

    mb = mask_boxes(out.masks[0] > 0).numpy()
    empty = (mb[:, 2] <= mb[:, 0]) | (mb[:, 3] <= mb[:, 1])
    d_dec = 1.0 - _iou(dec, refined)
    d_mask = np.where(empty, 1.0, 1.0 - _iou(refined, mb))
    p = out.scores[0].numpy().clip(1e-6, 1 - 1e-6)
    ent = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    q = torch.sigmoid(out.masks[0].float()).clamp(1e-6, 1 - 1e-6)
    hq = -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
    support = q > 0.1
    m_ent = ((hq * support).flatten(1).sum(-1) / support.flatten(1).sum(-1).clamp(min=1)).numpy()
    m_ent = np.where(support.flatten(1).any(-1).numpy(), m_ent, 1.0)
    per = d_dec + d_mask + ent + m_ent
    return {"score": float(per.mean()), "per_region": [round(float(v), 4) for v in per],
            "parts": {"decoder_vs_refined": float(d_dec.mean()), "refined_vs_mask": float(d_mask.mean()),
                      "presence_entropy": float(ent.mean()), "mask_entropy": float(m_ent.mean())}}


_CKPT_VERSIONS: dict[tuple[str, int, int], str] = {}


def model_version(predictor: Any) -> str:
    """Identity of the loaded weights: the checkpoint file's digest (or the weights' when in memory)."""
    path = (predictor.meta or {}).get("path")
    if path and Path(path).is_file():
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        if key not in _CKPT_VERSIONS:  # a 20 MB file: hashed once per version, not per request
            _CKPT_VERSIONS[key] = "ckpt-" + file_digest(path)[:16]
        return _CKPT_VERSIONS[key]
    h = hashlib.sha1()
    for name, t in sorted(predictor.model.state_dict().items()):
        if not name.startswith("encoder."):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes()[:2048])
    return "weights-" + h.hexdigest()[:16]


class UncertaintyCache:
    """Scores per (model version, image digest), in memory and in ``<root>/<version>.json`` (atomic writes).

    Args:
        root: Folder for the JSON files; ``None`` keeps scores in memory only.
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        self._scores: dict[str, dict[str, float]] = {}
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> file digest
        self._lock = threading.Lock()
        self.computed = 0

    def _digest(self, image: str | os.PathLike) -> str:
        """File digest, hashed once per file version (a strategy asks for every unlabelled image per call)."""
        st = os.stat(image)
        key = (os.path.realpath(image), st.st_mtime_ns, st.st_size)
        d = self._digests.get(key)
        if d is None:
            d = self._digests[key] = file_digest(image)
        return d

    def _file(self, version: str) -> Path | None:
        return self.root / f"{version}.json" if self.root else None

    def _table(self, version: str) -> dict[str, float]:
        if version not in self._scores:
            table: dict[str, float] = {}
            f = self._file(version)
            if f is not None and f.is_file():
                try:
                    table = {str(k): float(v) for k, v in json.loads(f.read_text()).items()}
                except (OSError, ValueError):
                    table = {}
            self._scores[version] = table
        return self._scores[version]

    def known(self, version: str, image: str | os.PathLike) -> float | None:
        """The cached score of ``image`` under model ``version``, or ``None`` (nothing is computed)."""
        digest = self._digest(image)
        with self._lock:
            return self._table(version).get(digest)

    def score(self, predictor: Any, image: str | os.PathLike, version: str | None = None) -> float:
        """The cached score of ``image`` under the predictor's model, computed once."""
        version = version or model_version(predictor)
        digest = self._digest(image)
        with self._lock:
            table = self._table(version)
            if digest in table:
                return table[digest]
        s = image_uncertainty(predictor, image)["score"]
        with self._lock:
            table[digest] = s
            self.computed += 1
            f = self._file(version)
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f".{f.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(table))
                os.replace(tmp, f)
        return s
