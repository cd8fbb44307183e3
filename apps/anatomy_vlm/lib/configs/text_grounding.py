"""Task ``text_grounding``: a sentence in, the regions it refers to (boxes, probabilities, heatmap) out."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType

from ..infers.language_infer import TextGroundingInfer
from .base import AnatomyTaskConfig


class TextGrounding(AnatomyTaskConfig):
    """Type a finding ("opacity at the right lung base") and see the regions it most likely refers to:
    JSON with the top regions' boxes and probabilities, and a heatmap (or segments) as the label."""

    infer_type = InferType.SEGMENTATION
    infer_class = TextGroundingInfer
    task_description = (
        "Anatomy-VLM: type a sentence ('sentence' option) and see the regions it most likely refers to "
        "(heatmap or segments, boxes and probabilities in the JSON)"
    )
    infer_config = {"sentence": "", "top_k": 3, "label_format": ["heatmap.nii.gz", "seg.nrrd"]}
