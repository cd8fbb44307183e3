"""Image input/output: every reader returns one :class:`Radiograph`; every writer is atomic.

Orientation contract (pinned here; ``tests/test_io.py`` proves it with an asymmetric image through
every reader and the MONAI load path):

* ``Radiograph.pixels`` is ``(rows, cols) = (H, W)``: row 0 at the top, column 0 at the left, as a
  viewer shows the file (PA chest film: column 0 is the patient's right). Boxes are
  ``[x0, y0, x1, y1]`` with ``x = column``, ``y = row``. Higher value = more attenuation (bone white).
* ``spacing`` is ``(row_mm, col_mm)``; ``spacing_known`` False means ``spacing == DEFAULT_SPACING``.
* NIfTI stores ``data[x, y] = pixels[y, x]`` (axis 0 = column, axis 1 = row, optional axis 2 = mask or
  frame index) with affine ``diag(-col_mm, -row_mm, 1, 1)``: what ITK writes for a 2D image with
  identity direction, MONAI's ITKReader affine for PNG/DICOM, and MONAI Label's 2D label files; Slicer
  shows it upright. Reading uses the voxel order as is (like MONAI's ``LoadImage`` without
  ``Orientation``) and ignores affine signs; only the spacing is taken from it.
* MONAI's ``LoadImage`` (ITKReader/PILReader) returns the transpose, ``(W, H)`` for PNG and NIfTI and
  ``(W, H, 1)`` for a 2D DICOM; :class:`LoadRadiographd` returns ``(1, H, W)``.

Unreadable or unsuitable input raises :class:`ImageReadError` (a ``ValueError``) naming the file and
the problem. ``LoadRadiographd`` is built on first access: ``import monai`` takes ~10 s here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "DEFAULT_SPACING", "MIN_SIDE", "ImageReadError", "Radiograph", "read_image", "write_png",
    "write_nifti_2d", "write_region_masks", "read_region_masks", "write_json_atomic", "read_json",
    "LoadRadiographd",
]

DEFAULT_SPACING: tuple[float, float] = (1.0, 1.0)
"""Spacing (row_mm, col_mm) reported when the file has none (``spacing_known`` is then False)."""
MIN_SIDE = 8
"""Smallest accepted number of rows or columns."""
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as Pillow's "L" conversion
_PNG_SPACING_KEY = "PixelSpacing"  # tEXt chunk written by write_png: "row_mm\\col_mm"
_NIFTI_NO_SPACING = b"spacing unknown"


class ImageReadError(ValueError):
    """The input cannot be read or is not a suitable image; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Radiograph:
    """A 2D image with its geometry and provenance.

    Attributes:
        pixels: float32 ``(H, W)``, row 0 at the top, column 0 at the image's left; higher values mean
            more attenuation. Only with ``read_image(..., allow_3d=True)`` may it be ``(D, H, W)``.
        spacing: ``(row_mm, col_mm)``; ``DEFAULT_SPACING`` when unknown.
        spacing_known: whether ``spacing`` came from the file.
        source: the path read.
        meta: source metadata (``format``, ``original_dtype``, DICOM modality, photometric
            interpretation, bits, view position, patient orientation, UIDs, window applied, ...).
    """

    pixels: np.ndarray
    spacing: tuple[float, float] = DEFAULT_SPACING
    spacing_known: bool = False
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W)`` (or ``(D, H, W)`` for a volume)."""
        return tuple(self.pixels.shape)

    def to_unit(self) -> np.ndarray:
        """Min-max scaled float32 copy in ``[0, 1]`` (all zeros for a constant image)."""
        return _unit(self.pixels)

    def to_uint8(self, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
        """Display copy: window ``[p_low, p_high]`` percentiles linearly onto 0..255, clipped."""
        lo, hi = np.percentile(self.pixels, [low_pct, high_pct])
        if hi <= lo:
            return (_unit(self.pixels) * 255).round().astype(np.uint8)
        return (np.clip((self.pixels - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


# ----------------------------------------------------------------------------------------- reading
def read_image(path: str | os.PathLike, *, allow_3d: bool = False, apply_voi: bool = True) -> Radiograph:
    """Read a DICOM (CR, DX, any single-frame greyscale or colour), PNG, JPEG or NIfTI image.

    The format is taken from the content (DICOM ``DICM`` at offset 128, PNG/JPEG signatures), then
    from the extension (``.dcm``/``.dicom`` without preamble, ``.nii``, ``.nii.gz``). Colour is
    converted to luminance (BT.601). 16-bit PNG keeps full precision.

    DICOM: the Modality LUT (RescaleSlope/Intercept or LUT) is applied, then, if ``apply_voi`` and
    the file has one, the first VOI LUT or window (``meta["window_applied"]``), then MONOCHROME1 is
    inverted within the output range. Spacing: PixelSpacing, else ImagerPixelSpacing (detector
    plane, not magnification-corrected), else unknown; zero or malformed values count as missing.

    Args:
        path: the file.
        allow_3d: accept a multi-frame DICOM or a 3D NIfTI and return pixels ``(D, H, W)``.
        apply_voi: apply the VOI LUT / window; False gives modality values (raw for most CR/DX).

    Raises:
        ImageReadError: missing, empty, truncated or undecodable file; DICOM without pixel data or
            with a transfer syntax no installed decoder handles; unsupported type; fewer than
            ``MIN_SIDE`` rows or columns; a 3D image when ``allow_3d`` is False.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "file not found" if not p.exists() else "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise ImageReadError(p, "empty file (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(132)
    name = p.name.lower()
    if head[128:132] == b"DICM":
        rg = _read_dicom(p, allow_3d, apply_voi, force=False)
    elif head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        rg = _read_pil(p)
    elif name.endswith((".nii", ".nii.gz")):
        rg = _read_nifti(p, allow_3d)
    elif name.endswith((".dcm", ".dicom")) or "." not in name or p.suffix[1:].isdigit():  # UID names
        rg = _read_dicom(p, allow_3d, apply_voi, force=True)
    elif name.endswith((".png", ".jpg", ".jpeg")):
        raise ImageReadError(p, f"not a valid {p.suffix} file (signature missing; {size} bytes)")
    else:
        raise ImageReadError(p, f"unsupported file type {p.suffix!r}: expected DICOM, PNG, JPEG or NIfTI")
    if min(rg.pixels.shape[-2:]) < MIN_SIDE:
        h, w = rg.pixels.shape[-2:]
        raise ImageReadError(p, f"image is too small: {h}x{w} pixels (at least {MIN_SIDE}x{MIN_SIDE})")
    return rg


def _read_dicom(p: Path, allow_3d: bool, apply_voi: bool, force: bool) -> Radiograph:
    import pydicom
    from pydicom.pixel_data_handlers import util

    try:
        ds = pydicom.dcmread(str(p), force=force)
    except Exception as e:  # InvalidDicomError, EOFError, struct/byte errors on damaged headers
        raise ImageReadError(p, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if force and "SOPClassUID" not in ds and "Rows" not in ds and "PixelData" not in ds:
        raise ImageReadError(p, "not a DICOM file (no DICM preamble and no DICOM image attributes)")
    if len(ds) == 0:
        raise ImageReadError(p, "DICOM file holds no data set after its file meta header (truncated file?)")
    if "PixelData" not in ds:
        raise ImageReadError(p, "DICOM has no pixel data (no PixelData: truncated, or not an image object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and not allow_3d:
        raise ImageReadError(p, f"multi-frame DICOM ({frames} frames) where a 2D image is required")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = f"{ts.name} ({ts})" if ts else "unknown transfer syntax"
    try:
        arr = ds.pixel_array
    except Exception as e:
        no_handler = isinstance(e, (NotImplementedError, RuntimeError)) and "handler" in str(e)
        arr = _decode_jpegls(p, ds) if no_handler and ts and ts.startswith("1.2.840.10008.1.2.4.8") else None
        if arr is None and no_handler:
            raise ImageReadError(p, f"no installed decoder for transfer syntax {ts_name}: {e}") from e
        if arr is None:  # pixel data shorter than Rows*Columns*..., corrupt codestream
            raise ImageReadError(p, f"cannot decode pixel data ({ts_name}): truncated or corrupt? {e}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    meta: dict[str, Any] = {"format": "DICOM", "transfer_syntax": str(ts) if ts else None, "frames": frames,
                            "original_dtype": str(arr.dtype), "photometric_interpretation": photometric,
                            "window_applied": None, "inverted": False}
    for key in _DICOM_META:
        value = ds.get(key)
        if value is not None and value != "":
            meta[_snake(key)] = _plain(value)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR":
        if photometric == "PALETTE COLOR":
            arr = util.apply_color_lut(arr, ds)
        elif photometric in ("YBR_FULL", "YBR_FULL_422"):
            arr = util.convert_color_space(arr, photometric, "RGB")
        out = arr.astype(np.float32) @ _LUMA
    else:
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        if not signed and arr.dtype.kind == "u" and bits < arr.dtype.itemsize * 8:
            arr = arr & np.asarray((1 << bits) - 1, arr.dtype)  # drop overlay/garbage high bits
        # Push the nominal stored range through the same LUTs to know the output range for inversion.
        ends = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
        out, ends = util.apply_modality_lut(arr, ds), util.apply_modality_lut(ends.astype(arr.dtype), ds)
        if apply_voi and ("WindowCenter" in ds or "VOILUTSequence" in ds):
            out, ends = util.apply_voi_lut(out, ds, index=0), util.apply_voi_lut(ends, ds, index=0)
            cw = [v[0] if isinstance(v, list) else v for v in map(_plain, (ds.get("WindowCenter"),
                                                                           ds.get("WindowWidth")))]
            meta["window_applied"] = "VOILUTSequence" if "VOILUTSequence" in ds else cw  # LUT wins
        out = np.asarray(out, np.float32)
        if photometric == "MONOCHROME1":
            out = np.float32(float(np.min(ends)) + float(np.max(ends))) - out
            meta["inverted"] = True
    spacing, known, src = DEFAULT_SPACING, False, None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        sp = _spacing(ds.get(key))
        if sp is not None:
            spacing, known, src = sp, True, key
            break
    meta["spacing_source"] = src
    return Radiograph(np.ascontiguousarray(out, np.float32), spacing, known, str(p), meta)


def _decode_jpegls(p: Path, ds: Any) -> np.ndarray | None:
    """JPEG-LS through the pillow-jpls plugin (pydicom 2.x has no handler for it); None if unavailable."""
    try:
        import io
        import pillow_jpls  # noqa: F401  (registers the plugin)
        from PIL import Image
        from pydicom.encaps import generate_pixel_data_frame
    except ImportError:
        return None
    frames = []
    try:
        for frame in generate_pixel_data_frame(ds.PixelData, int(ds.get("NumberOfFrames", 1) or 1)):
            with Image.open(io.BytesIO(frame)) as im:
                frames.append(np.array(im))
    except Exception as e:
        raise ImageReadError(p, f"cannot decode JPEG-LS pixel data with pillow-jpls ({e})") from e
    arr = np.stack(frames) if len(frames) > 1 else frames[0]
    if int(ds.get("PixelRepresentation", 0)) == 1:  # stored two's complement, decoded unsigned
        bits = int(ds.BitsStored)
        arr = arr.astype(np.int64)
        arr[arr >= (1 << (bits - 1))] -= 1 << bits
    return arr


def _read_pil(p: Path) -> Radiograph:
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.load()
            fmt, mode, info = im.format, im.mode, dict(im.info)
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im).astype(np.float32)
            elif mode in ("L", "LA", "1"):
                arr = np.asarray(im.convert("L"), np.float32)
            else:  # RGB, RGBA, P, CMYK, YCbCr, ...
                arr = np.asarray(im.convert("RGB"), np.float32) @ _LUMA
    except Exception as e:  # truncated or corrupt
        raise ImageReadError(p, f"cannot decode image ({type(e).__name__}: {e})") from e
    dtype = "uint16" if mode.startswith("I;16") else {"I": "int32", "F": "float32"}.get(mode, "uint8")
    meta = {"format": fmt, "mode": mode, "original_dtype": dtype, "spacing_source": None}
    sp = _spacing(str(info.get(_PNG_SPACING_KEY, "")).split("\\")) if fmt == "PNG" else None
    if sp is not None:
        meta["spacing_source"] = f"PNG tEXt {_PNG_SPACING_KEY}"
    return Radiograph(np.ascontiguousarray(arr), sp or DEFAULT_SPACING, sp is not None, str(p), meta)


def _load_nifti(p: Path) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # ImageFileError, EOFError/zlib.error on truncated .nii.gz
        raise ImageReadError(p, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.dtype.names is not None:
        raise ImageReadError(p, f"unsupported NIfTI data type {data.dtype} (RGB/structured)")
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, img


def _read_nifti(p: Path, allow_3d: bool) -> Radiograph:
    data, img = _load_nifti(p)
    if data.ndim == 3 and not allow_3d:
        raise ImageReadError(p, f"3D volume of shape {data.shape} where a 2D image is required")
    if data.ndim not in (2, 3):
        raise ImageReadError(p, f"{data.ndim}D NIfTI of shape {data.shape}; expected 2D (x, y[, 1])")
    pixels = data.T.astype(np.float32)  # (x, y[, z]) -> ([z,] row, col)
    zooms = img.header.get_zooms()
    known = np.asarray(img.header["descrip"]).item() != _NIFTI_NO_SPACING
    sp = _spacing([zooms[1], zooms[0]]) if known and len(zooms) >= 2 else None
    meta = {"format": "NIfTI", "original_dtype": str(data.dtype), "affine": np.asarray(img.affine).tolist(),
            "spacing_source": "pixdim" if sp else None}
    return Radiograph(np.ascontiguousarray(pixels), sp or DEFAULT_SPACING, sp is not None, str(p), meta)


def read_region_masks(path: str | os.PathLike) -> np.ndarray:
    """Masks written by :func:`write_region_masks` as bool ``(K, H, W)``; raises ImageReadError."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "file not found")
    data, _ = _load_nifti(p)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ImageReadError(p, f"region masks must be (x, y, k); got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0) != 0)


def read_mask_label(path: str | os.PathLike) -> np.ndarray:
    """A mask label as it is stored: bool ``(K, H, W)`` region masks (:func:`write_region_masks`), or an
    integer ``(H, W)`` label map of region ids when the file is 2D; raises ImageReadError."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "file not found")
    data, _ = _load_nifti(p)
    if data.ndim == 2:
        return np.ascontiguousarray(data.T).astype(np.int64)
    if data.ndim != 3:
        raise ImageReadError(p, f"region masks must be (x, y, k) or a label map (x, y); got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0) != 0)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file. Raises FileNotFoundError, or ValueError naming the file if malformed."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from e


def _spacing(value: Any) -> tuple[float, float] | None:
    """(row_mm, col_mm) from a 2-value DICOM/text spacing, or None when missing, zero or malformed."""
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 and np.isfinite(row + col) else None


_DICOM_META = ("Modality", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
               "PatientID", "ViewPosition", "PatientOrientation", "ImageLaterality", "BodyPartExamined",
               "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
               "WindowCenter", "WindowWidth", "PresentationLUTShape", "PixelPaddingValue")


def _snake(name: str) -> str:
    """DICOM keyword -> meta key: ``SOPInstanceUID`` -> ``sop_instance_uid``."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _plain(value: Any) -> Any:
    """pydicom values (MultiValue, DSfloat, IS, UID, PersonName) as JSON-friendly Python values."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    for kind in (int, float):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


# ----------------------------------------------------------------------------------------- writing
def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (same extension) and rename it into place."""
    p = Path(path)
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _as_2d(image: Radiograph | np.ndarray) -> tuple[np.ndarray, tuple[float, float] | None]:
    if isinstance(image, Radiograph):
        arr, spacing = image.pixels, (image.spacing if image.spacing_known else None)
    else:
        arr, spacing = np.asarray(image), None
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D (H, W) array, got shape {arr.shape}")
    return (arr.astype(np.uint8) if arr.dtype == bool else arr), spacing


def write_png(image: Radiograph | np.ndarray, path: str | os.PathLike, bits: int = 8) -> Path:
    """Write a greyscale PNG (8 or 16 bit), atomically.

    Integer-valued data within ``0..2**bits-1`` is written unchanged (so integer images round-trip
    exactly); anything else is scaled min-max onto the full range. A Radiograph's known spacing is
    stored in a ``PixelSpacing`` tEXt chunk (``row_mm\\col_mm``) that :func:`read_image` reads back.
    """
    from PIL import Image, PngImagePlugin

    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    arr, spacing = _as_2d(image)
    top, dtype = (1 << bits) - 1, (np.uint8 if bits == 8 else np.uint16)
    fits = arr.size and 0 <= arr.min() and arr.max() <= top and np.array_equal(arr, np.round(arr))
    if not fits:
        arr = np.round(_unit(arr) * top)
    out = Image.fromarray(np.ascontiguousarray(arr.astype(dtype)))
    info = PngImagePlugin.PngInfo()
    if spacing is not None:
        info.add_text(_PNG_SPACING_KEY, f"{spacing[0]!r}\\{spacing[1]!r}")
    return _atomic(path, lambda tmp: out.save(tmp, format="PNG", pnginfo=info))


def _nifti_affine(spacing: tuple[float, float] | None) -> np.ndarray:
    row_mm, col_mm = spacing or DEFAULT_SPACING
    return np.diag([-float(col_mm), -float(row_mm), 1.0, 1.0])


def _save_nifti(data: np.ndarray, path: str | os.PathLike, spacing: tuple[float, float] | None) -> Path:
    import nibabel as nib

    if not str(path).lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz name")
    if spacing is not None and _spacing(spacing) is None:
        raise ValueError(f"spacing must be two positive numbers (row_mm, col_mm), got {spacing!r}")
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:  # nibabel refuses 64-bit integers
        ok = data.size == 0 or (data.min() >= -(2**31) and data.max() < 2**31)
        data = data.astype(np.int32 if ok else np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(data), _nifti_affine(spacing))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if spacing is None:
        img.header["descrip"] = _NIFTI_NO_SPACING
    return _atomic(path, lambda tmp: nib.save(img, tmp))


def write_nifti_2d(array: Radiograph | np.ndarray, path: str | os.PathLike,
                   spacing: tuple[float, float] | None = None) -> Path:
    """Write an ``(H, W)`` image as NIfTI ``(x = col, y = row)``, atomically; dtype kept (bool -> uint8).

    Args:
        array: ``(H, W)`` array or Radiograph (its known spacing is used if ``spacing`` is None).
        path: ``.nii`` or ``.nii.gz``.
        spacing: ``(row_mm, col_mm)``; None marks the spacing unknown in the header (pixdim 1).
    """
    arr, own = _as_2d(array)
    return _save_nifti(arr.T, path, spacing if spacing is not None else own)


def write_region_masks(masks: np.ndarray, path: str | os.PathLike,
                       spacing: tuple[float, float] | None = None) -> Path:
    """Write a bool mask stack ``(K, H, W)`` (K regions) as a uint8 NIfTI ``(x, y, k)``, atomically."""
    m = np.asarray(masks)
    if m.ndim != 3 or m.shape[0] == 0:
        raise ValueError(f"masks must be (K, H, W) with K >= 1, got shape {m.shape}")
    return _save_nifti((m != 0).astype(np.uint8).transpose(2, 1, 0), path, spacing)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Serialise ``obj`` as indented UTF-8 JSON, atomically (serialised before the file is touched)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a flushed temporary file beside ``dst`` and a rename (a reader of
    ``dst`` sees the old file or the new one, never a part)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    return _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


# ----------------------------------------------------------------------------------- MONAI adapter
def _make_load_radiographd() -> type:
    from monai.transforms import MapTransform

    class LoadRadiographd(MapTransform):
        """MONAI dictionary transform: ``d[key]`` path -> float32 ``(1, H, W)`` via :func:`read_image`.

        ``d[f"{key}_meta_dict"]`` gets the Radiograph's ``meta`` plus ``spatial_shape`` ``(H, W)``,
        ``spacing`` ``(row_mm, col_mm)``, ``spacing_known``, ``filename_or_obj`` and
        ``axis_order = "CHW"``. Note MONAI's ``LoadImaged`` gives the transpose ``(1, W, H)``; a 2D
        output array must be transposed to ``(W, H)`` before MONAI Label's ITK label writer.
        Raises ImageReadError for unreadable input.
        """

        def __init__(self, keys: Any, allow_missing_keys: bool = False, *, allow_3d: bool = False,
                     apply_voi: bool = True, meta_key_postfix: str = "meta_dict"):
            super().__init__(keys, allow_missing_keys)
            self.allow_3d, self.apply_voi, self.meta_key_postfix = allow_3d, apply_voi, meta_key_postfix

        def __call__(self, data: Any) -> dict:
            d = dict(data)
            for key in self.key_iterator(d):
                rg = read_image(d[key], allow_3d=self.allow_3d, apply_voi=self.apply_voi)
                d[key] = rg.pixels[None].astype(np.float32, copy=False)
                d[f"{key}_{self.meta_key_postfix}"] = {
                    **rg.meta, "spatial_shape": rg.shape, "spacing": rg.spacing,
                    "spacing_known": rg.spacing_known, "filename_or_obj": rg.source, "axis_order": "CHW"}
            return d

    LoadRadiographd.__module__, LoadRadiographd.__qualname__ = __name__, "LoadRadiographd"  # picklable
    return LoadRadiographd


def __getattr__(name: str) -> Any:  # PEP 562: build the MONAI transform only when asked for
    if name == "LoadRadiographd":
        cls = globals()["LoadRadiographd"] = _make_load_radiographd()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
