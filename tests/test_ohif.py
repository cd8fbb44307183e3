"""OHIF end to end: the OHIF v3 build shipped inside monailabel, served by the app at ``/ohif/``, over a real
Orthanc (DICOMweb), driven by headless Chromium (Debian's ``chromium``, installed by .ci/run) through
Playwright. The real CR and a demo study are uploaded to Orthanc; the app's SEG and SR of the real CR are
stored back with STOW-RS; the tests check from the page that the study list lists the studies, that the
viewer shows the CR with the SEG's segments (OHIF's segmentation service holds them, and the viewport has
their colours) and the SR's boxes (one box and label per region in the annotation layer). Screenshots are
saved as test artifacts in ``$ANATOMY_VLM_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repository)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from live_server import PLUGIN, Orthanc, launch_server, real_cr

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]  # no connections out of a closed network


def _ohif_build() -> Path | None:
    spec = importlib.util.find_spec("monailabel")
    if spec is None:
        return None
    index = Path(list(spec.submodule_search_locations)[0]) / "endpoints" / "static" / "ohif" / "index.html"
    return index if index.is_file() else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("Orthanc") is None or not PLUGIN.is_file(),
                       reason="Orthanc and its DICOMweb plugin (Debian orthanc, orthanc-dicomweb) are not installed; "
                              ".ci/run installs them"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason="Chromium (Debian chromium) is not installed; .ci/run installs it"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (requirements.txt has it; scripts/setup.sh installs it)"),
    pytest.mark.skipif(_ohif_build() is None, reason="this monailabel has no OHIF build"),
]

ARTIFACTS = Path(os.environ.get("ANATOMY_VLM_TEST_ARTIFACTS") or REPO / "test-artifacts") / "ohif"


@pytest.fixture(scope="module")
def ohif(demo_studies, tmp_path_factory):
    base = tmp_path_factory.mktemp("ohif")
    o = Orthanc(base)
    cr = o.upload(real_cr())
    demo = o.upload(sorted(demo_studies.studies.glob("cxr_*.dcm"))[0])
    server = launch_server(REPO / "apps" / "anatomy_vlm", None, base / "app-run", checkpoint=REPO / "apps" /
                           "anatomy_vlm" / "model" / "anatomy_vlm.pt", studies_url=f"{o.url}/dicom-web",
                           conf={"embedding_cache": base / "cache" / "embeddings", "prefetch_lookahead": 0},
                           env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(base / "dicomweb-cache")})
    server.url("/info/")
    stored = {}
    for task in ("anatomy_segmentation", "anatomy_detection"):  # SEG (default geometry when storing: viewer), SR
        r = httpx.post(server.url(f"/infer/{task}"), params={"image": cr, "output": "json"}, timeout=600,
                       data={"params": json.dumps({"label_format": "dcm", "store": True})})
        assert r.status_code == 200, r.text
        stored[r.json()["format"]] = r.json()
    src = pydicom.dcmread(str(real_cr()), stop_before_pixels=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield {"orthanc": o, "server": server, "cr": cr, "demo": demo, "study": str(src.StudyInstanceUID),
           "patient_id": str(src.PatientID), "stored": stored}
    server.stop()
    o.stop()


@pytest.fixture(scope="module")
def browser(ohif):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    pg.close()


def _viewer(page, ohif):
    page.goto(ohif["server"].url(f"/ohif/viewer?StudyInstanceUIDs={ohif['study']}"))
    page.get_by_text("Confirm and Hide").click(timeout=90_000)  # OHIF's "investigational use" banner
    page.wait_for_function("() => window.cornerstone && window.cornerstone.getEnabledElements().length > 0 && "
                           "window.cornerstone.getEnabledElements()[0].viewport.getCurrentImageId()", timeout=90_000)
    time.sleep(1.0)  # the first image's render


def _viewport_colour_fraction(page, path: Path) -> float:
    """Fraction of the viewport's pixels in the screenshot that are clearly coloured (the CR is grey)."""
    from PIL import Image

    box = page.evaluate("() => { const r = window.cornerstone.getEnabledElements()[0].viewport.element"
                        ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }")
    page.screenshot(path=str(path))
    x, y, w, h = (int(round(v)) for v in box)
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)[y + 30:y + h - 30, x + 10:x + w - 10]
    return float(((rgb.max(-1) - rgb.min(-1)) > 40).mean())


def test_study_list_lists_the_studies_with_the_stored_seg_and_sr(page, ohif):
    page.goto(ohif["server"].url("/ohif/"))
    page.get_by_text("Study List").wait_for(timeout=90_000)
    page.get_by_text(ohif["patient_id"]).first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    assert "2 Studies" in " ".join(text.split()), text[:2000]
    assert "CR\\SEG\\SR" in text  # the real CR's study, with what the app stored into it
    assert not page.errors, page.errors


def test_viewer_shows_the_segments_over_the_real_cr(page, ohif):
    _viewer(page, ohif)
    before = _viewport_colour_fraction(page, ARTIFACTS / "ohif_cr.png")
    page.get_by_text("Anatomy-VLM regions (SEG)").first.dblclick()
    page.get_by_role("button", name="Yes").click(timeout=90_000)  # "Do you want to open this Segmentation?"
    page.wait_for_function("() => window.services.segmentationService.getSegmentations().length > 0",
                           timeout=120_000)
    labels = page.evaluate("() => Object.values(window.services.segmentationService.getSegmentations()[0]"
                           ".segments).filter(Boolean).map(s => s.label)")
    seg_regions = ohif["stored"]["dicom-seg"]["labels"]
    assert "right lung" in labels and "cardiac silhouette" in labels and "carina" in labels
    assert set(labels) <= set(seg_regions) and len(labels) >= 25  # the found (non-empty) regions of the SEG
    time.sleep(2.0)  # the labelmap render
    after = _viewport_colour_fraction(page, ARTIFACTS / "ohif_seg.png")
    assert before < 0.01 and after > 0.25, (before, after)
    assert not page.errors, page.errors


def test_viewer_shows_the_sr_boxes_over_the_real_cr(page, ohif):
    _viewer(page, ohif)
    page.get_by_text("Anatomy-VLM regions and findings (SR)").first.dblclick()
    page.wait_for_function("() => { const s = document.querySelector('svg.svg-layer'); "
                           "return s && s.querySelectorAll('text').length >= 29; }", timeout=120_000)
    texts = page.evaluate("() => Array.from(document.querySelectorAll('svg.svg-layer text')).map(t => t.textContent)")
    sr = ohif["stored"]["dicom-sr"]
    assert len(texts) == len(sr["regions"]) == 29
    # each box carries its region's detection score as the app answered it
    shown = sorted(float(t.split("Region detection score: ")[1][:4]) for t in texts)
    assert np.allclose(shown, sorted(sr["scores"]), atol=0.006), (shown, sorted(sr["scores"]))
    # the finding site closes each label: the SNOMED CT structure, or the region name for the project's codes
    assert sum(t.endswith("cavoatrial junction") for t in texts) == 1
    assert sum(t.endswith(": Lung") for t in texts) == 2  # right and left lung
    n_shapes = page.evaluate("() => document.querySelectorAll('svg.svg-layer path, svg.svg-layer polyline, "
                             "svg.svg-layer rect').length")
    assert n_shapes >= 29
    _viewport_colour_fraction(page, ARTIFACTS / "ohif_sr.png")
    assert not page.errors, page.errors
