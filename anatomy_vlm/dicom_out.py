"""DICOM out: region masks as DICOM SEG, boxes and findings as a DICOM SR measurement report (TID 1500).

Both are written with highdicom from the source radiograph's own dataset (a DX/CR DICOM file), so they
reference it (study, series, SOP instance) and OHIF, 3D Slicer or any PACS shows them over it.

**SEG** (:func:`write_seg`): one segment per predicted region, BINARY, overlapping segments allowed (a
zone and its lung are separate frames). Segmented property category "Anatomical Structure" (SCT
123037004); the property type is the region's SNOMED CT code where one exists in DICOM's code tables
(``pydicom.sr.codedict``: lung, heart, trachea, carina, clavicle, diaphragm, hilum of lung, apex of lung,
aortic arch, superior vena cava, right atrium, mediastinum, spine, abdomen), with the laterality
(Right 24028007 / Left 7771000) as a property type modifier; regions with no such code (lung zones,
costophrenic angles, cavoatrial junction, upper mediastinum) get a code of the project's private scheme
``99AVLM`` (DICOM's rule for local codes: a designator starting with "99"), value = the registry key.
The segment label is the registry name, the colour the registry colour (CIELab).

**SR** (:func:`write_sr`): a Comprehensive SR holding a TID 1500 Measurement Report; per region a planar
ROI (TID 1410) whose region is an SCOORD POLYLINE closed rectangle: the box ``[x0, y0, x1, y1]`` in
pixel edges, which is DICOM's 2D image coordinate convention ((0, 0) = top-left corner of the top-left
pixel); tracking identifier = region name; finding site = the region's code and laterality; measurements:
the region's detection score and, when given, each finding's zero-shot probability (unit: no units).

Only DICOM sources can be referenced: a PNG/JPEG/NIfTI image raises ``ValueError``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .anatomy import REGIONS

__all__ = ["region_code", "write_seg", "write_sr", "LOCAL_SCHEME", "SEG_GEOMETRIES"]

LOCAL_SCHEME = "99AVLM"
"""Coding scheme designator of the project's own codes (regions and measurements without a standard code)."""

#: Registry key -> name of the SNOMED CT concept in ``pydicom.sr.codedict.codes.SCT`` (the base structure).
_SCT_NAMES = {
    "lung": "Lung", "hilar_structures": "HilumOfLung", "apical_zone": "ApexOfLung", "hemidiaphragm": "Diaphragm",
    "trachea": "Trachea", "spine": "Spine", "clavicle": "Clavicle", "aortic_arch": "AorticArch",
    "mediastinum": "Mediastinum", "svc": "SuperiorVenaCava", "cardiac_silhouette": "Heart",
    "right_atrium": "RightAtrium", "carina": "Carina", "abdomen": "Abdomen",
}


