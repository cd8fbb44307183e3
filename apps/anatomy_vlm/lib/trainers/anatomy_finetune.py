"""``anatomy_finetune``: one fine-tuning round on the datastore's corrected studies (thin adapter).

``POST /train/anatomy_finetune`` runs it in MONAI Label's background process (a separate Python
process, ``monailabel.interfaces.utils.app -m train``; the server keeps answering infer calls). The
round (:func:`anatomy_vlm.finetune.finetune_round`) fine-tunes the served checkpoint on the corrected
studies with replay of demo training studies, writes a new version under ``model/versions/``, validates
candidate and served model on held-out corrected studies and the demo validation split, and replaces the
served file only when neither figure falls by more than ``tolerance``; the infer tasks load it on their
next call (mtime check), without a restart. ``{"restore_version": "v0003"}`` serves an earlier version
instead of training.

Progress and the last result are in ``GET /info`` -> ``train_stats.anatomy_finetune`` (read from
``model/versions/train_stats.json``, which the round rewrites atomically at each stage) and in the
task's log lines (``GET /train/``). A round killed mid-way (even with SIGKILL) leaves the served file
untouched: everything it writes goes to a temporary name first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class AnatomyFinetune(TrainTask):
    """See the module docstring.

    Args:
        checkpoint: The served checkpoint file.
        demo_root: Demo studies folder for replay and validation (``None``: neither).
        cache_dir: The server's embedding cache (shared, so served images are not encoded again).
    """

    def __init__(self, checkpoint: str, demo_root: Optional[str], cache_dir: Optional[str]):
        super().__init__("Anatomy-VLM: fine-tune on the corrected regions (replay, versioned, validation-gated)")
        from anatomy_vlm.finetune import ModelVersions

        self.checkpoint, self.demo_root, self.cache_dir = checkpoint, demo_root, cache_dir
        self.versions = ModelVersions(checkpoint)
        self.stats_path = os.path.join(os.path.dirname(checkpoint), "versions", "train_stats.json")

    def config(self) -> Dict[str, Any]:
        from anatomy_vlm.finetune import FINETUNE_DEFAULTS

        return dict(FINETUNE_DEFAULTS, restore_version="")

    def stats(self) -> Dict[str, Any]:
        try:
            with open(self.stats_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def _write_stats(self, stats: Dict[str, Any]) -> None:
        from pathlib import Path

        from anatomy_vlm.io import write_json_atomic

        Path(self.stats_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(dict(stats, updated=time.strftime("%Y-%m-%d %H:%M:%S")), self.stats_path)
        print(f"anatomy_finetune: {json.dumps(stats)[:2000]}", flush=True)  # the task's log lines

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        from anatomy_vlm.finetune import FINETUNE_DEFAULTS, finetune_round

        restore = str(request.get("restore_version") or "").strip()
        if restore:
            self.versions.restore(restore)
            result = {"stage": "restored", "served": self.versions.served(), "versions": self.versions.index()}
            self._write_stats(result)
            return result
        settings = {k: request[k] for k in FINETUNE_DEFAULTS if k in request}
        studies = getattr(datastore, "_datastore_path", None)
        if not studies:
            raise ValueError("anatomy_finetune needs a local studies folder (a DICOMweb datastore is not supported yet)")
        self._write_stats({"stage": "starting", "served": self.versions.served()})
        try:
            result = finetune_round(studies, self.checkpoint, self.demo_root, settings, cache_dir=self.cache_dir,
                                    progress=self._write_stats)
        except Exception as e:
            self._write_stats({"stage": "failed", "error": str(e), "served": self.versions.served()})
            raise
        return result
