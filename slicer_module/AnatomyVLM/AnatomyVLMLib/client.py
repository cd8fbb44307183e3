"""A small client for the Anatomy-VLM MONAI Label server, with no 3D Slicer dependency.

Only the Python standard library (``urllib``, ``email`` for multipart answers), so it runs inside 3D
Slicer's Python without extra packages, and in pytest against a real server.

    >>> c = AnatomyVLMClient("http://127.0.0.1:8000")
    >>> c.info()["name"]
    'Anatomy-VLM Label'
    >>> res = c.detect("cxr_0003")          # result JSON + the Slicer ROI markups file
    >>> [r["name"] for r in res.json["regions"]][:2]
    ['right lung', 'right upper lung zone']

Every failure is a :class:`ClientError` with the server's message (``{"detail": ...}`` of the app's
4xx/5xx answers) or the reason the server could not be reached; nothing is raised raw.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence


class ClientError(RuntimeError):
    """A request that did not succeed.

    Attributes:
        status: HTTP status (``None`` when the server could not be reached).
        detail: The server's message, or the connection error.
    """

    def __init__(self, detail: str, status: Optional[int] = None):
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


@dataclass
class InferResult:
    """An infer answer: the result JSON and, when the task returned one, the label file."""

    json: dict
    file_name: Optional[str] = None
    file_bytes: Optional[bytes] = None


def _multipart(body: bytes, content_type: str) -> list[tuple[str, Optional[str], bytes]]:
    """``[(field name, file name, bytes)]`` of a multipart/form-data answer."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts = []
    for part in msg.iter_parts():
        parts.append((part.get_param("name", header="content-disposition"), part.get_filename(),
                      part.get_payload(decode=True) or b""))
    return parts


