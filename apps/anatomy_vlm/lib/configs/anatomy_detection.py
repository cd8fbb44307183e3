"""Task ``anatomy_detection``: one box per chest X-ray region."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType

from .base import AnatomyTaskConfig


class AnatomyDetection(AnatomyTaskConfig):
    """Boxes for the 29 regions: ``[x0, y0, x1, y1]`` in pixels of the original image grid
    (x = column, y = row), each with a score and the region name (DESIGN section 7)."""

    infer_type = InferType.DETECTION
    task_description = (
        "Anatomy-VLM: one box per chest X-ray region (29 Chest ImaGenome regions), "
        "[x0, y0, x1, y1] pixels with scores"
    )
    infer_config = {"regions": "", "refine_boxes": False, "label_format": ["json", "dcm"]}
