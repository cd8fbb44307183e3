"""Thin MONAI Label infer adapters over :class:`anatomy_vlm.predict.Predictor`.

Both tasks (``anatomy_detection``, ``anatomy_segmentation``) read one checkpoint and share one
``Predictor`` per checkpoint file (:class:`SharedPredictor`): loaded on the first request, reloaded
when the file's mtime or size changes, and its embedding cache serves both tasks. Until a checkpoint
exists every request gets :class:`NoCheckpointError` (HTTP 503), never a made-up result.

What the stock 3D Slicer MONAI Label panel does with a result (read in ``Project-MONAI/MONAILabel``:
``plugins/slicer/MONAILabel/MONAILabel.py`` and ``MONAILabelLib/client.py``; MONAI Label 0.8.5's
``monailabel/transform/writer.py:DetectionWriter`` and ``monailabel/utils/others/detection.py``):

* The panel lists models of type ``segmentation`` (and, in the versions with detection support,
  ``detection``) under "Auto Segmentation"; "Run" POSTs ``/infer/<model>?image=<id>`` with the task's
  ``config`` values from ``/info`` as params (a list-valued config sends its first item), saves the
  multipart file part under the *file name the server gave it* and calls
  ``updateSegmentationMask(result_file, label_names)``, which dispatches on that name:
    - ``*.seg.nrrd`` and the user's "File Extension" setting is ``.seg.nrrd``:
      ``LoadSegmentationFromFile`` and a deep copy into the panel's segmentation node: all segments
      with their names, colours and overlapping layers (the settings page itself says overlapping
      segments need ``.seg.nrrd``);
    - ``*.json``: ``slicer.util.loadMarkups(file)``, then every ``vtkMRMLMarkupsROINode`` except
      "Scribbles ROI" is renamed "Detection ROI - <i>" (so region names must also live in the control
      point label / description, which the panel keeps);
    - anything else: ``sitk.ReadImage`` -> one label map, segments named from ``params["label_names"]``
      (or the model's ``labels``) ordered by label value: overlap cannot survive this path.
* MONAI Label's own detection output is exactly such a ``.json``: ``DetectionWriter`` writes a Slicer
  markups file (schema markups-schema-v1.0.3, ``coordinateSystem`` LPS, ``roiType`` Box, ``center`` /
  ``size`` in mm, orientation ``diag(-1, -1, 1)``) and returns ``{"box": [[cx, cy, cz, sx, sy, sz]...],
  "label": [...]}`` as the result JSON.

So ``anatomy_detection`` returns a markups ROI JSON file (one box ROI per region, region name as node
name, control point label and description, registry colour) plus the JSON ``regions`` / ``boxes``
(``[x0, y0, x1, y1]`` pixels) / ``labels`` / ``scores`` and MONAI's ``box`` / ``label``;
``anatomy_segmentation`` returns a multi-layer ``.seg.nrrd`` (``label_format`` ``seg.nrrd``, default)
or, for the panel's default ``.nii.gz`` setting, a flat label map (``label_format`` ``nii.gz``;
smallest region wins where regions overlap). Both are placed with the image geometry ITK reads from the
image file, which is how Slicer loads the image (``anatomy_vlm.predict.ImageGeometry``).

Request parameters: ``regions`` (list or comma-separated names; default all), ``label_format``
(segmentation: ``seg.nrrd``, ``nii.gz`` or ``dcm`` = DICOM SEG; detection: ``json`` = the Slicer ROI
file or ``dcm`` = a DICOM SR measurement report with the boxes and, with a language stage, each region's
top findings; ``dcm`` needs a DICOM image, :mod:`anatomy_vlm.dicom_out`), ``refine_boxes`` (detection:
mask-refined boxes, slower), ``store`` (with ``dcm`` and a DICOMweb datastore: STOW the SEG / SR
to the DICOMweb server, e.g. Orthanc, where OHIF finds it with the study), ``seg_geometry`` (DICOM SEG
of a radiograph without plane geometry: ``source`` = none, as the image; ``viewer`` = the geometry OHIF's
cornerstone assumes for the image, which OHIF needs to display a SEG; default ``viewer`` when storing,
``source`` otherwise; :func:`anatomy_vlm.dicom_out.write_seg`). Bad requests get HTTP 4xx
JSON errors (:class:`InferRequestError`): unknown image id 404, unknown region 400, unreadable image 422.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from .errors import CheckpointUnusableError, InferRequestError, NoCheckpointError

logger = logging.getLogger(__name__)

LABEL_FORMATS = ("seg.nrrd", "nii.gz", "dcm")
"""Segmentation outputs: multi-layer .seg.nrrd, flat label map, DICOM SEG (DICOM sources only)."""
DETECTION_FORMATS = ("json", "dcm")
"""Detection outputs: Slicer ROI markups JSON, DICOM SR measurement report (DICOM sources only)."""


def _first(value: Any) -> Any:
    """A request option's value; a list (the /info default a client echoes back) gives its first item."""
    return (value[0] if value else None) if isinstance(value, (list, tuple)) else value


