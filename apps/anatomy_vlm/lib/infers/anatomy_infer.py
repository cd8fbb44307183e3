"""Thin MONAI Label infer adapter for the Anatomy-VLM model.

Both served tasks (``anatomy_detection``: 29 region boxes; ``anatomy_segmentation``: 29 region
masks) are heads of one model and read one checkpoint. This adapter only translates between MONAI
Label's request/response and the library; all image reading, transforms and prediction belong in
``anatomy_vlm`` (the predictor lands with the model in the next issue).

Until a checkpoint exists the task answers every request with :class:`NoCheckpointError` (HTTP 503,
JSON ``{"detail": "no checkpoint yet: ..."}``), never with a made-up result. The checkpoint is
looked up at every call, so a checkpoint written while the server runs is seen without a restart.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from .errors import NoCheckpointError, PredictorMissingError

logger = logging.getLogger(__name__)


class AnatomyInfer(BasicInferTask):
    """One Anatomy-VLM output (boxes or masks) served as a MONAI Label infer task.

    Args:
        name: Task name as registered in the app (``anatomy_detection``, ...); used in messages.
        checkpoint: Path of the model checkpoint (may not exist yet).
        type: ``InferType.DETECTION`` or ``InferType.SEGMENTATION``.
        labels: ``{region name: label id}`` from the registry (``anatomy_vlm.anatomy.label_map()``).
        description: Shown by clients next to the model name.
        config: Extra user-tunable request defaults, shown in ``/info``.
    """

    def __init__(
        self,
        name: str,
        checkpoint: str,
        type: Union[str, InferType],
        labels: Dict[str, int],
        description: str,
        config: Optional[Dict[str, Any]] = None,
    ):
        super().__init__(
            path=checkpoint,
            network=None,
            type=type,
            labels=labels,
            dimension=2,
            description=description,
            config=config,
        )
        self.name = name
        self.checkpoint = checkpoint

    # -- what /info shows ------------------------------------------------------------------------
    def is_valid(self) -> bool:
        """Always listed: the task exists even before it has a checkpoint.

        ``MONAILabelApp.info()`` hides tasks whose ``is_valid()`` is false, and the stock
        ``BasicInferTask.is_valid`` is false while the checkpoint file is missing. Listing the task
        lets clients show it and get the explicit no-checkpoint error when they run it.
        """
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["checkpoint"] = {"path": self.checkpoint, "exists": os.path.isfile(self.checkpoint)}
        return info

    # -- the call ----------------------------------------------------------------------------------
    def no_checkpoint_message(self) -> str:
        return (
            f"no checkpoint yet: {self.name} has no trained model to run "
            f"(train one with `anatomy-vlm train` or put a checkpoint at {self.checkpoint})"
        )

    def __call__(self, request, callbacks=None) -> Tuple[Union[str, None], Dict]:
        """Run the task, or raise a clear error when it cannot run.

        Raises:
            NoCheckpointError: (HTTP 503) no file at ``self.checkpoint``.
            PredictorMissingError: (HTTP 501) a checkpoint exists but this version has no predictor.
        """
        if not os.path.isfile(self.checkpoint):
            raise NoCheckpointError(self.no_checkpoint_message())
        raise PredictorMissingError(
            f"checkpoint found at {self.checkpoint}, but this version of the app has no predictor "
            f"to run {self.name} yet (it arrives with the model)"
        )

    # BasicInferTask declares these abstract. The transform list will be written once, in the
    # library's transform factory shared by infer, train and validation (DESIGN section 3), and
    # returned from here; until then there is nothing to run.
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []
