"""DICOM DX writer for demo radiographs (pydicom; deterministic UIDs from the study seed)."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses


def write_dx(path: str | Path, image: np.ndarray, *, study_id: str, seed_key: str,
             pixel_spacing_mm: float, imager_spacing_mm: float, magnification: float,
             sid_mm: float, sod_mm: float, monochrome1: bool = False, kvp: float = 120.0,
             description: str = "", date: str = "20260101") -> None:
    """Write a PA chest DX (for presentation) image atomically.

    Args:
        image: float (rows, cols) in [0, 1], higher = more attenuation (displayed white).
        study_id: Patient/study identifier text (e.g. ``cxr_0007``).
        seed_key: Stable string from which all UIDs are derived (same key, same UIDs).
        pixel_spacing_mm: Spacing at the patient (calibrated, ``PixelSpacingCalibrationType``
            GEOMETRY); ``ImagerPixelSpacing`` holds the detector pitch.
        monochrome1: Store inverted (MONOCHROME1), as many CR/DX systems do.
    """
    path = Path(path)
    bits = 12
    arr = np.clip(np.round(image * (2 ** bits - 1)), 0, 2 ** bits - 1).astype(np.uint16)
    if monochrome1:
        arr = (2 ** bits - 1 - arr).astype(np.uint16)
    uid = lambda s: generate_uid(prefix=UID_ROOT, entropy_srcs=[seed_key, s])  # noqa: E731

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_ROOT + "1"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("for")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = study_id.replace("_", "")[:16]
    ds.Modality = "DX"
    ds.Manufacturer = "Anatomy-VLM Label demo (projected from CT)"
    ds.InstitutionName = "Demo"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST PA (simulated from CT)"
    ds.SeriesDescription = description or "PA"
    ds.PatientName = f"Demo^{study_id}"
    ds.PatientID = study_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyID = study_id[-16:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ImageLaterality = "U"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.KVP = f"{kvp:.0f}"
    ds.DistanceSourceToDetector = f"{sid_mm:.1f}"
    ds.DistanceSourceToPatient = f"{sod_mm:.1f}"
    ds.EstimatedRadiographicMagnificationFactor = f"{magnification:.4f}"
    ds.ImagerPixelSpacing = [f"{imager_spacing_mm:.5f}", f"{imager_spacing_mm:.5f}"]
    ds.PixelSpacing = [f"{pixel_spacing_mm:.5f}", f"{pixel_spacing_mm:.5f}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if not monochrome1 else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = str(2 ** (bits - 1))
    ds.WindowWidth = str(2 ** bits)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    ds.InstanceCreationDate = _dt.date(2026, 1, 1).strftime("%Y%m%d")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pydicom.dcmwrite(str(tmp), ds, write_like_original=False)
    os.replace(tmp, path)