def label_format(req: Dict[str, Any], formats: Sequence[str]) -> str:
    """The request's ``label_format`` among ``formats`` (default the first); 400 otherwise."""
    fmt = str(_first(req.get("label_format")) or formats[0]).lstrip(".")
    if fmt not in formats:
        raise InferRequestError(f"unknown label_format {fmt!r}; choose one of {list(formats)}", 400)
    return fmt


def flag(req: Dict[str, Any], key: str) -> bool:
    """A boolean request option (``true``/``1``/``yes``, any case)."""
    return str(req.get(key, False)).lower() in ("1", "true", "yes")


def seg_geometry_of(req: Dict[str, Any], stored: bool) -> str:
    """The request's ``seg_geometry`` (default ``viewer`` when the SEG is stored for OHIF, else ``source``)."""
    from anatomy_vlm.dicom_out import SEG_GEOMETRIES

    value = str(_first(req.get("seg_geometry")) or ("viewer" if stored else "source"))
    if value not in SEG_GEOMETRIES:
        raise InferRequestError(f"unknown seg_geometry {value!r}; choose one of {list(SEG_GEOMETRIES)}", 400)
    return value


def dicomweb_url() -> str:
    """The app's DICOMweb server (``--studies``); 400 when the datastore is a local folder."""
    from monailabel.config import settings

    url = str(settings.MONAI_LABEL_STUDIES or "")
    if not url.startswith(("http://", "https://")):
        raise InferRequestError("store needs a DICOMweb datastore (start the server with --studies "
                                "http://HOST:PORT/dicom-web)", 400)
    return url


def store_dicomweb(path: str, url: str) -> Dict[str, str]:
    """STOW-RS ``path`` (a SEG or SR) to the DICOMweb server at ``url``; 502 when it refuses."""
    import pydicom
    from dicomweb_client import DICOMwebClient

    ds = pydicom.dcmread(path)
    try:
        DICOMwebClient(url=url).store_instances([ds])
    except Exception as e:  # noqa: BLE001 - any transport or HTTP error of the DICOMweb server
        raise InferRequestError(f"the DICOMweb server at {url} did not store the {ds.Modality}: {e}", 502) from e
    return {"url": url, "StudyInstanceUID": str(ds.StudyInstanceUID), "SeriesInstanceUID": str(ds.SeriesInstanceUID),
            "SOPInstanceUID": str(ds.SOPInstanceUID), "Modality": str(ds.Modality)}


def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


