"""Encoder-output cache: each image is encoded once, everything above the encoder trains and
predicts from the cached embedding.

Keys are the SHA-1 of the image file's bytes plus an encoder tag (the encoder's name and the
digest of its weights), so a changed image or a fine-tuned encoder never reuses a stale embedding.
Embeddings are stored as float16 ``.pt`` files (``(C, h, w)``; 2 MB for LiteMedSAM's 256x64x64),
written atomically; an in-memory LRU sits in front for the server.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Short digest of a module's parameters and buffers (identifies a weight state)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(tuple(t.shape)).encode())
        h.update(f"{float(t.detach().float().sum()):.6e}".encode())
    return h.hexdigest()[:12]


class EmbeddingCache:
    """Disk cache (+ in-memory LRU) of encoder outputs.

    Args:
        root: Folder for ``<key>.pt`` files; ``None`` keeps the cache in memory only.
        tag: Encoder identity (e.g. ``litemedsam-<digest>``); part of every key.
        memory_items: Size of the in-memory LRU.
    """

    def __init__(self, root: str | os.PathLike | None, tag: str, memory_items: int = 32):
        self.root = Path(root) if root else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.memory_items = memory_items
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, image_digest: str) -> str:
        return hashlib.sha1(f"{self.tag}/{image_digest}".encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return self.root / key[:2] / f"{key}.pt" if self.root else None

    def get(self, image_digest: str) -> torch.Tensor | None:
        k = self.key(image_digest)
        with self._lock:
            if k in self._mem:
                self._mem.move_to_end(k)
                self.hits += 1
                return self._mem[k]
        p = self._path(k)
        if p is not None and p.is_file():
            try:
                t = torch.load(p, map_location="cpu", weights_only=True).float()
            except Exception:  # a damaged cache file is a miss, never an error
                p.unlink(missing_ok=True)
            else:
                self._remember(k, t)
                self.hits += 1
                return t
        self.misses += 1
        return None

    def put(self, image_digest: str, embedding: torch.Tensor) -> None:
        k = self.key(image_digest)
        t = embedding.detach().cpu()
        self._remember(k, t.float())
        p = self._path(k)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            torch.save(t.half().clone(), tmp)
            os.replace(tmp, p)

    def _remember(self, k: str, t: torch.Tensor) -> None:
        with self._lock:
            self._mem[k] = t
            self._mem.move_to_end(k)
            while len(self._mem) > self.memory_items:
                self._mem.popitem(last=False)
