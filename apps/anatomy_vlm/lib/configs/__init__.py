"""Task configs, one per served task. ``CONFIGS`` is the explicit registry ``main.py`` reads
(no class-name scanning, no ``eval``)."""

from typing import Dict, Type

from .anatomy_detection import AnatomyDetection
from .anatomy_segmentation import AnatomySegmentation
from .base import CHECKPOINT_FILENAME, AnatomyTaskConfig, checkpoint_path

CONFIGS: Dict[str, Type[AnatomyTaskConfig]] = {
    "anatomy_detection": AnatomyDetection,
    "anatomy_segmentation": AnatomySegmentation,
}

__all__ = [
    "CONFIGS",
    "CHECKPOINT_FILENAME",
    "AnatomyDetection",
    "AnatomySegmentation",
    "AnatomyTaskConfig",
    "checkpoint_path",
]