class SharedPredictor:
    """One ``Predictor`` per checkpoint path, shared by the tasks, reloaded when the file changes."""

    _instances: Dict[str, "SharedPredictor"] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_checkpoint(cls, checkpoint: str, cache_dir: Optional[str]) -> "SharedPredictor":
        key = os.path.realpath(checkpoint)
        with cls._instances_lock:
            if key not in cls._instances:
                cls._instances[key] = cls(checkpoint, cache_dir)
            return cls._instances[key]

    def __init__(self, checkpoint: str, cache_dir: Optional[str]):
        self.checkpoint, self.cache_dir = checkpoint, cache_dir
        self._predictor = None
        self._stamp = None
        self._lock = threading.Lock()

    def get(self):
        """The predictor for the checkpoint as it is now on disk (raises 503 errors when there is none)."""
        from anatomy_vlm.checkpoint import CheckpointFormatError
        from anatomy_vlm.predict import Predictor

        try:
            st = os.stat(self.checkpoint)
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._predictor is None or stamp != self._stamp:
                logger.info(f"loading checkpoint {self.checkpoint}")
                try:
                    self._predictor = Predictor.from_checkpoint(self.checkpoint, cache_dir=self.cache_dir)
                except (CheckpointFormatError, OSError, ValueError, RuntimeError) as e:
                    self._predictor = None
                    raise CheckpointUnusableError(f"checkpoint at {self.checkpoint} cannot be used: {e}") from e
                self._stamp = stamp
            return self._predictor


