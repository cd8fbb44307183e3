"""Trainer adapters: ``anatomy_finetune`` over :mod:`anatomy_vlm.finetune`."""

from .anatomy_finetune import AnatomyFinetune

__all__ = ["AnatomyFinetune"]
