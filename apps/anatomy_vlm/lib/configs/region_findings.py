"""Task ``region_findings``: zero-shot findings per region and for the image (language stage)."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType

from ..infers.language_infer import RegionFindingsInfer
from .base import AnatomyTaskConfig


class RegionFindings(AnatomyTaskConfig):
    """Per region the top findings with scores, and image-level findings, for the knowledge base's
    findings or the user's own finding texts (``prompts``); JSON only."""

    infer_type = InferType.CLASSIFICATION
    infer_class = RegionFindingsInfer
    task_description = (
        "Anatomy-VLM: zero-shot findings per region and for the image; 'prompts' takes your own finding "
        "texts (one per line)"
    )
    infer_config = {"prompts": "", "top_k": 3, "regions": ""}
