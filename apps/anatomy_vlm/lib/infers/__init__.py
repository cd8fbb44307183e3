"""Infer adapters: thin ``BasicInferTask`` subclasses over the ``anatomy_vlm`` library."""

from .anatomy_infer import AnatomyInfer
from .errors import InferUnavailableError, NoCheckpointError, PredictorMissingError
from .language_infer import RegionFindingsInfer, TextGroundingInfer

__all__ = ["AnatomyInfer", "RegionFindingsInfer", "TextGroundingInfer", "InferUnavailableError", "NoCheckpointError", "PredictorMissingError"]
