"""Encode images once: fill the :class:`~anatomy_vlm.cache.EmbeddingCache` for a dataset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .cache import EmbeddingCache, file_digest, module_digest
from .io import read_image
from .model import letterbox


def default_cache_dir() -> Path:
    return Path(os.environ.get("ANATOMY_VLM_CACHE", Path.home() / ".cache" / "anatomy_vlm")) / "embeddings"


def encoder_tag(encoder: torch.nn.Module) -> str:
    return f"{type(encoder).__name__}-{module_digest(encoder)}"


def cached_encoder(encoder: torch.nn.Module, cache: EmbeddingCache):
    """The callable that fills ``cache``: ONNX Runtime when it works (:mod:`anatomy_vlm.model.onnx_encoder`),
    exported next to the cache folder, else the PyTorch encoder in eval mode."""
    from .model.onnx_encoder import fast_encoder

    encoder.eval()
    return fast_encoder(encoder, cache.root.parent if cache.root else None, cache.tag)


def embed_files(encoder: torch.nn.Module, paths: list[str | Path], cache: EmbeddingCache,
                progress: bool = True) -> list[str]:
    """Encode every image not yet in ``cache``; returns the image digests in order."""
    digests = []
    todo = []
    for p in paths:
        d = file_digest(p)
        digests.append(d)
        if cache.get(d) is None:
            todo.append((p, d))
    encode = cached_encoder(encoder, cache) if todo else None
    for p, d in tqdm(todo, desc="encode", unit="img", disable=not progress, file=sys.stderr):
        x, _ = letterbox(read_image(p).pixels)
        with torch.no_grad():
            cache.put(d, encode(x[None])[0])
    return digests
