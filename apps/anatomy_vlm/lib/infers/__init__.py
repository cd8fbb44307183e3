"""Infer adapters: thin ``BasicInferTask`` subclasses over the ``anatomy_vlm`` library."""

from .anatomy_infer import AnatomyInfer
from .errors import InferUnavailableError, NoCheckpointError, PredictorMissingError

__all__ = ["AnatomyInfer", "InferUnavailableError", "NoCheckpointError", "PredictorMissingError"]
