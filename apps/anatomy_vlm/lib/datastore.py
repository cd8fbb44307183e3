"""The app's local datastore: MONAI Label's, with corrected labels validated and stored atomically.

``PUT /datastore/label`` ends in :meth:`AnatomyDatastore.save_label`. Here, before anything is written:

* the image id must be a plain id (no paths, no ``..``: 400) of an image in the datastore (404);
* a JSON label is a box correction (the project's box form or the Slicer ROI markups JSON, see
  :mod:`anatomy_vlm.labels`): validated against the image's size and geometry (400 with the reason), merged
  with the image's current box label (regions not touched keep their boxes; touched ones are listed as
  confirmed with who and when), and stored as ``labels/boxes/<id>.boxes.json``;
* a NIfTI mask label must have the image's size (400 otherwise): ``(29, H, W)`` region masks or an
  ``(H, W)`` label map of region ids. A ``final`` mask label is a mask correction: the regions it corrects
  (``regions`` in the request's ``params``, default every region with a non-empty mask) are confirmed
  in the box label with their masks' bounding boxes and listed under ``confirmed_masks``, so the trainer
  learns those masks (and only those). When the served checkpoint has a box calibration (its boxes are
  mask boxes shifted per region into the reference boxes' convention), the confirmed boxes are shifted the
  same way (``box_offsets``, :func:`anatomy_vlm.labels.mask_correction`): a mask correction and a box
  correction confirm boxes of one convention.

Files are written to a temporary name in the label folder and renamed, under the datastore's lock, so a
reader never sees a half-written label and a crash leaves the previous one intact. MONAI Label's own
``shutil.copy`` into place is not used for that reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Optional

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from anatomy_vlm.labels import LabelError, check_id, merge_box_label, parse_box_correction

logger = logging.getLogger(__name__)

BOX_TAG = "boxes"
BOX_EXT = ".boxes.json"


class AnatomyDatastore(LocalDatastore):
    """See the module docstring.

    Args:
        box_offsets: Called at each mask correction; returns the served checkpoint's ``(29, 4)`` box
            calibration offsets, or ``None`` (no checkpoint, or one without a calibration).
        on_saved: Called with the image id after each label is stored (the app queues background encoding
            for the next fine-tuning round there); its errors are logged, never the request's.
        Other arguments are :class:`LocalDatastore`'s.
    """

    def __init__(self, *args, box_offsets: Optional[Callable[[], Any]] = None,
                 on_saved: Optional[Callable[[str], None]] = None, **kwargs):
        self._box_offsets = box_offsets
        self._on_saved = on_saved
        super().__init__(*args, **kwargs)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        result = self._save_label(image_id, label_filename, label_tag, label_info)
        if self._on_saved is not None:
            try:
                self._on_saved(image_id)
            except Exception as e:  # noqa: BLE001 - the label is stored; what follows is an optimisation
                logger.warning(f"after saving the label of {image_id}: {e}")
        return result

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        label_info = dict(label_info or {})
        try:
            check_id(image_id)
        except LabelError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        name = os.path.basename(label_filename).lower()
        image_path = self.get_image_uri(image_id)
        if name.endswith(".json"):
            # box corrections live under the "boxes" tag; the stock panel's default tag is "final"
            tag = BOX_TAG if label_tag in (None, "", "final") else label_tag
            return self._save_boxes(image_id, image_path, label_filename, tag, label_info, obj)
        ext = self._to_id(os.path.basename(label_filename))[1]
        if name.endswith((".nii", ".nii.gz")):
            self._check_nifti(image_path, label_filename)
            if (label_tag or "final") == "final":
                return self._save_masks(image_id, label_filename, ext, label_info, obj)
        return self._store(image_id, obj, label_filename, label_tag or "final", ext, label_info)

    # -- masks -----------------------------------------------------------------------------------------
    def _save_masks(self, image_id, label_filename, ext, label_info, obj) -> str:
        """A corrected mask label (``final``): stored atomically, and the regions it corrects (``regions``
        in the request's params, default every non-empty one) are confirmed in the box label with their
        masks' boxes and listed under ``confirmed_masks``, both under one lock."""
        from anatomy_vlm.io import ImageReadError, read_mask_label
        from anatomy_vlm.labels import check_mask_shape, mask_correction

        try:
            masks = read_mask_label(label_filename)
        except ImageReadError as e:
            raise HTTPException(status_code=400, detail=f"the mask label cannot be read: {e}") from None
        try:
            check_mask_shape(masks, masks.shape[-2:])  # (the size was checked against the image above)
            corr = mask_correction(masks, label_info.get("regions") or None, box_offsets=self._served_offsets())
        except LabelError as e:
            raise HTTPException(status_code=400, detail=f"mask label: {e}") from None
        user = str(label_info.get("user") or label_info.get("client_id") or "unknown")
        when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with FileLock(self._lock_file):
            self._store(image_id, obj, label_filename, "final", ext, dict(label_info, user=user), locked=True)
            return self._merge_boxes(image_id, obj, BOX_TAG, corr, user, when, dict(label_info), masks=True)

    def _served_offsets(self):
        if self._box_offsets is None:
            return None
        try:
            return self._box_offsets()
        except Exception as e:  # an unusable checkpoint: the plain mask boxes, and the log says why
            logger.warning(f"mask correction: no box calibration from the served checkpoint ({e}); plain mask boxes")
            return None

    # -- boxes ---------------------------------------------------------------------------------------
    def _save_boxes(self, image_id, image_path, label_filename, tag, label_info, obj) -> str:
        from anatomy_vlm.io import ImageReadError, read_image
        from anatomy_vlm.predict import image_geometry

        try:
            shape = tuple(read_image(image_path).pixels.shape)
        except ImageReadError as e:
            raise HTTPException(status_code=422, detail=f"image {image_id!r} cannot be read: {e}") from None
        with open(label_filename, "rb") as fh:
            raw = fh.read()
        try:
            geometry = image_geometry(image_path, shape) if b'"markups"' in raw else None
            corr = parse_box_correction(raw, shape, geometry)
        except LabelError as e:
            raise HTTPException(status_code=400, detail=f"box correction for {image_id!r}: {e}") from None
        user = str(label_info.get("user") or label_info.get("client_id") or "unknown")
        when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with FileLock(self._lock_file):
            return self._merge_boxes(image_id, obj, tag, corr, user, when, label_info)

    def _merge_boxes(self, image_id, obj, tag, corr, user, when, label_info, masks: bool = False) -> str:
        """Merge a box correction into the stored box label (call with the datastore lock held)."""
        previous = None
        current = os.path.join(self._datastore.label_path(tag), self._filename(image_id, BOX_EXT))
        if os.path.isfile(current):
            try:
                with open(current) as fh:
                    previous = json.load(fh)
            except (OSError, ValueError):
                logger.warning(f"{current}: unreadable previous box label, replaced by the correction")
        merged = merge_box_label(previous, corr, image_id, user, when, masks=masks)
        fd, tmp = tempfile.mkstemp(suffix=BOX_EXT)
        with os.fdopen(fd, "w") as fh:
            json.dump(merged, fh, indent=1)
        try:
            label_info.update({"confirmed_regions": corr.regions, "user": user})
            return self._store(image_id, obj, tmp, tag, BOX_EXT, label_info, locked=True)
        finally:
            os.unlink(tmp)

    @staticmethod
    def _check_nifti(image_path: str, label_filename: str) -> None:
        import nibabel as nib

        from anatomy_vlm.io import ImageReadError, read_image
        from anatomy_vlm.labels import check_mask_dims

        try:
            H, W = read_image(image_path).pixels.shape
        except ImageReadError as e:
            raise HTTPException(status_code=422, detail=f"the image cannot be read: {e}") from None
        try:
            shape = tuple(int(s) for s in nib.load(label_filename).shape)
        except Exception as e:  # noqa: BLE001 - any header error: not a NIfTI mask
            raise HTTPException(status_code=400, detail=f"the mask label is not a readable NIfTI file: {e}") from None
        # our masks are stored x = column, y = row: (W, H[, K]); a trailing singleton axis is allowed
        dims = [s for i, s in enumerate(shape) if not (i >= 2 and s == 1)]
        arr_shape = tuple(reversed(dims))  # (W, H[, K]) -> ([K,] H, W)
        try:
            check_mask_dims(arr_shape, (H, W))
        except LabelError as e:
            raise HTTPException(status_code=400, detail=f"mask label: {e}") from None

    # -- atomic store ----------------------------------------------------------------------------------
    def _store(self, image_id, obj, src, tag, ext, label_info, locked: bool = False) -> str:
        """Copy ``src`` into ``labels/<tag>/<id><ext>`` through a temporary file and a rename, and record it
        in the datastore index (what LocalDatastore.save_label does, minus the in-place copy)."""
        if not locked:
            with FileLock(self._lock_file):
                return self._store(image_id, obj, src, tag, ext, label_info, locked=True)
        label_path = self._datastore.label_path(tag)
        os.makedirs(label_path, exist_ok=True)
        name = self._filename(image_id, ext)
        dest = os.path.join(label_path, name)
        fd, tmp = tempfile.mkstemp(dir=label_path, prefix=".saving-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        label_info = dict(label_info)
        label_info["ts"] = int(time.time())
        label_info["name"] = name
        obj.labels[tag] = DataModel(info=label_info, ext=ext)
        self._update_datastore_file(lock=False)
        return image_id


# ---- DICOMweb (Orthanc, any PACS with QIDO/WADO/STOW) ------------------------------------------------------
def radiograph_dicomweb_datastore(url: str):
    """MONAI Label's DICOMweb datastore for chest radiographs: DX and CR series are the images (MONAI
    Label's default search lists CT only, and QIDO servers such as Orthanc do not match a list of
    modalities in one query), DICOM files are kept as they are (no NIfTI conversion: the app reads DICOM
    itself and references the instances from its SEG and SR)."""
    from cachetools import TTLCache, cached
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.config import settings
    from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
    from pydicom.dataset import Dataset

    def unreachable(what: str, e: Exception) -> HTTPException:
        return HTTPException(status_code=502, detail=f"the DICOMweb server at {url} could not {what}: {e}")

    class RadiographDICOMWebDatastore(DICOMWebDatastore):
        """DX and CR series as images; a DICOMweb server that is down or refuses is an HTTP 502 with the
        reason (MONAI Label's own datastore lets it end as a bare 500)."""

        MODALITIES = ("DX", "CR")

        @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
        def _list(self):
            series = []
            for modality in self.MODALITIES:
                for ds in self._client.search_for_series(search_filters=dict(self._search_filter, Modality=modality)):
                    uid = str(Dataset.from_json(ds)["SeriesInstanceUID"].value)
                    if uid not in series:
                        series.append(uid)
            return series

        _last = None

        def list_images(self):
            try:
                self._last = self._list()
                return self._last
            except Exception as e:  # noqa: BLE001 - transport or HTTP errors of the server
                if self._last is not None:  # the server went away mid-session: the last list, said in the log
                    logger.warning(f"DICOMweb server at {url} unreachable ({e}); using the last series list")
                    return self._last
                raise unreachable("list the DX/CR series", e) from e

        def get_image_uri(self, image_id: str) -> str:
            """The series' DICOM file (MONAI Label downloads a series into a folder; a radiograph series
            is one instance, the first file in name order otherwise)."""
            try:
                uri = super().get_image_uri(image_id)
            except HTTPException:
                raise
            except Exception as e:  # noqa: BLE001
                raise unreachable(f"send series {image_id}", e) from e
            if os.path.isdir(uri):
                files = sorted(f for f in os.listdir(uri) if os.path.isfile(os.path.join(uri, f)))
                uri = os.path.join(uri, files[0]) if files else uri
            return uri

    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    extra = {k: v for k, v in (settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER or {}).items() if k != "Modality"}
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    return RadiographDICOMWebDatastore(client=client, search_filter=extra, cache_path=cache,
                                       fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                                       convert_to_nifti=False)
