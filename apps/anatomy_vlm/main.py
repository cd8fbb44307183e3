"""Anatomy-VLM Label: the MONAI Label app for chest X-ray anatomy.

Start it with ``./scripts/serve.sh`` or::

    monailabel start_server --app apps/anatomy_vlm --studies data/demo/studies \\
        --host 127.0.0.1 --port 8000 [--conf checkpoint PATH] [--conf models anatomy_detection]

App conf (``--conf KEY VALUE``):
    checkpoint: model checkpoint file (default ``apps/anatomy_vlm/model/anatomy_vlm.pt``).
    models: ``all`` (default) or a comma-separated list of task names from ``lib.configs.CONFIGS``.
    embedding_cache: encoder-output cache folder (``none``: memory only).
    prefetch_lookahead: after each active-learning pick, how many more unlabelled images to encode in
        the background (default 4; 0 = only the picked one).
    replay_demo: demo studies folder (holds ``manifest.json``) whose training split is replayed and whose
        validation split gates ``anatomy_finetune``; default the studies folder's parent when it is one,
        ``none`` for neither.
    warm_finetune: after the first saved label, encode in the background the demo images the next
        ``anatomy_finetune`` round reads (replay sample, val images) and each corrected image (default
        ``true``; ``false`` turns it off).

Layout as in MONAI Label's sample apps: ``lib/configs`` holds one ``TaskConfig`` per task,
``lib/infers`` / ``lib/trainers`` / ``lib/activelearning`` the thin adapters over the
``anatomy_vlm`` library. Labels, ids and colours come from the registry
(``anatomy_vlm.anatomy``), never from this app.

Datastore (a local studies folder): images ``*.dcm``, ``*.png``, ``*.jpg`` (and ``*.nii.gz``) in
the folder itself; labels in ``labels/<tag>/``: ``labels/final/<id>.nii.gz`` region masks and
``labels/boxes/<id>.boxes.json`` boxes. The app configures those extensions itself (MONAI Label's
default list has no ``*.dcm``), so no ``MONAI_LABEL_DATASTORE_FILE_EXT`` is needed.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import sys
import threading
from typing import Dict, Iterable, List

try:
    import anatomy_vlm
except ImportError:  # the library is not installed in this Python: use the repository checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import anatomy_vlm

from anatomy_vlm.anatomy import REGIONS, REGISTRY_VERSION, label_map
from lib.activelearning import First, Random, RegionUncertainty
from lib.datastore import AnatomyDatastore
from lib.configs import CONFIGS, AnatomyTaskConfig

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

APP_EXTENSIONS: tuple[str, ...] = ("*.dcm", "*.png", "*.jpg", "*.nii.gz", "*.boxes.json")
"""File patterns the local datastore lists, in the studies folder and in every ``labels/<tag>/``.

Boxes are ``*.boxes.json``, not ``*.json``: patterns are ``fnmatch``-ed against every file name in
the studies folder, and ``*.json`` would also match the datastore's own index file."""

_DATASTORE_INDEX = inspect.signature(LocalDatastore.__init__).parameters["datastore_config"].default


def datastore_extensions(extra: Iterable[str] = ()) -> List[str]:
    """The app's patterns followed by any others (e.g. from ``MONAI_LABEL_DATASTORE_FILE_EXT``),
    without duplicates and without patterns that would list the datastore's index file."""
    out: List[str] = []
    for pattern in (*APP_EXTENSIONS, *extra):
        if pattern in out:
            continue
        if fnmatch.fnmatch(_DATASTORE_INDEX, pattern):
            logger.warning(f"ignoring datastore pattern {pattern!r}: it matches {_DATASTORE_INDEX}")
            continue
        out.append(pattern)
    return out


def select_models(spec: str) -> List[str]:
    """Task names from the ``models`` conf value (``all`` or comma-separated names).

    Raises:
        ValueError: when a name is not a known task.
    """
    names = [n.strip() for n in (spec or "all").split(",") if n.strip()]
    if not names or "all" in names:
        return list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown} in --conf models; available: all, {', '.join(CONFIGS)}")
    return names


