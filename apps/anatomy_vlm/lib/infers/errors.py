"""Errors the infer adapters raise, shaped so that MONAI Label's REST layer reports them well.

MONAI Label 0.8.5 registers no exception handler on its FastAPI app: a plain exception (including
its own ``MONAILabelException``) raised inside ``POST /infer/{model}`` ends as a bare
``500 Internal Server Error`` text body, and the client never sees the message. FastAPI turns an
``HTTPException`` into a JSON response ``{"detail": message}`` with the given status, so these
errors are ``HTTPException`` *and* ``MONAILabelException`` at once: REST clients get the status and
the message, while code that runs the app in-process (``monailabel.interfaces.utils.app``, batch
infer) can still catch them as MONAI Label errors.
"""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException


class InferUnavailableError(HTTPException, MONAILabelException):
    """An infer task that is registered but cannot produce a result.

    Attributes:
        status_code: HTTP status sent to REST clients.
        detail: The message (also in ``msg``); the JSON body is ``{"detail": detail}``.
        error: ``MONAILabelError.INFERENCE_ERROR``.
    """

    status = 503

    def __init__(self, message: str):
        HTTPException.__init__(self, status_code=self.status, detail=message)
        MONAILabelException.__init__(self, MONAILabelError.INFERENCE_ERROR, message)

    def __str__(self) -> str:
        return self.detail


class NoCheckpointError(InferUnavailableError):
    """No checkpoint file exists at the configured path: 503 Service Unavailable.

    503 rather than 500 because nothing failed: the service exists but has no model to serve
    (the same code model servers such as TorchServe and KServe use for a model that is not ready).
    """

    status = 503


class PredictorMissingError(InferUnavailableError):
    """A checkpoint exists, but this version of the app has no predictor to run it: 501."""

    status = 501


class CheckpointUnusableError(InferUnavailableError):
    """A file exists at the checkpoint path but cannot be loaded (corrupt, other registry): 503."""

    status = 503


class InferRequestError(InferUnavailableError):
    """The request itself is wrong (unknown image id 404, unknown region 400, unreadable image 422)."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)
