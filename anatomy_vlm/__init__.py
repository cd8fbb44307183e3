"""Anatomy-VLM Label: anatomy-aware vision-language assistance for chest X-ray annotation.

The library imports nothing from monailabel; the MONAI Label app in ``apps/anatomy_vlm`` is a thin
adapter over it.
"""

from __future__ import annotations

__version__ = "0.1.0"
