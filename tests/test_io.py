"""Readers and writers of anatomy_vlm.io on real files: orientation, intensities, spacing, bad input.

Every reader gets the same ASYMMETRIC 40x64 image: a bright block at the top-left, a medium marker at
the bottom-right, background elsewhere. A transpose changes the shape, a left-right flip moves the
block to the top-right, an up-down flip to the bottom-left, a 180 degree turn swaps block and marker.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from anatomy_vlm import io as aio

pytestmark = [pytest.mark.filterwarnings("ignore:builtin type .* has no __module__:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")]
from anatomy_vlm.io import (
    DEFAULT_SPACING, ImageReadError, Radiograph, read_image, read_json, read_region_masks,
    write_json_atomic, write_nifti_2d, write_png, write_region_masks,
)

H, W = 40, 64
BG, BRIGHT, MEDIUM = 200, 3000, 1500
DX_UID, CR_UID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1"
PYDICOM_DATA = Path(importlib.util.find_spec("data_store").submodule_search_locations[0]) / "data"
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def asym(h: int = H, w: int = W, scale: float = 1.0) -> np.ndarray:
    """uint16 (h, w): background, bright block top-left, medium marker bottom-right."""
    a = np.full((h, w), BG, np.float64)
    a[2:10, 3:15] = BRIGHT
    a[h - 10:h - 3, w - 14:w - 4] = MEDIUM
    return np.round(a * scale).astype(np.uint16)


def assert_top_left(px: np.ndarray, shape: tuple[int, int] = (H, W)) -> None:
    """Bright block top-left, medium marker bottom-right, background at the other two corners."""
    assert px.shape == shape
    h, w = shape
    tl, br = px[2:10, 3:15].mean(), px[h - 10:h - 3, w - 14:w - 4].mean()
    tr, bl = px[2:10, w - 15:w - 3].mean(), px[h - 10:h - 2, 3:15].mean()
    assert tl > br > max(tr, bl), (tl, br, tr, bl)


def write_dicom(path: Path, stored: np.ndarray, *, sop_class: str = DX_UID, modality: str = "DX",
                photometric: str = "MONOCHROME2", bits_stored: int | None = None, preamble: bool = True,
                frames: int = 1, pixel_data: bytes | None = None, ts: str = ExplicitVRLittleEndian,
                **elements) -> Path:
    """A minimal but valid DX/CR file written with pydicom; ``elements`` are extra attributes."""
    stored = np.asarray(stored)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    fm.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b"\0" * 128 if preamble else None)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, fm.MediaStorageSOPInstanceUID, modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ViewPosition, ds.PatientOrientation = "PA", ["L", "F"]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixel_data is not None or stored.size:
        ds.PixelData = pixel_data if pixel_data is not None else stored.tobytes()  # little-endian host
        if pixel_data is not None:
            ds["PixelData"].VR = "OB"
    ds.save_as(str(path), write_like_original=not preamble)
    return path


# ---------------------------------------------------------------------------- DICOM, every variant
def test_dx_monochrome2_16bit_with_pixel_spacing(tmp_path):
    a = asym()
    rg = read_image(write_dicom(tmp_path / "dx.dcm", a, PixelSpacing=[0.2, 0.3]))
    assert_top_left(rg.pixels)
    assert rg.pixels.dtype == np.float32 and np.array_equal(rg.pixels, a)
    assert rg.spacing == (0.2, 0.3) and rg.spacing_known and rg.meta["spacing_source"] == "PixelSpacing"
    m = rg.meta
    assert (m["modality"], m["photometric_interpretation"], m["bits_stored"], m["view_position"]) == (
        "DX", "MONOCHROME2", 16, "PA")
    assert m["patient_orientation"] == ["L", "F"] and m["original_dtype"] == "uint16" and not m["inverted"]
    assert m["sop_class_uid"] == DX_UID and m["study_instance_uid"] and m["sop_instance_uid"]
    json.dumps(m)  # JSON-friendly


def test_cr_monochrome1_is_inverted_within_the_stored_range(tmp_path):
    a = asym()
    path = write_dicom(tmp_path / "cr.dcm", (4095 - a).astype(np.uint16), sop_class=CR_UID, modality="CR",
                       photometric="MONOCHROME1", bits_stored=12, PixelSpacing=[0.15, 0.15])
    rg = read_image(path)
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, a) and rg.meta["inverted"] and rg.meta["modality"] == "CR"


def test_8bit_dicom(tmp_path):
    a = (asym() // 16).astype(np.uint8)
    rg = read_image(write_dicom(tmp_path / "dx8.dcm", a))
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, a)
    assert rg.meta["bits_stored"] == 8 and rg.meta["original_dtype"] == "uint8"


def test_voi_window_applied_and_raw_on_request(tmp_path):
    a = asym()
    path = write_dicom(tmp_path / "win.dcm", a, bits_stored=12, WindowCenter=1500, WindowWidth=3000)
    rg = read_image(path)
    assert_top_left(rg.pixels)
    assert rg.meta["window_applied"] == [1500.0, 3000.0]
    assert rg.pixels.max() <= 4095 and not np.array_equal(rg.pixels, a)
    raw = read_image(path, apply_voi=False)
    assert np.array_equal(raw.pixels, a) and raw.meta["window_applied"] is None


def test_monochrome1_inversion_uses_the_window_output_range(tmp_path):
    a = asym()
    path = write_dicom(tmp_path / "cr_win.dcm", (4095 - a).astype(np.uint16), photometric="MONOCHROME1",
                       bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    rg = read_image(path)
    assert_top_left(rg.pixels)
    assert 0 <= rg.pixels.min() and rg.pixels.max() <= 4095


def test_rescale_slope_intercept_signed(tmp_path):
    a = asym().astype(np.int16) - 1000
    rg = read_image(write_dicom(tmp_path / "resc.dcm", a, RescaleSlope=2, RescaleIntercept=-50))
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, 2.0 * a - 50) and rg.meta["rescale_slope"] == 2.0


@pytest.mark.parametrize("elements, spacing, known, source", [
    ({}, DEFAULT_SPACING, False, None),
    ({"PixelSpacing": "0\\0"}, DEFAULT_SPACING, False, None),
    ({"PixelSpacing": "0\\0", "ImagerPixelSpacing": [0.143, 0.144]}, (0.143, 0.144), True,
     "ImagerPixelSpacing"),
    ({"ImagerPixelSpacing": [0.1, 0.125]}, (0.1, 0.125), True, "ImagerPixelSpacing"),
], ids=["missing", "zero", "zero-then-imager", "imager-only"])
def test_dicom_spacing_fallbacks(tmp_path, elements, spacing, known, source):
    rg = read_image(write_dicom(tmp_path / "s.dcm", asym(), **elements))
    assert (rg.spacing, rg.spacing_known, rg.meta["spacing_source"]) == (spacing, known, source)
    assert_top_left(rg.pixels)


def test_dicom_without_extension_and_without_preamble(tmp_path):
    assert_top_left(read_image(write_dicom(tmp_path / "IM0001", asym())).pixels)
    assert_top_left(read_image(write_dicom(tmp_path / "nopre.dcm", asym(), preamble=False)).pixels)


def test_multiframe_dicom_needs_allow_3d(tmp_path):
    path = write_dicom(tmp_path / "mf.dcm", np.stack([asym(), asym()]), frames=2)
    with pytest.raises(ImageReadError, match="multi-frame"):
        read_image(path)
    vol = read_image(path, allow_3d=True)
    assert vol.shape == (2, H, W)
    assert_top_left(vol.pixels[1])


# ------------------------------------------------------------------------------- PNG, JPEG, NIfTI
def test_png_grey_8bit(tmp_path):
    a = (asym() // 16).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "g.png")
    rg = read_image(tmp_path / "g.png")
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, a) and not rg.spacing_known and rg.meta["original_dtype"] == "uint8"


def test_png_16bit_keeps_full_precision_and_spacing(tmp_path):
    a = asym(scale=20.0)  # up to 60000
    src = Radiograph(a.astype(np.float32), (0.25, 0.5), True, "mem")
    write_png(src, tmp_path / "g16.png", bits=16)
    rg = read_image(tmp_path / "g16.png")
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, a) and rg.meta["original_dtype"] == "uint16"
    assert rg.spacing == (0.25, 0.5) and rg.spacing_known


def test_png_rgb_to_luminance(tmp_path):
    g = (asym() // 16).astype(np.float32)
    rgb = np.stack([g, g * 0.9, g * 0.5], -1).round().astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    rg = read_image(tmp_path / "c.png")
    assert_top_left(rg.pixels)
    np.testing.assert_allclose(rg.pixels, rgb.astype(np.float32) @ [0.299, 0.587, 0.114], atol=1e-3)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_grey_and_rgb(tmp_path, mode):
    im = Image.fromarray((asym() // 16).astype(np.uint8))
    im.convert(mode).save(tmp_path / "j.jpeg", quality=90)
    assert_top_left(read_image(tmp_path / "j.jpeg").pixels)


def test_content_wins_over_extension(tmp_path):
    Image.fromarray((asym() // 16).astype(np.uint8)).save(tmp_path / "really_jpeg.png", format="JPEG")
    rg = read_image(tmp_path / "really_jpeg.png")
    assert rg.meta["format"] == "JPEG"
    assert_top_left(rg.pixels)


def test_nifti_writer_round_trip_and_convention(tmp_path):
    a = asym()
    path = write_nifti_2d(a, tmp_path / "im.nii.gz", spacing=(0.2, 0.3))
    img = nib.load(path)
    assert img.shape == (W, H) and np.array_equal(np.asarray(img.dataobj), a.T)  # x = column, y = row
    np.testing.assert_allclose(img.affine, np.diag([-0.3, -0.2, 1, 1]))
    rg = read_image(path)
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, a) and rg.spacing == pytest.approx((0.2, 0.3)) and rg.spacing_known
    carried = read_image(write_nifti_2d(rg, tmp_path / "u.nii"))  # a Radiograph brings its spacing
    assert carried.spacing_known and carried.spacing == pytest.approx((0.2, 0.3))
    assert not read_image(write_nifti_2d(a, tmp_path / "n.nii")).spacing_known
    wide = read_image(write_nifti_2d(a.astype(np.int64), tmp_path / "i64.nii.gz"))  # nibabel refuses int64
    assert np.array_equal(wide.pixels, a)


@pytest.mark.parametrize("affine", [np.diag([0.3, 0.2, 1, 1]), np.diag([-0.3, -0.2, 1, 1]),
                                    np.diag([0.3, -0.2, 1, 1])], ids=["ras+", "itk", "mixed"])
def test_nifti_voxel_order_is_the_image_whatever_the_affine_signs(tmp_path, affine):
    a = asym()
    nib.save(nib.Nifti1Image(a.T[:, :, None].astype(np.int16), affine), tmp_path / "v.nii.gz")  # (X, Y, 1)
    rg = read_image(tmp_path / "v.nii.gz")
    assert_top_left(rg.pixels)
    assert np.array_equal(rg.pixels, a) and rg.spacing == pytest.approx((0.2, 0.3))


def test_nifti_written_by_itk_reads_upright(tmp_path):
    itk = pytest.importorskip("itk")
    a = asym().astype(np.float32)
    im = itk.image_from_array(a)  # ITK arrays are (row, col); identity direction
    im.SetSpacing([0.3, 0.2])  # (x = col, y = row)
    itk.imwrite(im, str(tmp_path / "itk.nii.gz"))
    affine = nib.load(tmp_path / "itk.nii.gz").affine
    np.testing.assert_allclose(affine, np.diag([-0.3, -0.2, 1, 1]), atol=1e-6)
    rg = read_image(tmp_path / "itk.nii.gz")
    assert np.array_equal(rg.pixels, a) and rg.spacing == pytest.approx((0.2, 0.3))


def test_nifti_3d_needs_allow_3d(tmp_path):
    vol = np.stack([asym().T] * 3, -1)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(ImageReadError, match="3D volume"):
        read_image(tmp_path / "vol.nii.gz")
    rg = read_image(tmp_path / "vol.nii.gz", allow_3d=True)
    assert rg.shape == (3, H, W)
    assert_top_left(rg.pixels[2])


# ------------------------------------------------------------------------------ real pydicom-data
def test_real_cr_rg1_uncr():
    rg = read_image(PYDICOM_DATA / "RG1_UNCR.dcm")
    assert rg.shape == (1955, 1841) and rg.pixels.dtype == np.float32
    assert not rg.spacing_known and rg.spacing == DEFAULT_SPACING  # PixelSpacing is 0\0
    assert rg.meta["photometric_interpretation"] == "MONOCHROME1" and rg.meta["inverted"]
    assert rg.meta["modality"] == "CR" and rg.meta["view_position"] == "PA" and rg.meta["bits_stored"] == 15
    px = rg.pixels

    def mean(r0, r1, c0, c1):
        return px[int(r0 * 1955):int(r1 * 1955), int(c0 * 1841):int(c1 * 1841)].mean()

    # After inversion the mediastinum/spine is brighter than both lungs at mid-height ...
    assert mean(.35, .6, .45, .55) > 1.2 * max(mean(.35, .6, .15, .3), mean(.35, .6, .7, .85))
    # ... and the heart is on the image right (patient's left on a PA film): no left-right flip.
    assert mean(.6, .72, .58, .70) > 1.05 * mean(.6, .72, .30, .42)
    assert rg.meta["patient_orientation"] == ["L", "F"]


def test_real_cr_j2k_lossless_matches_uncompressed_or_names_codec():
    ref = read_image(PYDICOM_DATA / "RG1_UNCR.dcm")
    try:
        rg = read_image(PYDICOM_DATA / "RG1_J2KR.dcm")
    except ImageReadError as e:  # no JPEG 2000 decoder installed
        assert "JPEG 2000" in str(e) and "1.2.840.10008.1.2.4.90" in str(e)
    else:
        assert np.array_equal(rg.pixels, ref.pixels)


def test_real_jpeg_ls_decoded_via_pillow_jpls():
    pytest.importorskip("pillow_jpls")
    ref = read_image(PYDICOM_TEST_FILES / "MR_small.dcm")
    rg = read_image(PYDICOM_TEST_FILES / "MR_small_jpeg_ls_lossless.dcm")
    assert rg.shape == (64, 64) and np.array_equal(rg.pixels, ref.pixels)


def test_real_rgb_dicom_to_grey():
    rg = read_image(PYDICOM_DATA / "SC_rgb.dcm")
    assert rg.shape == (100, 100) and rg.meta["photometric_interpretation"] == "RGB"


# ------------------------------------------------------------------------------------ bad input
def _bad(tmp_path: Path, case: str) -> Path:
    dcm = write_dicom(tmp_path / "ok.dcm", asym())
    raw = dcm.read_bytes()
    p = tmp_path / "bad.dcm"
    if case == "missing":
        return tmp_path / "nope.dcm"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "truncated-pixels":
        p.write_bytes(raw[:-1000])
    elif case == "truncated-header":
        p.write_bytes(raw[:200])
    elif case == "no-pixel-data":
        write_dicom(p, np.zeros((0, 0), np.uint16), Rows=H, Columns=W)
    elif case == "text-as-dcm":
        p.write_text("Patient: nobody\nThis is not DICOM, only text.\n")
    elif case == "dicom-1x1":
        write_dicom(p, np.array([[7]], np.uint16))
    elif case == "png-1x1":
        Image.fromarray(np.array([[7]], np.uint8)).save(p := tmp_path / "one.png")
    elif case == "png-4x64":
        Image.fromarray(np.zeros((4, 64), np.uint8)).save(p := tmp_path / "thin.png")
    elif case == "truncated-png":
        Image.fromarray((asym() // 16).astype(np.uint8)).save(tmp_path / "t.png")
        good = (tmp_path / "t.png").read_bytes()
        (p := tmp_path / "cut.png").write_bytes(good[:len(good) // 2])
    elif case == "text-as-png":
        (p := tmp_path / "fake.png").write_text("not a png")
    elif case == "truncated-nifti":
        write_nifti_2d(np.random.default_rng(0).random((H, W)), tmp_path / "t.nii.gz")
        good = (tmp_path / "t.nii.gz").read_bytes()
        (p := tmp_path / "cut.nii.gz").write_bytes(good[:len(good) // 2])
    elif case == "unsupported":
        (p := tmp_path / "img.bmp").write_bytes(b"BM" + b"\0" * 100)
    elif case == "missing-codec":
        write_dicom(p, np.zeros((0, 0), np.uint16), Rows=H, Columns=W, ts=JPEGLosslessSV1,
                    pixel_data=encapsulate([b"\xff\xd8\xff\xc3not-a-real-codestream\xff\xd9"]))
    return p


@pytest.mark.parametrize("case, words", [
    ("missing", "not found"), ("empty", "empty"), ("truncated-pixels", "truncated"),
    ("truncated-header", "truncated"), ("no-pixel-data", "no pixel data"), ("text-as-dcm", "not a DICOM"),
    ("dicom-1x1", "too small: 1x1"), ("png-1x1", "too small"), ("png-4x64", "4x64"),
    ("truncated-png", "cannot decode"), ("text-as-png", "not a valid .png"),
    ("truncated-nifti", "not a readable NIfTI"), ("unsupported", "unsupported file type '.bmp'"),
    ("missing-codec", "1.2.840.10008.1.2.4.70"),
])
def test_bad_input_raises_image_read_error(tmp_path, case, words):
    path = _bad(tmp_path, case)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert words in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.path == str(path)


# ---------------------------------------------------------------------------- writers, atomicity
def test_region_masks_round_trip(tmp_path):
    masks = np.zeros((3, H, W), bool)
    masks[0, 2:10, 3:15] = True  # top-left
    masks[1, 30:37, 50:60] = True  # bottom-right
    masks[2, :, :5] = True  # left edge
    path = write_region_masks(masks, tmp_path / "m.nii.gz", spacing=(0.2, 0.3))
    img = nib.load(path)
    assert img.shape == (W, H, 3) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, np.diag([-0.3, -0.2, 1, 1]))
    back = read_region_masks(path)
    assert back.dtype == bool and back.shape == (3, H, W) and np.array_equal(back, masks)
    one = read_region_masks(write_region_masks(masks[:1], tmp_path / "one.nii.gz"))
    assert one.shape == (1, H, W) and np.array_equal(one, masks[:1])
    with pytest.raises(ValueError, match="K, H, W"):
        write_region_masks(masks[0], tmp_path / "x.nii.gz")
    with pytest.raises(ImageReadError, match="not found"):
        read_region_masks(tmp_path / "absent.nii.gz")


def test_writers_leave_no_temp_files_and_keep_the_old_file_on_failure(tmp_path):
    write_png(asym(), tmp_path / "a.png", bits=16)
    write_png(asym(scale=0.001), tmp_path / "b.png")  # floats would be scaled; uint8 fits: unchanged
    write_nifti_2d(asym(), tmp_path / "c.nii.gz", (1.0, 1.0))
    write_json_atomic({"boxes": [[3, 2, 15, 10]], "name": "right lung"}, tmp_path / "d.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.nii.gz", "d.json"]
    assert read_json(tmp_path / "d.json") == {"boxes": [[3, 2, 15, 10]], "name": "right lung"}

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text('{"half": ')
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        aio._atomic(tmp_path / "d.json", half_then_fail)
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, tmp_path / "d.json")
    assert read_json(tmp_path / "d.json")["name"] == "right lung"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.nii.gz", "d.json"]
    (tmp_path / "e.json").write_text("{oops")
    with pytest.raises(ValueError, match="e.json"):
        read_json(tmp_path / "e.json")


def test_write_png_scaling_and_arguments(tmp_path):
    floats = asym().astype(np.float32) / 7.0
    rg = read_image(write_png(floats, tmp_path / "f.png"))
    assert rg.pixels.min() == 0 and rg.pixels.max() == 255
    assert_top_left(rg.pixels)
    with pytest.raises(ValueError, match="bits"):
        write_png(floats, tmp_path / "g.png", bits=12)
    with pytest.raises(ValueError, match="2D"):
        write_png(np.zeros((2, H, W)), tmp_path / "g.png")


def test_radiograph_display_helpers():
    rg = Radiograph(asym().astype(np.float32))
    u8, unit = rg.to_uint8(), rg.to_unit()
    assert u8.dtype == np.uint8 and u8.shape == (H, W) and u8.min() == 0 and u8.max() == 255
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert_top_left(u8)
    flat = Radiograph(np.full((H, W), 5.0, np.float32))
    assert flat.to_uint8().max() == 0 and flat.to_unit().max() == 0.0


# ------------------------------------------------------------------------------ MONAI load path
@pytest.fixture(scope="module")
def three_formats(tmp_path_factory):
    d = tmp_path_factory.mktemp("monai")
    a = asym()
    return a, {
        "dicom": write_dicom(d / "dx.dcm", a, PixelSpacing=[0.2, 0.3]),
        "png": write_png(a, d / "g.png", bits=16),
        "nifti": write_nifti_2d(a, d / "n.nii.gz", spacing=(0.2, 0.3)),
    }


@pytest.mark.parametrize("fmt", ["dicom", "png", "nifti"])
def test_load_radiographd_is_channel_first_row_col(three_formats, fmt):
    from anatomy_vlm.io import LoadRadiographd

    a, files = three_formats
    out = LoadRadiographd(keys="image")({"image": str(files[fmt]), "other": 1})
    img, meta = out["image"], out["image_meta_dict"]
    assert img.shape == (1, H, W) and img.dtype == np.float32 and out["other"] == 1
    assert_top_left(img[0])
    assert np.array_equal(img[0], a)
    assert meta["spatial_shape"] == (H, W) and meta["filename_or_obj"] == str(files[fmt])
    if fmt != "png":
        assert meta["spacing"] == pytest.approx((0.2, 0.3)) and meta["spacing_known"]


def test_load_radiographd_pickles_and_errors(three_formats, tmp_path):
    import pickle

    from anatomy_vlm.io import LoadRadiographd

    t = pickle.loads(pickle.dumps(LoadRadiographd(keys=["image"], apply_voi=False)))
    assert type(t) is LoadRadiographd and not t.apply_voi
    assert t({"image": str(three_formats[1]["png"])})["image"].shape == (1, H, W)
    (tmp_path / "x.dcm").write_text("text")
    with pytest.raises(ImageReadError, match="not a DICOM"):
        t({"image": str(tmp_path / "x.dcm")})


@pytest.mark.parametrize("fmt, reader", [("dicom", "ITKReader"), ("png", "ITKReader"), ("png", "PILReader"),
                                         ("nifti", "ITKReader"), ("nifti", "NibabelReader")])
def test_monai_loadimaged_gives_the_transpose(three_formats, fmt, reader):
    """Pinned: MONAI's LoadImaged returns (W, H) ((W, H, 1) for a 2D DICOM): x first, our transpose."""
    from monai.transforms import LoadImaged

    a, files = three_formats
    out = LoadImaged(keys="image", reader=reader, image_only=True)({"image": str(files[fmt])})
    arr = np.asarray(out["image"])
    assert arr.shape == ((W, H, 1) if fmt == "dicom" else (W, H))
    arr = arr.reshape(W, H)
    assert np.array_equal(arr, a.T)
    assert_top_left(arr.T)
    if reader == "ITKReader":  # ITK's identity direction = RAS affine diag(-1, -1, ...), as our NIfTI writer
        aff = np.asarray(out["image"].affine)
        assert aff[0, 0] < 0 and aff[1, 1] < 0