class AnatomyInfer(BasicInferTask):
    """One Anatomy-VLM output (boxes or masks) served as a MONAI Label infer task.

    Args:
        name: Task name as registered in the app (``anatomy_detection``, ...); used in messages.
        checkpoint: Path of the model checkpoint (may not exist yet).
        type: ``InferType.DETECTION`` or ``InferType.SEGMENTATION``.
        labels: ``{region name: label id}`` from the registry (``anatomy_vlm.anatomy.label_map()``).
        description: Shown by clients next to the model name.
        config: User-tunable request defaults, shown in ``/info`` (the Slicer panel's options table).
        cache_dir: Embedding cache folder (``None``: memory only).
    """

    def __init__(
        self,
        name: str,
        checkpoint: str,
        type: Union[str, InferType],
        labels: Dict[str, int],
        description: str,
        config: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
    ):
        super().__init__(path=checkpoint, network=None, type=type, labels=labels, dimension=2,
                         description=description, config=config)
        self.name = name
        self.checkpoint = checkpoint
        self.cache_dir = cache_dir
        self.shared = SharedPredictor.for_checkpoint(checkpoint, cache_dir)

    # -- what /info shows ------------------------------------------------------------------------
    def is_valid(self) -> bool:
        """Always listed, even before a checkpoint exists (then the call says "no checkpoint yet")."""
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

    def predictor(self):
        predictor = self.shared.get() if os.path.isfile(self.checkpoint) else None
        if predictor is None:
            raise NoCheckpointError(self.no_checkpoint_message())
        return predictor

    # -- request parts shared by the tasks --------------------------------------------------------------
    def request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The task's config defaults overlaid with the request."""
        req = dict(self._config)
        req.update(request)
        return req

    @staticmethod
    def image_path(req: Dict[str, Any]) -> str:
        """The request's image file (the datastore resolves ids to paths); 404 when there is none."""
        image = req.get("image")
        if not isinstance(image, str) or not image or not os.path.isfile(image):
            raise InferRequestError(
                "unknown image: the datastore has no image with this id" if not image
                else f"unknown image {image!r}", status=404)
        return image

    @staticmethod
    def region_indices(req: Dict[str, Any]):
        """0-based region indices of the ``regions`` parameter (default all); 400 for an unknown one."""
        from anatomy_vlm.predict import resolve_regions

        try:
            return resolve_regions(req.get("regions") or None)
        except ValueError as e:
            raise InferRequestError(str(e), status=400) from e

    @staticmethod
    def run_predict(predictor, image: str, **kwargs):
        """``predictor.predict(image, **kwargs)``; an unreadable image is a 422."""
        from anatomy_vlm.io import ImageReadError

        try:
            return predictor.predict(image, **kwargs)
        except ImageReadError as e:
            raise InferRequestError(f"cannot read the image: {e}", status=422) from e

    def __call__(self, request, callbacks=None) -> Tuple[Union[str, None], Dict]:
        """Run the task: ``(result file, result JSON)``.

        Raises:
            NoCheckpointError / CheckpointUnusableError: (503) no usable checkpoint.
            InferRequestError: (4xx) unknown image, unknown region, unreadable image, bad parameter.
        """
        from anatomy_vlm.predict import image_geometry, write_flat_labelmap, write_seg_nrrd, write_slicer_roi_markups

        predictor = self.predictor()
        req = self.request(request)
        image = self.image_path(req)
        indices = self.region_indices(req)
        detection = self.type == InferType.DETECTION
        fmt = label_format(req, DETECTION_FORMATS if detection else LABEL_FORMATS)
        if fmt == "dcm" and not _is_dicom(image):
            raise InferRequestError("label_format dcm (DICOM SEG / SR) needs a DICOM image; this one is "
                                    f"{os.path.basename(image)}", 400)
        refine = flag(req, "refine_boxes")
        store_url = dicomweb_url() if fmt == "dcm" and flag(req, "store") else None  # checked before any work
        seg_geometry = seg_geometry_of(req, stored=bool(store_url))
        align = detection and fmt == "dcm" and predictor.has_language  # findings go into the SR
        pred = self.run_predict(predictor, image, with_masks=(not detection) or refine, regions=[i + 1 for i in indices],
                                align=align)
        geometry = image_geometry(image, pred.image_shape)
        result = pred.to_json()
        result.update({
            "boxes": [r["box"] for r in result["regions"]],
            "labels": [r["name"] for r in result["regions"]],
            "label_ids": [r["id"] for r in result["regions"]],
            "scores": [r["score"] for r in result["regions"]],
            "latencies": pred.timing,
        })
        if fmt == "dcm":
            from anatomy_vlm import dicom_out

            fd, out = tempfile.mkstemp(suffix=".dcm", prefix=f"{self.name}_")
            os.close(fd)
            if detection:
                found = None
                if align:
                    from anatomy_vlm.findings import region_findings

                    found = region_findings(pred, predictor.language(), top_k=3)
                    result["findings"] = found["findings"]
                dicom_out.write_sr(pred, image, out, found)
                result["format"] = "dicom-sr"
            else:
                dicom_out.write_seg(pred, image, out, geometry=seg_geometry)
                result["format"] = "dicom-seg"
            if store_url:
                result["stored"] = store_dicomweb(out, store_url)
            return out, result
        if detection:
            fd, out = tempfile.mkstemp(suffix=".json", prefix="anatomy_detection_")
            os.close(fd)
            write_slicer_roi_markups(pred, geometry, out)
            import json as _json

            with open(out, encoding="utf-8") as fh:
                doc = _json.load(fh)
            result["box"] = [m["center"] + m["size"] for m in doc["markups"]]  # MONAI DetectionWriter form
            result["label"] = result["labels"]
            result["label_names"] = {r["name"]: r["id"] for r in result["regions"]}
            result["format"] = "slicer-markups-roi-json"
            return out, result
        fd, out = tempfile.mkstemp(suffix="." + fmt, prefix="anatomy_segmentation_")
        os.close(fd)
        if fmt == "seg.nrrd":
            _, segments = write_seg_nrrd(pred, geometry, out)
            result["segments"] = segments
            result["label_names"] = {r["name"]: r["id"] for r in result["regions"]}
        else:  # label values 1..N in request order: the panel maps value k to the k-th name
            values = list(range(1, len(pred.indices) + 1))
            write_flat_labelmap(pred, geometry, out, values=values)
            result["label_names"] = {n: v for n, v in zip(pred.names, values)}
        result["format"] = fmt
        return out, result

    # BasicInferTask declares these abstract; all work happens in anatomy_vlm.predict.
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []
