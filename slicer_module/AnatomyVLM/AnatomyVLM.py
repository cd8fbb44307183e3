"""AnatomyVLM: a 3D Slicer scripted module for the Anatomy-VLM Label annotation loop.

Widget (thin: the .ui file and signal wiring) -> Logic (runs without the GUI) -> ``AnatomyVLMLib``
(the Slicer-free REST client and view helpers, tested in pytest against a real server).

Install: Edit > Application Settings > Modules > add ``slicer_module/AnatomyVLM`` to the additional module
paths, restart Slicer. The client uses only Python's standard library, so nothing is installed into
Slicer's Python. Not yet run inside Slicer by the project's CI (no Slicer there): the self-test below
(``AnatomyVLMTest``) is what to run in Slicer, with ``ANATOMY_VLM_SERVER`` set to a running server.

2D radiographs load as single-slice volumes; the server writes the ROI markups (LPS, mm) and segments with
the image's own geometry as ITK reads it, which is how Slicer places the volume, so no IJK/RAS conversion
is done here: ROIs and segments land on the image as loaded from the same file.
"""

from __future__ import annotations

import json
import os
import tempfile

import qt
import slicer
import vtk  # noqa: F401  (Slicer modules import it; the ROI nodes are vtkMRML)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

from AnatomyVLMLib import (AnatomyVLMClient, ClientError, grounding_emphasis, image_finding_rows, input_check_text,
                           region_rows, training_progress)


class AnatomyVLM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "Anatomy-VLM"
        parent.categories = ["Active Learning"]
        parent.contributors = ["Anatomy-VLM Label"]
        parent.helpText = ("Chest X-ray anatomy from an Anatomy-VLM MONAI Label server: 29 regions as ROIs and "
                           "segments, findings per region, type a finding to see where it is, submit "
                           "corrections, fine-tune.")
        parent.acknowledgementText = "Anatomy-VLM Label (open source)."


class AnatomyVLMLogic(ScriptedLoadableModuleLogic):
    """Everything the widget does, callable without it (and from the self-test)."""

    def __init__(self, url: str = "http://127.0.0.1:8000"):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = AnatomyVLMClient(url)
        self.image_id = None
        self.volume = None
        self.roi_nodes = {}
        self.segmentation = None
        self.last_detection = None
        self.last_findings = None

    def connect(self, url: str) -> dict:
        self.client = AnatomyVLMClient(url)
        return self.client.info()

    def load_image(self, image_id: str):
        """Fetch ``image_id`` from the datastore (``/datastore/image``) and load it as a volume."""
        status, _, disposition, data = self.client._request("GET", "/datastore/image", {"image": image_id})
        name = disposition.split("filename=")[-1].strip('"') if "filename=" in disposition else f"{image_id}.dcm"
        path = os.path.join(tempfile.mkdtemp(prefix="anatomyvlm-"), os.path.basename(name))
        with open(path, "wb") as fh:
            fh.write(data)
        self.volume = slicer.util.loadVolume(path, {"singleFile": True})
        self.image_id = image_id
        return self.volume

    def next_image(self, strategy: str = "region_uncertainty"):
        pick = self.client.next_image(strategy)
        if not pick.get("id"):
            return None
        return self.load_image(pick["id"])

    def detect(self):
        res = self.client.detect(self.image_id)
        path = os.path.join(tempfile.mkdtemp(prefix="anatomyvlm-"), "regions.json")
        with open(path, "wb") as fh:
            fh.write(res.file_bytes)
        for node in self.roi_nodes.values():
            slicer.mrmlScene.RemoveNode(node)
        loaded = slicer.util.loadMarkups(path)
        nodes = loaded if isinstance(loaded, (list, tuple)) else [loaded]
        self.roi_nodes = {n.GetName(): n for n in nodes if n is not None}
        self.last_detection = res.json
        return res.json

    def segment(self):
        res = self.client.segment(self.image_id)
        path = os.path.join(tempfile.mkdtemp(prefix="anatomyvlm-"), "regions.seg.nrrd")
        with open(path, "wb") as fh:
            fh.write(res.file_bytes)
        if self.segmentation is not None:
            slicer.mrmlScene.RemoveNode(self.segmentation)
        self.segmentation = slicer.util.loadSegmentation(path)
        return res.json

    def findings(self, prompts=None):
        self.last_findings = self.client.findings(self.image_id, prompts)
        return self.last_findings

    def ground(self, sentence: str) -> dict:
        res = self.client.ground(self.image_id, sentence)
        emphasis = grounding_emphasis(res.json)
        for name, node in self.roi_nodes.items():
            display = node.GetDisplayNode()
            if display is not None:
                display.SetOpacity(0.15 + 0.85 * emphasis.get(name, 0.0))
                display.SetLineThickness(0.6 if name in emphasis else 0.2)
        return res.json

    def submit_boxes(self, user: str = "slicer") -> dict:
        """The ROI nodes as edited, written with Slicer's own markups writer and sent back."""
        out = {}
        for name, node in self.roi_nodes.items():
            path = os.path.join(tempfile.mkdtemp(prefix="anatomyvlm-"), "roi.mrk.json")
            slicer.util.saveNode(node, path)
            with open(path, "rb") as fh:
                doc = json.load(fh)
            for m in doc.get("markups", []):
                m["name"] = name  # the stock naming is "Detection ROI - i"; the region name is what counts
            out = self.client.save_markups(self.image_id, json.dumps(doc).encode(), user=user)
        return out

    def submit_masks(self, user: str = "slicer") -> dict:
        """The segmentation exported as a label map of region ids (NIfTI) and sent as a mask correction."""
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(self.segmentation, label, self.volume)
        path = os.path.join(tempfile.mkdtemp(prefix="anatomyvlm-"), "masks.nii.gz")
        slicer.util.saveNode(label, path)
        slicer.mrmlScene.RemoveNode(label)
        with open(path, "rb") as fh:
            return self.client.save_masks(self.image_id, fh.read(), user=user)

    def train(self) -> dict:
        return self.client.train()

    def train_progress(self):
        return training_progress(self.client.train_stats())


class AnatomyVLMWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = AnatomyVLMLogic()
        ui = slicer.util.loadUI(self.resourcePath("UI/AnatomyVLM.ui"))
        self.layout.addWidget(ui)
        self.ui = slicer.util.childWidgetVariables(ui)
        self.ui.connectButton.connect("clicked()", self.on_connect)
        self.ui.nextImageButton.connect("clicked()", lambda: self._run(self.logic.next_image))
        self.ui.detectButton.connect("clicked()", self.on_detect)
        self.ui.segmentButton.connect("clicked()", lambda: self._run(self.logic.segment))
        self.ui.findingsButton.connect("clicked()", self.on_findings)
        self.ui.groundButton.connect("clicked()", self.on_ground)
        self.ui.submitBoxesButton.connect("clicked()", lambda: self._run(self.logic.submit_boxes))
        self.ui.submitMasksButton.connect("clicked()", lambda: self._run(self.logic.submit_masks))
        self.ui.trainButton.connect("clicked()", self.on_train)
        self.timer = qt.QTimer()
        self.timer.setInterval(2000)
        self.timer.connect("timeout()", self.on_poll)

    def _run(self, fn, *args):
        try:
            with slicer.util.tryWithErrorDisplay("Anatomy-VLM request failed", waitCursor=True):
                return fn(*args)
        except ClientError as e:
            self.ui.statusLabel.text = str(e)
        return None

    def on_connect(self):
        info = self._run(self.logic.connect, self.ui.serverUrlEdit.text)
        if info:
            self.ui.statusLabel.text = f"{info['name']} {info.get('version', '')}: {', '.join(info['models'])}"

    def _fill(self, table, rows):
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                table.setItem(i, j, qt.QTableWidgetItem(text))

    def on_detect(self):
        if self.ui.imageIdEdit.text and self.ui.imageIdEdit.text != self.logic.image_id:
            self._run(self.logic.load_image, self.ui.imageIdEdit.text)
        det = self._run(self.logic.detect)
        if det:
            self._fill(self.ui.regionsTable, region_rows(det, self.logic.last_findings))
            self.ui.statusLabel.text = input_check_text(det)  # a warning when the image is unlike the training images

    def on_findings(self):
        f = self._run(self.logic.findings)
        if f:
            self._fill(self.ui.regionsTable, region_rows(self.logic.last_detection or f, f))
            self._fill(self.ui.imageFindingsTable, image_finding_rows(f))
            self.ui.statusLabel.text = input_check_text(f)

    def on_ground(self):
        g = self._run(self.logic.ground, self.ui.sentenceEdit.text)
        if g:
            self.ui.statusLabel.text = ", ".join(f"{r['name']} {r['probability']:.2f}" for r in g["regions"])

    def on_train(self):
        if self._run(self.logic.train) is not None:
            self.timer.start()

    def on_poll(self):
        value, text = self._run(self.logic.train_progress) or (0, "")
        self.ui.trainProgress.value = value
        self.ui.trainStatusLabel.text = text
        if value >= 100 or text.startswith("Fine-tuning failed"):
            self.timer.stop()


class AnatomyVLMTest(ScriptedLoadableModuleTest):
    """Run inside Slicer with a server at ``ANATOMY_VLM_SERVER`` (default http://127.0.0.1:8000)."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_logic_round_trip()

    def test_logic_round_trip(self):
        logic = AnatomyVLMLogic(os.environ.get("ANATOMY_VLM_SERVER", "http://127.0.0.1:8000"))
        info = logic.client.info()
        self.assertIn("anatomy_detection", info["models"])
        self.assertIsNotNone(logic.next_image("random") or logic.load_image(next(iter(
            logic.client._json("GET", "/datastore/", query={"output": "all"})["objects"]))))
        det = logic.detect()
        self.assertEqual(len(det["regions"]), 29)
        self.assertEqual(len(logic.roi_nodes), 29)
        seg = logic.segment()
        self.assertEqual(logic.segmentation.GetSegmentation().GetNumberOfSegments(), len(seg["segments"]))
        g = logic.ground("The heart is enlarged.")
        self.assertEqual(len(g["regions"]), 3)
        self.delayDisplay("Anatomy-VLM logic test passed")