def region_code(index: int):
    """``(property type code, laterality code or None)`` of region ``index`` (0-based; see module doc)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    r = REGIONS[index]
    base = r.key
    for prefix in ("right_", "left_"):
        if base.startswith(prefix) and r.key not in _SCT_NAMES:
            base = base[len(prefix):]
    laterality = {"right": codes.SCT.Right, "left": codes.SCT.Left}.get(r.side) if base != r.key else None
    name = _SCT_NAMES.get(r.key) or _SCT_NAMES.get(base)
    if name:
        c = getattr(codes.SCT, name)
        return CodedConcept(c.value, c.scheme_designator, c.meaning), laterality
    return CodedConcept(f"region-{r.id}", LOCAL_SCHEME, r.name), None


def _code(c):
    from highdicom.sr import CodedConcept

    return CodedConcept(c.value, c.scheme_designator, c.meaning)


def _source(image: str | os.PathLike):
    import pydicom

    p = Path(image)
    try:
        ds = pydicom.dcmread(str(p))
    except Exception as e:  # noqa: BLE001 - anything pydicom cannot read is not a DICOM source
        raise ValueError(f"{p}: DICOM SEG/SR need a DICOM source image ({e})") from None
    if "PixelData" not in ds or "SOPInstanceUID" not in ds:
        raise ValueError(f"{p}: not a DICOM image (no pixel data / SOP instance UID)")
    return ds


VIEWER_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
"""Image orientation cornerstone gives an image that has none (its metadata provider's default)."""

SEG_GEOMETRIES = ("source", "viewer")
"""Values of :func:`write_seg`'s ``geometry``."""


def write_seg(pred, image: str | os.PathLike, path: str | os.PathLike, geometry: str = "source") -> Path:
    """Write ``pred``'s masks as a DICOM SEG referencing ``image``.

    ``geometry``: ``"source"`` (default) gives the SEG the source's plane geometry, i.e. none for a
    projection radiograph without one: its frames reference the image by SOP instance only, which is all
    the standard asks of a 2D SEG. ``"viewer"``, for a source without plane geometry, gives the SEG the
    geometry that cornerstone (the rendering library of OHIF 3) assumes for such an image: position
    (0, 0, 0), orientation rows +y / columns -z, and the source's pixel spacing when it has a valid one,
    else 1 mm (said in the series description), slice thickness 1 (required once there is plane
    geometry), in a frame of reference of the SEG's own (a UID derived from the source's SOP instance
    UID, the same for every SEG of that image). OHIF 3 displays a SEG only when its orientation matches
    the image's (it refuses a SEG without one); this geometry is a viewer convention, not the patient's
    position. A source that has plane geometry keeps its own either way.

    Raises:
        ValueError: no masks, a non-DICOM source, masks not of the source's size, or an unknown geometry.
    """
    if geometry not in SEG_GEOMETRIES:
        raise ValueError(f"unknown SEG geometry {geometry!r}; choose one of {list(SEG_GEOMETRIES)}")
    import highdicom as hd
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription, Segmentation
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    if pred.masks is None:
        raise ValueError("the prediction has no masks (predict with with_masks=True)")
    src = _source(image)
    H, W = int(src.Rows), int(src.Columns)
    if tuple(pred.masks.shape[1:]) != (H, W):
        raise ValueError(f"masks are {pred.masks.shape[1:]} but the DICOM image is {(H, W)}")
    algo = hd.AlgorithmIdentificationSequence(name="Anatomy-VLM", version=__version__,
                                              family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    keep = []
    for k, i in enumerate(pred.indices):
        if not pred.masks[k].any():
            continue  # an empty segment carries no frame; listed regions are the found ones
        code, lat = region_code(i)
        d = SegmentDescription(segment_number=len(descriptions) + 1, segment_label=REGIONS[i].name,
                               segmented_property_category=codes.cid7150.AnatomicalStructure,
                               segmented_property_type=code, algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                               algorithm_identification=algo, tracking_id=REGIONS[i].key,
                               tracking_uid=hd.UID())
        if lat is not None:
            m = Dataset()
            m.CodeValue, m.CodingSchemeDesignator, m.CodeMeaning = lat.value, lat.scheme_designator, lat.meaning
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [m]
        d.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(*_rgb_to_lab(REGIONS[i].colour)).value)
        descriptions.append(d)
        keep.append(k)
    if not descriptions:
        raise ValueError("every predicted mask is empty: nothing to write")
    arr = np.moveaxis(pred.masks[keep], 0, -1)[None].astype(np.uint8)  # (1, H, W, S)
    ref = src.copy()
    if "FrameOfReferenceUID" in ref and "ImagePositionPatient" not in ref:
        # A projection radiograph (DX/CR) may carry a frame of reference without any plane geometry;
        # highdicom would then take it for a slice of a volume. Its 2D path references the image by
        # SOP instance and patient orientation, which is what a radiograph's SEG needs.
        del ref.FrameOfReferenceUID
    spacing = [float(v) for v in ref.get("PixelSpacing") or []]
    spacing_ok = len(spacing) == 2 and all(v > 0 for v in spacing)
    if "PixelSpacing" in ref and not spacing_ok:
        del ref.PixelSpacing  # e.g. the real CR's "0\\0": not copied into the SEG's pixel measures
    description = "Anatomy-VLM regions (SEG)"
    if geometry == "viewer" and "ImageOrientationPatient" not in ref:
        # a 2.25 UID (a 128-bit number, PS3.5 B.2) from a hash of the source's SOP instance UID
        digest = hashlib.sha256(f"anatomy-vlm viewer geometry {src.SOPInstanceUID}".encode()).digest()
        ref.FrameOfReferenceUID = f"2.25.{int.from_bytes(digest[:16], 'big')}"
        if not spacing_ok:
            spacing = [1.0, 1.0]
            description += ", nominal 1 mm grid"
        # highdicom takes the SEG's plane functional groups from the (private copy of the) source. A SEG
        # with plane geometry must state a slice thickness (PS3.3 Pixel Measures, type 1C): 1
        ref.PixelSpacing, ref.SliceThickness = spacing, 1.0
        ref.ImagePositionPatient, ref.ImageOrientationPatient = [0.0, 0.0, 0.0], list(VIEWER_ORIENTATION)
    description = _tagged(description, pred)
    seg = Segmentation(
        source_images=[ref], pixel_array=arr, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=901, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Anatomy-VLM Label", manufacturer_model_name="Anatomy-VLM", software_versions=__version__,
        device_serial_number="0", content_label="ANATOMY", content_description="Chest X-ray anatomy regions",
        series_description=description)
    if "PatientOrientation" not in seg:  # General Image, type 2C for an image without plane geometry
        seg.PatientOrientation = src.get("PatientOrientation", "")
    out = Path(path)
    _save(seg, out)
    return out


def _rgb_to_lab(rgb: Sequence[int]) -> tuple[float, float, float]:
    """sRGB (0-255) -> CIE L*a*b* (D65), for RecommendedDisplayCIELabValue."""
    c = np.asarray(rgb, float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = M @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L = 116 * f[1] - 16
    return float(L), float(500 * (f[0] - f[1])), float(200 * (f[1] - f[2]))


def _save(ds, out: Path) -> None:
    from pydicom.dataset import Dataset

    from .io import _atomic

    scheme = Dataset()  # declare the private coding scheme (PS3.3 C.12.1.1.2.1)
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "Anatomy-VLM Label local codes"
    scheme.CodingSchemeResponsibleOrganization = "Anatomy-VLM Label"
    ds.CodingSchemeIdentificationSequence = [scheme]
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic(out, lambda tmp: ds.save_as(tmp, write_like_original=False))


def _tagged(description: str, pred) -> str:
    """``description`` with the image check's warning (:func:`anatomy_vlm.familiarity.series_tag`) appended,
    so that OHIF's series list shows it; within SeriesDescription's 64 characters."""
    from .familiarity import series_tag

    tag = series_tag(getattr(pred, "input_check", None))
    return f"{description}; {tag}"[:64] if tag else description


def write_sr(pred, image: str | os.PathLike, path: str | os.PathLike,
             findings: dict[str, Any] | None = None) -> Path:
    """Write ``pred``'s boxes (and ``findings``, the :func:`anatomy_vlm.findings.region_findings` answer)
    as a TID 1500 measurement report referencing ``image``.

    Raises:
        ValueError: a non-DICOM source, or boxes outside the image.
    """
    import highdicom as hd
    from highdicom.sr import (CodedConcept, ComprehensiveSR, FindingSite, ImageRegion, Measurement,
                              MeasurementReport, ObservationContext, ObserverContext,
                              DeviceObserverIdentifyingAttributes, PlanarROIMeasurementsAndQualitativeEvaluations,
                              SourceImageForRegion, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    src = _source(image)
    H, W = int(src.Rows), int(src.Columns)
    per_region = {}
    if findings:
        per_region = {r["name"]: r.get("findings", []) for r in findings.get("regions", [])}
    no_units = codes.UCUM.NoUnits
    score_name = CodedConcept("detection-score", LOCAL_SCHEME, "Region detection score")
    groups = []
    for k, i in enumerate(pred.indices):
        x0, y0, x1, y1 = (float(v) for v in pred.boxes[k])
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise ValueError(f"{REGIONS[i].name}: box {[x0, y0, x1, y1]} is not inside the {W}x{H} image")
        code, lat = region_code(i)
        region = ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                             graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float32),
                             source_image=SourceImageForRegion.from_source_image(src))
        ms = [Measurement(name=score_name, value=round(float(pred.scores[k]), 4), unit=no_units)]
        for f in per_region.get(REGIONS[i].name, []):
            label = " ".join(str(f["finding"]).split())[:48]  # one local code per finding text
            value = "P" + hashlib.sha1(label.lower().encode()).hexdigest()[:10]
            ms.append(Measurement(name=CodedConcept(value, LOCAL_SCHEME, f"Probability of {label}"),
                                  value=round(float(f["score"]), 4), unit=no_units))
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=REGIONS[i].name),
            referenced_region=region, finding_type=code,
            finding_sites=[FindingSite(anatomic_location=code, laterality=lat)], measurements=ms))
    observer = ObserverContext(observer_type=codes.cid270.Device,
                               observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                   uid=hd.UID(), name="Anatomy-VLM", model_name="Anatomy-VLM",
                                   manufacturer_name="Anatomy-VLM Label"))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=_code(codes.LN.XRayReport),
                               imaging_measurements=groups)
    sr = ComprehensiveSR(evidence=[src], content=report, series_instance_uid=hd.UID(), series_number=902,
                         sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Anatomy-VLM Label",
                         series_description=_tagged("Anatomy-VLM regions and findings (SR)", pred))
    out = Path(path)
    _save(sr, out)
    return out
