"""Active-learning strategies.

MONAI Label's stock strategies ``random`` (unlabelled images, weighted towards those not offered
recently) and ``first`` (the first unlabelled image by id), and ``region_uncertainty``
(:mod:`.region_uncertainty`, over ``anatomy_vlm.uncertainty``).
"""

from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from .region_uncertainty import RegionUncertainty

__all__ = ["First", "Random", "RegionUncertainty"]
