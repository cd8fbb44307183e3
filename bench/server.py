"""A ``monailabel start_server`` subprocess for the REST benchmarks (one definition, two benches)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Start the app in ``app_dir`` on ``studies`` with ``--conf`` pairs; :meth:`stop` ends it.

    Raises:
        SystemExit: the server did not answer ``/info/`` within ``timeout`` seconds (log path in the message).
    """

    def __init__(self, app_dir: Path, studies: Path, workdir: Path, conf: dict, timeout: float = 300):
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [a for k, v in conf.items() for a in ("--conf", k, str(v))]
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
             "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=workdir, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                if requests.get(f"{self.url}/info/", timeout=5).ok:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise SystemExit(f"server did not start; log: {self.log_path}")
            time.sleep(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
