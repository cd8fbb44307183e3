"""DICOM SEG and SR written from a prediction of the shipped checkpoint: re-read with the libraries,
checked against the prediction, and validated with dciodvfy (dicom3tools) and dsrdump (dcmtk), which
.ci/run installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from live_server import real_cr

from anatomy_vlm.anatomy import REGIONS

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "apps" / "anatomy_vlm" / "model" / "anatomy_vlm.pt"
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy (Debian dicom3tools) is not installed; .ci/run installs it")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None,
                                   reason="dsrdump (Debian dcmtk) is not installed; .ci/run installs it")


@pytest.fixture(scope="module")
def written(demo_studies, tmp_path_factory, two_torch_threads):
    from anatomy_vlm.dicom_out import write_seg, write_sr
    from anatomy_vlm.findings import region_findings
    from anatomy_vlm.predict import Predictor

    p = Predictor.from_checkpoint(CHECKPOINT, cache_dir=tmp_path_factory.mktemp("cache") / "embeddings")
    out = tmp_path_factory.mktemp("dicom")
    res = {}
    for name, image in (("demo", demo_studies.studies / f"{demo_studies.ids('.dcm')[0]}.dcm"), ("real", real_cr())):
        pred = p.predict(image, with_masks=True, align=True)
        found = region_findings(pred, p.language(), top_k=2)
        res[name] = {"image": image, "pred": pred, "findings": found,
                     "seg": write_seg(pred, image, out / f"{name}_seg.dcm"),
                     "seg_viewer": write_seg(pred, image, out / f"{name}_seg_viewer.dcm", geometry="viewer"),
                     "sr": write_sr(pred, image, out / f"{name}_sr.dcm", found)}
    res["png"] = demo_studies.studies / f"{demo_studies.ids('.png')[0]}.png"
    res["predictor"] = p
    return res


@pytest.mark.parametrize("name", ["demo", "real"])
@pytest.mark.parametrize("kind", ["seg", "seg_viewer"])
def test_seg_holds_one_segment_per_found_region_with_its_mask(written, name, kind):
    # read with pydicom (highdicom's reader wants a slice thickness a projection radiograph does not have;
    # the standard makes it conditional on volumetric images)
    w = written[name]
    src = pydicom.dcmread(str(w["image"]), stop_before_pixels=True)
    seg = pydicom.dcmread(str(w[kind]))
    pred = w["pred"]
    found = [k for k in range(len(pred.indices)) if pred.masks[k].any()]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == len(found) > 20
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    numbers = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for f in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(numbers) == list(range(1, len(found) + 1))
    for n, k in enumerate(found, start=1):
        d = seg.SegmentSequence[n - 1]
        assert d.SegmentNumber == n and d.SegmentLabel == REGIONS[pred.indices[k]].name
        assert np.array_equal(frames[numbers.index(n)], pred.masks[k]), d.SegmentLabel
        f = seg.PerFrameFunctionalGroupsSequence[numbers.index(n)]
        assert f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    rl = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]  # right lung: SNOMED CT lung, right
    assert (rl.CodeValue, rl.CodingSchemeDesignator) == ("39607008", "SCT")
    assert rl.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    # a lung and its zone overlap: both frames keep the shared pixels
    zone = next(n for n, k in enumerate(found, 1) if REGIONS[pred.indices[k]].name == "right lower lung zone")
    assert (frames[numbers.index(1)] & frames[numbers.index(zone)]).any()


@pytest.mark.parametrize("name", ["demo", "real"])
def test_sr_boxes_scores_and_findings(written, name):
    w = written[name]
    sr = pydicom.dcmread(str(w["sr"]))
    src = pydicom.dcmread(str(w["image"]), stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    groups = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"][
        0].ContentSequence
    pred = w["pred"]
    assert len(groups) == len(pred.indices) == 29
    for g, k in zip(groups, range(len(pred.indices))):
        items = {it.ConceptNameCodeSequence[0].CodeMeaning: it for it in g.ContentSequence}
        assert items["Tracking Identifier"].TextValue == REGIONS[pred.indices[k]].name
        xy = np.asarray(items["Image Region"].GraphicData, float).reshape(-1, 2)
        x0, y0, x1, y1 = pred.boxes[k]
        assert np.allclose(xy[[0, 2]], [[x0, y0], [x1, y1]], atol=1e-2) and np.allclose(xy[0], xy[-1])
        score = float(items["Region detection score"].MeasuredValueSequence[0].NumericValue)
        assert score == pytest.approx(float(pred.scores[k]), abs=1e-3)
        probs = [m for m in items if m.startswith("Probability of ")]
        assert len(probs) == 2  # the top-2 findings of the region

def test_seg_geometry_source_is_none_and_viewer_is_what_ohif_assumes(written):
    from anatomy_vlm.dicom_out import VIEWER_ORIENTATION, write_seg

    src = pydicom.dcmread(str(written["real"]["image"]), stop_before_pixels=True)
    assert "ImageOrientationPatient" not in src and "FrameOfReferenceUID" not in src  # the real CR has none
    plain = pydicom.dcmread(str(written["real"]["seg"]), stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in plain
    assert "PlaneOrientationSequence" not in plain.PerFrameFunctionalGroupsSequence[0]
    seg = pydicom.dcmread(str(written["real"]["seg_viewer"]), stop_before_pixels=True)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == list(VIEWER_ORIENTATION)
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.0, 1.0]  # the CR's is 0\\0
    assert seg.SeriesDescription == "Anatomy-VLM regions (SEG), nominal 1 mm grid; unfamiliar image"  # the check
    assert written["real"]["pred"].input_check["level"] == "outside the training range"
    sr = pydicom.dcmread(str(written["real"]["sr"]), stop_before_pixels=True)
    assert sr.SeriesDescription == "Anatomy-VLM regions and findings (SR); unfamiliar image"
    for f in seg.PerFrameFunctionalGroupsSequence:
        assert [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] == [0.0, 0.0, 0.0]
    # one frame of reference per source image, whichever SEG of it
    again = write_seg(written["real"]["pred"], written["real"]["image"],
                      written["real"]["seg"].parent / "again.dcm", geometry="viewer")
    assert pydicom.dcmread(str(again), stop_before_pixels=True).FrameOfReferenceUID == seg.FrameOfReferenceUID
    with pytest.raises(ValueError, match="unknown SEG geometry"):
        write_seg(written["real"]["pred"], written["real"]["image"], written["real"]["seg"].parent / "x.dcm",
                  geometry="axial")


def test_a_non_dicom_source_is_refused(written):
    from anatomy_vlm.dicom_out import write_seg

    pred = written["predictor"].predict(written["png"], with_masks=True)
    with pytest.raises(ValueError, match="need a DICOM source image"):
        write_seg(pred, written["png"], written["png"].parent / "x.dcm")


@needs_dciodvfy
@pytest.mark.parametrize("name", ["demo", "real"])
@pytest.mark.parametrize("kind", ["seg", "seg_viewer", "sr"])
def test_dciodvfy_finds_no_errors(written, name, kind):
    r = subprocess.run(["dciodvfy", str(written[name][kind])], capture_output=True, text=True)
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors, out
    assert ("ComprehensiveSR" if kind == "sr" else "Segmentation") in out


@needs_dsrdump
def test_dsrdump_reads_the_report(written):
    r = subprocess.run(["dsrdump", str(written["real"]["sr"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Imaging Measurement Report" in r.stdout and '"right lung"' in r.stdout
    assert '(39607008,SCT,"Lung")' in r.stdout and '(24028007,SCT,"Right")' in r.stdout
