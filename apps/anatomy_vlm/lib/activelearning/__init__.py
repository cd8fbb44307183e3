"""Active-learning strategies.

For now MONAI Label's stock strategies: ``random`` (unlabelled images, weighted towards those not
offered recently) and ``first`` (the first unlabelled image by id). An uncertainty strategy over
``anatomy_vlm.uncertainty`` comes with the model.
"""

from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

__all__ = ["First", "Random"]
