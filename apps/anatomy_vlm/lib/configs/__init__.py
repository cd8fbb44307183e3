"""Task configs, one per served task. ``CONFIGS`` is the explicit registry ``main.py`` reads
(no class-name scanning, no ``eval``)."""

from typing import Dict, Type

from .anatomy_detection import AnatomyDetection
from .anatomy_segmentation import AnatomySegmentation
from .base import CHECKPOINT_FILENAME, AnatomyTaskConfig, checkpoint_path
from .region_findings import RegionFindings
from .text_grounding import TextGrounding

CONFIGS: Dict[str, Type[AnatomyTaskConfig]] = {
    "anatomy_detection": AnatomyDetection,
    "anatomy_segmentation": AnatomySegmentation,
    "region_findings": RegionFindings,
    "text_grounding": TextGrounding,
}

__all__ = [
    "CONFIGS",
    "CHECKPOINT_FILENAME",
    "AnatomyDetection",
    "AnatomySegmentation",
    "AnatomyTaskConfig",
    "RegionFindings",
    "TextGrounding",
    "checkpoint_path",
]
