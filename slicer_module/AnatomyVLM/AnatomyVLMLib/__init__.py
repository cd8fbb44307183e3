"""Slicer-free parts of the AnatomyVLM 3D Slicer module: the MONAI Label REST client and what the widget
shows (tables, highlights, progress) computed from the server's answers."""

from .client import AnatomyVLMClient, ClientError, InferResult
from .views import grounding_emphasis, image_finding_rows, input_check_text, region_rows, training_progress

__all__ = ["AnatomyVLMClient", "ClientError", "InferResult", "grounding_emphasis", "image_finding_rows",
           "input_check_text", "region_rows", "training_progress"]
