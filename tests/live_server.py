"""Real servers for tests: a ``monailabel start_server`` subprocess (shared by the app, annotation-loop, DICOMweb
and OHIF tests) and an Orthanc DICOMweb server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""The DICOMweb plugin of Debian's orthanc-dicomweb."""


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A ``monailabel start_server`` subprocess; :meth:`url` waits until it answers."""

    def __init__(self, proc: subprocess.Popen, base_url: str, log: Path, app_dir: Path, studies: Path):
        self.proc, self.base_url, self.log, self.app_dir, self.studies = proc, base_url, log, app_dir, studies
        self._ready = False

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def url(self, path: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._ready = httpx.get(self.base_url + "/info/", timeout=5).status_code == 200
            except httpx.TransportError:
                pass
            if not self._ready:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {timeout} s:\n{self.log_tail()}")
                time.sleep(0.5)
        return self.base_url + path


    def stop(self) -> None:
        _terminate(self.proc)


def launch_server(app_src: Path, studies: Path | None, base: Path, conf: dict | None = None,
                  checkpoint: Path | None = None, studies_url: str | None = None,
                  env: dict | None = None) -> LiveServer:
    """Start a server on a copy of the app (start_server writes model/, logs/, bin/ into the app folder; the
    copy keeps the repository clean), with ``checkpoint`` copied into the copy's ``model/`` if given;
    ``studies_url`` (a DICOMweb URL) instead of a studies folder; ``env``: extra environment variables."""
    base.mkdir(parents=True, exist_ok=True)
    app_dir = base / "app"
    shutil.copytree(app_src, app_dir, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    if checkpoint is not None:
        (app_dir / "model").mkdir()
        shutil.copy2(checkpoint, app_dir / "model" / "anatomy_vlm.pt")
    port = _free_port()
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MONAI_LABEL_SESSION_PATH"] = str(base / "sessions")
    env["TMPDIR"] = str(base)  # start_server writes its logging config to a temp file and keeps it
    args = []
    for k, v in (conf or {}).items():
        args += ["--conf", k, str(v)]
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
             "--studies", studies_url or str(studies), "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return LiveServer(proc, f"http://127.0.0.1:{port}", log, app_dir, studies)


def real_cr() -> Path:
    """The real CR RG1_UNCR.dcm of the pydicom-data package."""
    import importlib.util

    spec = importlib.util.find_spec("data_store")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "RG1_UNCR.dcm"


class Orthanc:
    """A real Orthanc with its DICOMweb plugin on a free port, its storage under ``base``."""

    def __init__(self, base: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (base / "db").mkdir(parents=True)
        cfg = {"Name": "anatomy-vlm-test", "StorageDirectory": str(base / "db"), "IndexDirectory": str(base / "db"),
               "HttpPort": self.port, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (base / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(["Orthanc", str(base / "orthanc.json")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/system", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "Orthanc did not start"
            time.sleep(0.3)

    def upload(self, path: Path) -> str:
        r = httpx.post(self.url + "/instances", content=path.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        return pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID

    def series(self, modality: str) -> list[dict]:
        return httpx.get(f"{self.url}/dicom-web/series", params={"Modality": modality}, timeout=30).json()

    def stop(self) -> None:
        _terminate(self.proc)