class AnatomyVLMApp(MONAILabelApp):
    """The MONAI Label app: 29-region chest X-ray anatomy (boxes and masks).

    Args:
        app_dir: This directory (``apps/anatomy_vlm``).
        studies: Studies folder (local datastore) or a DICOMweb URL.
        conf: App conf, string values (see the module docstring).
    """

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = dict(conf or {})
        self._warmed: set = set()  # encoder tags whose next-round demo images were queued for encoding
        self._warm_lock = threading.Lock()
        self.model_dir = os.path.join(app_dir, "model")
        self.models: Dict[str, AnatomyTaskConfig] = {}
        for name in select_models(conf.get("models", "all")):
            task_config = CONFIGS[name]()
            task_config.init(name, self.model_dir, conf, None)
            self.models[name] = task_config
        logger.info(f"+++ Using models: {list(self.models)}")

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Anatomy-VLM Label",
            description="Chest X-ray anatomy: boxes and masks for the 29 Chest ImaGenome regions",
            version=anatomy_vlm.__version__,
            labels=list(label_map()),
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            from lib.datastore import radiograph_dicomweb_datastore

            logger.info(f"DICOMweb datastore (DX and CR series): {self.studies}")
            return radiograph_dicomweb_datastore(self.studies)
        extensions = datastore_extensions(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        logger.info(f"Init local datastore for: {self.studies}; extensions: {extensions}")
        return AnatomyDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            box_offsets=self._served_box_offsets,
            on_saved=self._warm_finetune,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, task_config in self.models.items():
            task = task_config.infer()
            tasks = task if isinstance(task, dict) else {name: task}
            for key, value in tasks.items():
                logger.info(f"+++ Adding inferer: {key} => {value}")
                infers[key] = value
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        """``anatomy_finetune`` (one trainer for the one shared checkpoint), when any task is served and the
        datastore is a local studies folder."""
        from lib.trainers import AnatomyFinetune

        if not self.models or self.studies.startswith(("http://", "https://")):
            return {}
        cfg = next(iter(self.models.values()))
        demo = self.conf.get("replay_demo")
        if not demo:  # the demo builder's layout: <demo>/studies next to <demo>/manifest.json
            parent = os.path.dirname(os.path.abspath(self.studies))
            demo = parent if os.path.isfile(os.path.join(parent, "manifest.json")) else None
        elif str(demo).lower() == "none":
            demo = None
        return {"anatomy_finetune": AnatomyFinetune(cfg.path, demo, cfg.cache_dir)}

    def init_strategies(self) -> Dict[str, Strategy]:
        from anatomy_vlm.uncertainty import UncertaintyCache

        strategies: Dict[str, Strategy] = {"random": Random(), "first": First()}
        if self.models:
            cfg = next(iter(self.models.values()))
            root = os.path.join(os.path.dirname(cfg.cache_dir), "uncertainty") if cfg.cache_dir else None
            strategies["region_uncertainty"] = RegionUncertainty(self._predictor, UncertaintyCache(root))
        return strategies

    def _predictor(self):
        """The shared predictor of the app's checkpoint, or ``None`` when there is none yet."""
        from lib.infers.anatomy_infer import SharedPredictor

        cfg = next(iter(self.models.values()))
        return SharedPredictor.for_checkpoint(cfg.path, cfg.cache_dir).get()

    def _served_box_offsets(self):
        """The served checkpoint's box calibration offsets (mask corrections confirm boxes in its
        convention), or ``None``."""
        predictor = self._predictor()
        return None if predictor is None else predictor.box_calibration

    def _warm_finetune(self, image_id: str) -> None:
        """After a label is saved: in a background thread (the save's response does not wait for a
        checkpoint to load), :meth:`_queue_for_finetune`. App conf ``warm_finetune false`` turns it off."""
        if str(self.conf.get("warm_finetune", "true")).lower() in ("0", "false", "no", "off"):
            return
        threading.Thread(target=self._queue_for_finetune, args=(image_id,), name="anatomy-vlm-warm-finetune",
                         daemon=True).start()

    def _queue_for_finetune(self, image_id: str) -> int:
        """Queue the saved image and, the first time for the served encoder, the demo images the next
        fine-tuning round reads (replay sample and the gate's val images,
        :func:`anatomy_vlm.finetune.round_images`) for background encoding, so the first round does not
        wait for the encoder (about 0.5 s per image here). Returns how many images were queued; errors
        are logged (this is an optimisation)."""
        try:
            predictor = self._predictor()
            if predictor is None:
                return 0
            paths = [self.datastore().get_image_uri(image_id)]
            trainer = getattr(self, "_trainers", {}).get("anatomy_finetune")
            with self._warm_lock:
                first = trainer is not None and bool(trainer.demo_root) and predictor.cache.tag not in self._warmed
                if first:
                    self._warmed.add(predictor.cache.tag)
            if first:
                from anatomy_vlm.finetune import round_images

                paths += [str(p) for p in round_images(trainer.demo_root, trainer.config())]
            return predictor.prefetch(p for p in paths if p)
        except Exception as e:  # noqa: BLE001
            logger.warning(f"queueing images for the next fine-tuning round after saving {image_id}: {e}")
            return 0

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {}

    def next_sample(self, request):
        """MONAI Label's active-learning pick, then background encoding: the picked image first (the
        annotator runs a task on it next), then up to ``prefetch_lookahead`` (app conf, default 4) more
        unlabelled images in id order, so the encoder rarely stands between an annotator and a result."""
        res = super().next_sample(request)
        if res.get("path"):
            try:
                self.prefetch_next(res["path"], request)
            except Exception as e:  # noqa: BLE001 - prefetching is an optimisation, never an error
                logger.warning(f"prefetch after active learning failed: {e}")
        return res

    def prefetch_next(self, picked: str, request=None) -> int:
        """Queue ``picked`` and the next unlabelled local images for background encoding; returns how
        many were queued (0 when no checkpoint is loaded yet)."""
        if not self.models:
            return 0
        predictor = self._predictor()
        if predictor is None:
            return 0
        paths = [picked]
        n_more = int(self.conf.get("prefetch_lookahead", 4))
        if n_more > 0 and not self.studies.startswith(("http://", "https://")):
            request = request or {}
            ids = sorted(self.datastore().get_unlabeled_images(request.get("label_tag"), request.get("labels")))
            for image_id in ids:
                if len(paths) > n_more:
                    break
                uri = self.datastore().get_image_uri(image_id)
                if uri and os.path.abspath(uri) != os.path.abspath(picked):
                    paths.append(uri)
        return predictor.prefetch(paths)

    def info(self):
        meta = super().info()
        meta["registry_version"] = REGISTRY_VERSION
        meta["label_colors"] = {r.name: list(r.colour) for r in REGIONS}
        return meta
