"""Checkpoints: one file holding the model's weights, its config and metadata, written atomically.

Format (``torch.save`` of a dict)::

    {"format": "anatomy-vlm/1",
     "config": <resolved model config, see anatomy_vlm.model.build_model>,
     "state_dict": <model state dict, without the frozen pretrained encoder unless it was trained>,
     "meta": {"registry": REGISTRY_VERSION, "created": ISO time, "command": ..., "data": ...,
              "metrics": {...}, "epoch": ..., "version": ...}}

The file is written to a temporary name in the same folder and renamed, so a reader never sees a
half-written checkpoint and a crash leaves the previous one intact.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import torch

from .anatomy import REGISTRY_VERSION

FORMAT = "anatomy-vlm/1"


class CheckpointFormatError(ValueError):
    """The file is not an Anatomy-VLM checkpoint, or was made for another anatomy registry."""


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any] | None = None,
                    *, include_frozen_encoder: bool = False, extra: dict[str, Any] | None = None,
                    weights_dtype: str = "float32") -> Path:
    """Write ``model`` (an :class:`~anatomy_vlm.model.AnatomyVLM` built by ``build_model``) atomically.

    Args:
        include_frozen_encoder: Also store encoder weights whose parameters are all frozen (they can
            be rebuilt from the installed LiteMedSAM weights, so by default they are left out and the
            file stays small).
        extra: Additional top-level entries (e.g. optimizer state for resuming).
        weights_dtype: ``"float32"`` (default) or ``"float16"``: floating-point weights are stored in
            half precision (half the file; :func:`load_model` loads them into the float32 model, so
            inference runs in float32 as before). For shipped checkpoints, not for resuming.

    Raises:
        ValueError: an unknown ``weights_dtype``.
    """
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be 'float32' or 'float16', got {weights_dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    enc = getattr(model, "encoder", None)
    frozen_encoder = enc is not None and not any(p.requires_grad for p in enc.parameters())
    if frozen_encoder and not include_frozen_encoder:
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    if weights_dtype == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}  # weights trained channels-last are stored plain
    m = dict(meta or {})
    m["weights_dtype"] = weights_dtype
    m.setdefault("registry", REGISTRY_VERSION)
    m.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    m["encoder_in_file"] = not (frozen_encoder and not include_frozen_encoder)
    obj = {"format": FORMAT, "config": getattr(model, "config", None), "state_dict": state, "meta": m}
    if extra:
        obj.update(extra)
    return _save_atomic(obj, path)


def update_checkpoint_meta(path: str | os.PathLike, updates: dict[str, Any]) -> Path:
    """Merge ``updates`` into a checkpoint's ``meta`` and rewrite the file atomically (weights untouched).

    Raises:
        FileNotFoundError / CheckpointFormatError: as :func:`read_checkpoint`.
    """
    obj = read_checkpoint(path)
    obj["meta"] = dict(obj.get("meta") or {}, **updates)
    return _save_atomic(obj, Path(path))


def _save_atomic(obj: dict[str, Any], path: Path) -> Path:
    """``torch.save`` to a temporary name in the same folder, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint dict (see module docstring).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointFormatError: not a checkpoint of this project, or for another registry version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointFormatError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path} is not an Anatomy-VLM checkpoint (format {FORMAT})")
    reg = obj.get("meta", {}).get("registry")
    if reg != REGISTRY_VERSION:
        raise CheckpointFormatError(f"{path} was made for anatomy registry {reg!r}; this code has "
                                    f"{REGISTRY_VERSION!r}")
    return obj


def load_model(path: str | os.PathLike, map_location: str = "cpu"):
    """Build the model from a checkpoint's config and load its weights.

    Returns:
        ``(model, meta)`` with the model in eval mode.
    """
    from .model import build_model

    obj = read_checkpoint(path)
    model = build_model(obj["config"])
    missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    missing = [k for k in missing if not (k.startswith("encoder.") and not obj["meta"].get("encoder_in_file"))]
    if missing or unexpected:
        raise CheckpointFormatError(f"{path} does not match its config: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    return model.to(map_location).eval(), obj["meta"]
