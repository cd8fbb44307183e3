"""Shared base of the task configs: labels from the registry, one checkpoint for all tasks."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask

from anatomy_vlm.anatomy import REGIONS, label_map
from ..infers import AnatomyInfer

CHECKPOINT_FILENAME = "anatomy_vlm.pt"
"""Default checkpoint file name inside the app's ``model/`` directory."""


def checkpoint_path(model_dir: str, conf: Optional[Dict[str, str]]) -> str:
    """Where the app looks for the model checkpoint.

    Args:
        model_dir: The app's model directory (``apps/anatomy_vlm/model``).
        conf: The app conf (``--conf checkpoint PATH`` on ``monailabel start_server``); a relative
            ``PATH`` is taken relative to the server's working directory.

    Returns:
        An absolute path; the file need not exist.
    """
    chosen = (conf or {}).get("checkpoint")
    if chosen:
        return os.path.abspath(os.path.expanduser(str(chosen)))
    return os.path.abspath(os.path.join(model_dir, CHECKPOINT_FILENAME))


def embedding_cache_dir(conf: Optional[Dict[str, str]]) -> Optional[str]:
    """Encoder-output cache folder: ``--conf embedding_cache PATH`` (``none`` = memory only), default
    ``$ANATOMY_VLM_CACHE/embeddings`` or ``~/.cache/anatomy_vlm/embeddings``."""
    chosen = (conf or {}).get("embedding_cache")
    if chosen and str(chosen).lower() == "none":
        return None
    if chosen:
        return os.path.abspath(os.path.expanduser(str(chosen)))
    base = os.environ.get("ANATOMY_VLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "anatomy_vlm")
    return os.path.join(base, "embeddings")


class AnatomyTaskConfig(TaskConfig):
    """One MONAI Label task over the shared Anatomy-VLM model.

    Subclasses set ``infer_type`` and ``task_description``; everything else (labels, colours,
    checkpoint) comes from the registry and the app conf.
    """

    infer_type: InferType = InferType.OTHERS
    task_description: str = ""
    infer_config: Dict[str, Any] = {}
    """Request defaults shown in ``/info`` (the stock Slicer panel's options table sends them)."""
    infer_class = AnatomyInfer
    """The adapter class (``lib/infers``)."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.labels = label_map()
        self.label_colors = {r.name: r.colour for r in REGIONS}
        self.path = checkpoint_path(model_dir, conf)
        self.cache_dir = embedding_cache_dir(conf)

    def infer(self) -> InferTask:
        return self.infer_class(
            name=self.name,
            checkpoint=self.path,
            type=self.infer_type,
            labels=self.labels,
            description=self.task_description,
            config=dict(self.infer_config),
            cache_dir=self.cache_dir,
        )

    def trainer(self) -> Optional[TrainTask]:
        # The trainer arrives with the model (lib/trainers); registering a stand-in would let
        # clients start a "training" that trains nothing.
        return None
