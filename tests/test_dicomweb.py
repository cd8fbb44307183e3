"""The app over a real DICOMweb server (Orthanc with its DICOMweb plugin, Debian packages installed by
.ci/run): DX and CR series listed as images, inference on them, SEG and SR stored back with STOW-RS,
a broken instance in Orthanc and Orthanc stopped mid-session giving clear errors while the server stays up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pydicom
import pytest
from live_server import PLUGIN, Orthanc, launch_server, real_cr

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("Orthanc") is None or not PLUGIN.is_file(),
    reason="Orthanc and its DICOMweb plugin (Debian orthanc, orthanc-dicomweb) are not installed; .ci/run installs them")]


@pytest.fixture(scope="module")
def pacs(demo_studies, tmp_path_factory):
    base = tmp_path_factory.mktemp("orthanc")
    o = Orthanc(base)
    dcm = sorted(demo_studies.studies.glob("cxr_*.dcm"))
    uids = {"demo": [o.upload(p) for p in dcm[:2]], "real": o.upload(real_cr())}
    server = launch_server(REPO / "apps" / "anatomy_vlm", None, base / "app-run", checkpoint=REPO / "apps" /
                           "anatomy_vlm" / "model" / "anatomy_vlm.pt", studies_url=f"{o.url}/dicom-web",
                           conf={"embedding_cache": base / "cache" / "embeddings", "prefetch_lookahead": 0},
                           env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(base / "dicomweb-cache")})  # this run's own
    server.url("/info/")
    yield {"orthanc": o, "server": server, "uids": uids}
    server.stop()
    o.stop()


def test_dx_and_cr_series_are_the_images(pacs):
    s = pacs["server"]
    info = httpx.get(s.url("/info/"), timeout=60).json()
    assert info["datastore"]["total"] == 3
    r = httpx.post(s.url("/activelearning/random"), timeout=120)
    assert r.status_code == 200 and r.json()["id"] in pacs["uids"]["demo"] + [pacs["uids"]["real"]]
    pacs["handed_out"] = r.json()["id"]  # the app fetches (and encodes) the handed-out series at once


def test_infer_on_the_real_cr_and_store_seg_and_sr_back(pacs):
    s, o, cr = pacs["server"], pacs["orthanc"], pacs["uids"]["real"]
    r = httpx.post(s.url("/infer/anatomy_detection"), params={"image": cr, "output": "json"}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["image_shape"] == [1955, 1841] and len(r.json()["regions"]) == 29
    study = pydicom.dcmread(str(real_cr()), stop_before_pixels=True).StudyInstanceUID
    stored_by = {}
    for task, modality in (("anatomy_segmentation", "SEG"), ("anatomy_detection", "SR")):
        r = httpx.post(s.url(f"/infer/{task}"), params={"image": cr, "output": "json"}, timeout=300,
                       data={"params": json.dumps({"label_format": "dcm", "store": True})})
        assert r.status_code == 200, r.text
        stored = r.json()["stored"]
        stored_by[modality] = stored
        assert stored["Modality"] == modality and stored["StudyInstanceUID"] == study
        found = [x for x in o.series(modality) if x["0020000E"]["Value"][0] == stored["SeriesInstanceUID"]]
        assert found and found[0]["0020000D"]["Value"][0] == study  # in the same study, where OHIF looks
    seg = httpx.get(f"{o.url}/dicom-web/studies/{study}/series/{stored_by['SEG']['SeriesInstanceUID']}/metadata",
                    timeout=60).json()[0]
    shared = seg["52009229"]["Value"][0]  # stored for OHIF: the viewer geometry (the CR has none of its own)
    assert shared["00209116"]["Value"][0]["00200037"]["Value"] == [0, 1, 0, 0, 0, -1]


def test_store_without_dicomweb_or_dcm_is_refused(pacs):
    s, cr = pacs["server"], pacs["uids"]["real"]
    r = httpx.post(s.url("/infer/anatomy_segmentation"), params={"image": cr, "output": "json"}, timeout=300,
                   data={"params": json.dumps({"label_format": "png"})})
    assert r.status_code == 400 and "unknown label_format" in r.json()["detail"]
    r = httpx.post(s.url("/infer/anatomy_segmentation"), params={"image": cr, "output": "json"}, timeout=300,
                   data={"params": json.dumps({"label_format": "dcm", "store": True, "seg_geometry": "axial"})})
    assert r.status_code == 400 and "unknown seg_geometry" in r.json()["detail"]


def test_a_broken_instance_gives_a_clear_error_and_the_server_stays_up(pacs, tmp_path):
    from pydicom.uid import generate_uid

    s, o = pacs["server"], pacs["orthanc"]
    ds = pydicom.dcmread(str(real_cr()))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # a third of the pixel data: Orthanc stores it as is
    ds.save_as(str(tmp_path / "broken.dcm"))
    broken = o.upload(tmp_path / "broken.dcm")
    r = httpx.post(s.url("/infer/anatomy_detection"), params={"image": broken, "output": "json"}, timeout=300)
    assert r.status_code == 422, r.text
    assert "cannot read the image" in r.json()["detail"] and "pixel data" in r.json()["detail"]
    assert httpx.get(s.url("/info/"), timeout=60).status_code == 200
    r = httpx.post(s.url("/infer/anatomy_detection"), params={"image": pacs["uids"]["real"], "output": "json"},
                   timeout=300)
    assert r.status_code == 200, r.text


def test_orthanc_stopped_mid_session_gives_clear_errors_and_the_server_stays_up(pacs):
    s, o = pacs["server"], pacs["orthanc"]
    cached = pacs["uids"]["real"]  # fetched by the tests above
    never = next(u for u in pacs["uids"]["demo"] if u != pacs.get("handed_out"))  # not fetched yet
    o.stop()
    r = httpx.post(s.url("/infer/anatomy_detection"), params={"image": never, "output": "json"}, timeout=120)
    assert r.status_code == 502, r.text
    assert "DICOMweb server" in r.json()["detail"] and "could not" in r.json()["detail"]
    assert httpx.get(s.url("/info/"), timeout=60).status_code == 200  # the last series list, said in the log
    r = httpx.post(s.url("/infer/anatomy_detection"), params={"image": cached, "output": "json"}, timeout=300)
    assert r.status_code == 200, r.text  # images already fetched still work
    r = httpx.post(s.url("/infer/anatomy_segmentation"), params={"image": cached, "output": "json"}, timeout=300,
                   data={"params": json.dumps({"label_format": "dcm", "store": True})})
    assert r.status_code == 502 and "did not store the SEG" in r.json()["detail"]