class AnatomyVLMClient:
    """See the module docstring.

    Args:
        url: The server, e.g. ``http://127.0.0.1:8000``.
        timeout: Seconds per request (an encoder run on a new image takes about a second here).
    """

    def __init__(self, url: str, timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"the server address must start with http:// or https://, got {url!r}")
        self.url, self.timeout = url.rstrip("/"), float(timeout)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, query: Optional[dict] = None, body: Optional[bytes] = None,
                 content_type: Optional[str] = None):
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.headers.get("Content-Type", ""), r.headers.get("Content-Disposition", ""), r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
            except (ValueError, AttributeError):
                detail = raw.decode(errors="replace")[:500] or e.reason
            raise ClientError(str(detail), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ClientError(f"cannot reach the server at {self.url}: {reason}") from None

    @staticmethod
    def _form(fields: dict[str, Any], files: Optional[dict[str, tuple[str, bytes]]] = None) -> tuple[bytes, str]:
        boundary = uuid.uuid4().hex
        out = []
        for k, v in fields.items():
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        for k, (name, data) in (files or {}).items():
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                       f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        out.append(f"--{boundary}--\r\n".encode())
        return b"".join(out), f"multipart/form-data; boundary={boundary}"

    def _json(self, method: str, path: str, **kw) -> Any:
        _, _, _, raw = self._request(method, path, **kw)
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise ClientError(f"the server's answer to {path} is not JSON: {raw[:200]!r}") from None

    # -- the API ----------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """``GET /info/``; raises :class:`ClientError` when the server is not an Anatomy-VLM app."""
        info = self._json("GET", "/info/")
        if "anatomy_detection" not in (info.get("models") or {}):
            raise ClientError(f"{self.url} is a MONAI Label server without the Anatomy-VLM tasks "
                              f"(models: {sorted(info.get('models') or {})})")
        return info

    def infer(self, task: str, image: str, params: Optional[dict] = None) -> InferResult:
        """``POST /infer/<task>?image=<id>`` with the task's options in the ``params`` form field."""
        body, ctype = self._form({"params": json.dumps(params or {})})
        _, rtype, _, raw = self._request("POST", f"/infer/{urllib.parse.quote(task)}", {"image": image}, body, ctype)
        if rtype.startswith("application/json"):
            return InferResult(json.loads(raw))
        result, name, data = {}, None, None
        for field, filename, payload in _multipart(raw, rtype):
            if field == "params":
                result = json.loads(payload)
            else:
                name, data = filename, payload
        return InferResult(result, name, data)

    def detect(self, image: str, regions: Optional[Sequence[str]] = None) -> InferResult:
        """Boxes of the regions; ``file_bytes`` is the Slicer ROI markups JSON."""
        return self.infer("anatomy_detection", image, {"regions": list(regions or [])})

    def segment(self, image: str, regions: Optional[Sequence[str]] = None, label_format: str = "seg.nrrd") -> InferResult:
        """Masks of the regions as ``.seg.nrrd`` (overlapping segments), ``nii.gz`` or ``dcm`` (DICOM SEG)."""
        return self.infer("anatomy_segmentation", image, {"regions": list(regions or []), "label_format": label_format})

    def findings(self, image: str, prompts: Optional[Sequence[str]] = None, top_k: int = 3) -> dict:
        """Zero-shot findings per region and for the image (``region_findings``)."""
        return self.infer("region_findings", image, {"prompts": list(prompts or []), "top_k": top_k}).json

    def ground(self, image: str, sentence: str, top_k: int = 3, label_format: str = "heatmap.nii.gz") -> InferResult:
        """The regions a sentence refers to (``text_grounding``); the file is the heatmap or the segments."""
        return self.infer("text_grounding", image, {"sentence": sentence, "top_k": top_k,
                                                    "label_format": label_format})

    def _put_label(self, image: str, name: str, data: bytes, params: dict, tag: Optional[str]) -> dict:
        body, ctype = self._form({"params": json.dumps(params)}, {"label": (name, data)})
        query = {"image": image} | ({"tag": tag} if tag else {})
        return self._json("PUT", "/datastore/label", query=query, body=body, content_type=ctype)

    def save_boxes(self, image: str, boxes: dict[str, Optional[Sequence[float]]], user: str = "slicer") -> dict:
        """Corrected boxes ``{region name: [x0, y0, x1, y1] or None (not visible)}``; other regions untouched."""
        doc = {"regions": [{"name": n, "box": None if b is None else [float(v) for v in b]} for n, b in boxes.items()]}
        return self._put_label(image, "correction.json", json.dumps(doc).encode(), {"user": user}, None)

    def save_markups(self, image: str, markups_json: bytes, user: str = "slicer") -> dict:
        """An edited Slicer ROI markups file (the detection task's, moved ROIs) as a box correction."""
        return self._put_label(image, "correction.json", markups_json, {"user": user}, None)

    def save_masks(self, image: str, nifti: bytes, regions: Optional[Sequence[str]] = None, user: str = "slicer") -> dict:
        """Corrected masks: ``(29, H, W)`` region masks or an ``(H, W)`` label map as NIfTI bytes; ``regions``
        are the ones corrected (default every non-empty one)."""
        params = {"user": user} | ({"regions": list(regions)} if regions else {})
        return self._put_label(image, "masks.nii.gz", nifti, params, "final")

    def next_image(self, strategy: str = "region_uncertainty") -> dict:
        """The image active learning hands out next (``{}`` when none is left)."""
        return self._json("POST", f"/activelearning/{urllib.parse.quote(strategy)}", body=b"{}",
                          content_type="application/json")

    def train(self, settings: Optional[dict] = None) -> dict:
        """Start an ``anatomy_finetune`` round (runs in the server's background process)."""
        return self._json("POST", "/train/anatomy_finetune", body=json.dumps(settings or {}).encode(),
                          content_type="application/json")

    def restore(self, version: str) -> dict:
        """Serve an earlier model version again."""
        return self.train({"restore_version": version})

    def train_status(self) -> dict:
        """``GET /train/``: the last training task (``status`` RUNNING / DONE / ERROR, log lines)."""
        return self._json("GET", "/train/", query={"check_if_running": "false"})

    def train_stats(self) -> dict:
        """The fine-tuning round's stage, version and gate figures (``/info`` train stats)."""
        return (self._json("GET", "/info/").get("train_stats") or {}).get("anatomy_finetune", {})
