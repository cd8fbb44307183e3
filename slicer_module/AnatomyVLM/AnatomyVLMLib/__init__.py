"""Slicer-free parts of the AnatomyVLM 3D Slicer module: the MONAI Label REST client."""

from .client import AnatomyVLMClient, ClientError, InferResult

__all__ = ["AnatomyVLMClient", "ClientError", "InferResult"]
