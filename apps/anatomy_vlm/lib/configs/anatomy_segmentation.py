"""Task ``anatomy_segmentation``: one mask per chest X-ray region."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType

from .base import AnatomyTaskConfig


class AnatomySegmentation(AnatomyTaskConfig):
    """Masks for the 29 regions on the original image grid, label ids from the registry."""

    infer_type = InferType.SEGMENTATION
    task_description = (
        "Anatomy-VLM: one mask per chest X-ray region (29 Chest ImaGenome regions; regions overlap, "
        "e.g. zones inside a lung)"
    )
    infer_config = {"regions": "", "label_format": ["seg.nrrd", "nii.gz", "dcm"]}
