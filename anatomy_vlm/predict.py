"""Prediction API: one loaded model, encoder output cached per image, boxes and masks in original pixels.

    >>> p = Predictor.from_checkpoint("apps/anatomy_vlm/model/anatomy_vlm.pt", cache_dir="data/cache/embeddings")
    >>> pred = p.predict("study.dcm", with_masks=True, regions=["right lung", "cardiac silhouette"])
    >>> pred.to_json()["regions"][0]
    {'name': 'right lung', 'id': 1, 'box': [x0, y0, x1, y1], 'score': 0.98}

Coordinates (DESIGN section 7): ``[x0, y0, x1, y1]`` pixel *edges* on the original image grid, x = column,
y = row; a box covering exactly columns ``0..W-1`` is ``[0, 0, W, H]``.

Box source: without masks each region's box is the anatomy decoder's box. With masks, a region whose mask
is not empty gets the bounding box of its mask (the mask decoder is the sharper localiser); the decoder's
box stays in :attr:`Prediction.decoder_boxes` and :attr:`Prediction.box_source` says which one was used.
A checkpoint with a box calibration (:mod:`anatomy_vlm.box_calibration`) shifts the dense head's mask
boxes by its per-region offsets to the reference boxes' convention.

The second half of this module turns a :class:`Prediction` into what 3D Slicer loads (a markups ROI JSON
file and a multi-layer ``.seg.nrrd``), placed with the image's geometry as ITK reads it (see
:class:`ImageGeometry`); the MONAI Label infer tasks in ``apps/anatomy_vlm/lib/infers`` only call these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .anatomy import NUM_REGIONS, REGION_NAMES, REGIONS, region as _lookup_region
from .box_calibration import apply_box_calibration, calibration_offsets
from .cache import EmbeddingCache, file_digest
from .familiarity import Familiarity, header_meta, metadata_notes, pooled_features
from .io import Radiograph, read_image
from .model.query_mask_head import mask_boxes
from .model.dense_mask_head import boxes_from_logits, clean_logits, mask_quality

logger = logging.getLogger(__name__)

__all__ = [
    "ImageGeometry", "Prediction", "Predictor", "flat_labelmap", "image_geometry", "resolve_regions",
    "slicer_roi_markups", "write_flat_labelmap", "write_image_map", "write_seg_nrrd", "write_slicer_roi_markups",
]

def resolve_regions(regions: str | Iterable[str | int] | None) -> list[int]:
    """Region indices (0-based, query order) for a request.

    Args:
        regions: ``None``, ``""`` or ``"all"`` for all 29; a list of names / ids / keys / aliases, or one
            comma-separated string (``"right lung, left lung"``). Duplicates are dropped, order kept.

    Raises:
        ValueError: an unknown region, with the list of valid names.
    """
    if regions is None:
        return list(range(NUM_REGIONS))
    if isinstance(regions, (str, int)):
        items: list[Any] = [s for s in str(regions).split(",")] if isinstance(regions, str) else [regions]
    else:
        items = list(regions)
    items = [s.strip() if isinstance(s, str) else s for s in items]
    items = [s for s in items if s != ""]
    if not items or (len(items) == 1 and isinstance(items[0], str) and items[0].lower() == "all"):
        return list(range(NUM_REGIONS))
    out: list[int] = []
    for item in items:
        try:
            idx = _lookup_region(item).id - 1
        except KeyError:
            raise ValueError(f"unknown region {item!r}; valid names: {', '.join(REGION_NAMES)}") from None
        if idx not in out:
            out.append(idx)
    return out


@dataclass
class Prediction:
    """The regions found in one image.

    Attributes:
        image: Source path (``""`` for an in-memory image).
        image_shape: ``(H, W)`` of the original image.
        indices: Region indices (query order, 0-based) of the rows below; ``ids`` are ``indices + 1``.
        boxes: float32 ``(K, 4)`` ``[x0, y0, x1, y1]`` original-image pixel edges (final boxes, see module doc).
        scores: float32 ``(K,)`` ``sigmoid(presence logit)``.
        decoder_boxes: float32 ``(K, 4)`` the anatomy decoder's boxes in the same frame.
        masks: bool ``(K, H, W)`` or ``None`` when masks were not asked for.
        box_source: per row ``"mask"`` (bounding box of a non-empty mask) or ``"decoder"``.
        timing: seconds: ``embed`` (encoder or cache), ``decode``, ``masks``, ``total``; ``cached`` whether
            the embedding came from the cache.
        aligned: With ``predict(..., align=True)``: the language stage's joint-space embeddings of all 29
            regions and of the image (:class:`~anatomy_vlm.model.aligner.AlignOutput`, batch of one), else
            ``None``; :mod:`anatomy_vlm.findings` scores findings and sentences against them.
        input_check: How far the image is from what the model was trained on
            (:mod:`anatomy_vlm.familiarity`): ``{"level", "distance", "threshold", "ratio", "message",
            "notes"}``; ``None`` for a prediction made without one.
    """

    image: str
    image_shape: tuple[int, int]
    indices: tuple[int, ...]
    boxes: np.ndarray
    scores: np.ndarray
    decoder_boxes: np.ndarray
    masks: np.ndarray | None = None
    box_source: tuple[str, ...] = ()
    timing: dict[str, Any] = field(default_factory=dict)
    aligned: Any = None
    input_check: dict[str, Any] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(REGIONS[i].name for i in self.indices)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(REGIONS[i].id for i in self.indices)

    def subset(self, regions: str | Iterable[str | int] | None) -> Prediction:
        """The rows of ``regions`` (names, ids or keys; must be among the predicted ones)."""
        want = resolve_regions(regions)
        missing = [REGIONS[i].name for i in want if i not in self.indices]
        if missing:
            raise ValueError(f"region(s) {missing} were not predicted; predicted: {list(self.names)}")
        rows = [self.indices.index(i) for i in want]
        return Prediction(self.image, self.image_shape, tuple(want), self.boxes[rows], self.scores[rows],
                          self.decoder_boxes[rows], None if self.masks is None else self.masks[rows],
                          tuple(self.box_source[r] for r in rows) if self.box_source else (), dict(self.timing),
                          self.aligned, self.input_check)

    def to_json(self, regions: str | Iterable[str | int] | None = None) -> dict[str, Any]:
        """``{"image", "image_shape": [H, W], "regions": [{"name", "id", "box": [x0, y0, x1, y1], "score",
        "box_source"}, ...], "input_check": {...}}`` (DESIGN section 7), rows in the order the regions were
        asked for; ``input_check`` only when the prediction has one."""
        p = self if regions is None else self.subset(regions)
        extra = {} if p.input_check is None else {"input_check": p.input_check}
        return {
            "image": p.image,
            "image_shape": [int(p.image_shape[0]), int(p.image_shape[1])],
            "regions": [
                {"name": REGIONS[i].name, "id": REGIONS[i].id,
                 "box": [round(float(v), 2) for v in p.boxes[k]],
                 "score": round(float(p.scores[k]), 4),
                 "box_source": p.box_source[k] if p.box_source else "decoder"}
                for k, i in enumerate(p.indices)
            ],
            **extra,
        }


class Predictor:
    """One loaded :class:`~anatomy_vlm.model.AnatomyVLM` answering boxes and masks, thread-safe.

    The encoder runs at most once per image: embeddings are kept in an
    :class:`~anatomy_vlm.cache.EmbeddingCache` keyed by the file's SHA-1 (or, for an in-memory
    :class:`~anatomy_vlm.io.Radiograph`, by the digest of its pixels) and the encoder's weight digest.
    A lock serialises encoder runs (two requests for the same new image encode it once); the decoder and
    mask head run concurrently.

    Args:
        model: An ``AnatomyVLM`` (put in eval mode here).
        meta: Checkpoint metadata (shown in ``info()``).
        cache_dir: Folder for the disk cache; ``None`` keeps embeddings in memory only.
        memory_items: Size of the in-memory LRU of embeddings.
        mask_chunk: Regions upsampled to the original grid at once (bounds memory on large images).
        refine_steps: Mask passes gated by the previous masks' boxes after the first one, gated by
            the decoder's boxes (see ``AnatomyVLM.forward``).

    Attributes:
        encoder_calls: Number of encoder forward passes so far (tests and benchmarks read it).
    """

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, memory_items: int = 32, mask_chunk: int = 4,
                 refine_steps: int = 1):
        from .embed import encoder_tag

        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.meta = dict(meta or {})
        #: ``(29, 4)`` per-region box offsets from the checkpoint (:mod:`anatomy_vlm.box_calibration`),
        #: applied to mask-derived boxes; None (or set to None) for the raw boxes.
        self.box_calibration = calibration_offsets(self.meta)
        #: the training images' embedding statistics (:mod:`anatomy_vlm.familiarity`) that grade every
        #: image's ``input_check``; None when the checkpoint has none
        self._familiarity_error = None
        try:
            self.familiarity = Familiarity.from_meta(self.meta)
        except ValueError as e:  # the model still answers; its input_check says why it cannot grade
            logger.warning("checkpoint %s: unusable familiarity reference (%s)", self.meta.get("path", ""), e)
            self.familiarity, self._familiarity_error = None, str(e)
        enc = getattr(model, "encoder", None)
        tag = encoder_tag(enc) if enc is not None else "no-encoder"
        self.cache = EmbeddingCache(cache_dir, tag, memory_items=memory_items)
        self._encode = None  # built on the first encode: ONNX Runtime when it works, else PyTorch
        self.encoder_backend = "not loaded"
        self._fast_head = None  # the dense mask head, likewise (built on first use)
        self.mask_head_backend = "not loaded"
        self.mask_chunk = max(1, int(mask_chunk))
        self.refine_steps = int(refine_steps)
        self.encoder_calls = 0
        self._encoder_lock = threading.Lock()
        self._scorer = None  # the language stage's zero-shot scorer (built on first use)
        self._scorer_lock = threading.Lock()
        self._shapes: dict[str, tuple[int, int]] = {}
        self._inputs: OrderedDict[str, torch.Tensor] = OrderedDict()  # letterboxed grey inputs (1, S, S)
        self._inputs_lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                        memory_items: int = 32) -> Predictor:
        """Load a checkpoint written by :func:`anatomy_vlm.checkpoint.save_checkpoint`.

        Raises:
            FileNotFoundError: no file at ``path``.
            CheckpointFormatError: not a usable checkpoint.
        """
        from .checkpoint import load_model

        model, meta = load_model(path)
        meta = dict(meta)
        meta.setdefault("path", str(path))
        return cls(model, meta, cache_dir=cache_dir, memory_items=memory_items)

    # -- embeddings ------------------------------------------------------------------------------------
    @staticmethod
    def _pixels_digest(rg: Radiograph) -> str:
        a = np.ascontiguousarray(rg.pixels)
        h = hashlib.sha1(f"pixels/{a.dtype.str}/{a.shape}".encode())
        h.update(a.tobytes())
        return h.hexdigest()

    def _source(self, image: str | os.PathLike | Radiograph) -> tuple[str, str, Radiograph | None]:
        """``(digest, source path, radiograph if already read)``; raises ImageReadError for a bad path."""
        if isinstance(image, Radiograph):
            return self._pixels_digest(image), image.source, image
        p = Path(image)
        if not p.is_file():
            read_image(p)  # raises ImageReadError with the reason
        return file_digest(p), str(p), None

    def embedding(self, image: str | os.PathLike | Radiograph):
        """``(embedding (C, h, w) float32, Letterbox)`` for an image path or Radiograph.

        A seen image (same bytes, same encoder weights) never re-runs the encoder.

        Raises:
            ImageReadError: the file cannot be read as an image.
        """
        emb, box, _, _, _ = self._embedding(image)
        return emb, box

    def _embedding(self, image, need_input: bool = False):
        """``(embedding, Letterbox, cached, source, input)``; ``input`` is the letterboxed ``(3, S, S)``
        image when ``need_input`` (the query mask head refines edges on it) or when it was computed anyway."""
        from .model import Letterbox, letterbox

        digest, src, rg = self._source(image)
        emb = self.cache.get(digest)
        shape = self._shapes.get(digest)
        x = self._remembered_input(digest)
        if emb is not None and (shape is None or (need_input and x is None)):
            rg = rg or read_image(src)
            x, box = letterbox(rg.pixels, self.model.input_size)
            self._remember(digest, box.original_size, x)
            shape = box.original_size
        if emb is not None:
            return emb, Letterbox.for_size(*shape, self.model.input_size), True, src, x
        rg = rg or read_image(src)  # read outside the lock: another image may be encoding
        x, box = letterbox(rg.pixels, self.model.input_size)
        with self._encoder_lock:
            emb = self.cache.get(digest)  # encoded by another thread meanwhile?
            cached = emb is not None
            if not cached:
                with torch.no_grad():
                    emb = self._encoder()(x[None])[0].float()
                self.encoder_calls += 1
                self.cache.put(digest, emb)
        self._remember(digest, box.original_size, x)
        return emb, box, cached, src, x

    def _encoder(self):
        """The encoder callable (first call: export to / load from ONNX Runtime; see
        :mod:`anatomy_vlm.model.onnx_encoder`); call with the encoder lock held."""
        if self._encode is None:
            from .model.onnx_encoder import fast_encoder

            if self.model.encoder is None:
                raise ValueError("this model has no encoder and the image's embedding is not cached")
            root = self.cache.root.parent if self.cache.root else None
            self._encode = fast_encoder(self.model.encoder, root, self.cache.tag)
            self.encoder_backend = getattr(self._encode, "backend", "pytorch")
        return self._encode

    def _dense_head(self, emb: torch.Tensor):
        """The dense mask head as a callable ``(embeddings, images) -> logits``: ONNX Runtime (exported
        once per head weights into the cache folder, checked against PyTorch) or the module itself."""
        if self._fast_head is None:
            with self._encoder_lock:
                if self._fast_head is None:
                    from .cache import module_digest
                    from .model.onnx_encoder import fast_module

                    head = self.model.mask_head
                    g = torch.Generator().manual_seed(0)
                    S = self.model.input_size
                    ex = (torch.randn(1, *emb.shape, generator=g), torch.rand(1, 3, S, S, generator=g))
                    root = self.cache.root.parent if self.cache.root else None
                    self._fast_head = fast_module(head, ex, ("embedding", "image"), root,
                                                  f"{type(head).__name__}-{module_digest(head)}", tolerance=1e-2,
                                                  memory_arena=False)
                    self.mask_head_backend = getattr(self._fast_head, "backend", "pytorch")
        return self._fast_head

    def _remembered_input(self, digest: str) -> torch.Tensor | None:
        with self._inputs_lock:
            g = self._inputs.get(digest)
            if g is None:
                return None
            self._inputs.move_to_end(digest)
            return g.expand(3, -1, -1)

    def _remember(self, digest: str, shape: tuple[int, int], x: torch.Tensor) -> None:
        with self._inputs_lock:
            self._shapes[digest] = tuple(shape)
            self._inputs[digest] = x[:1].clone()  # grey: the 3 channels are copies
            self._inputs.move_to_end(digest)
            while len(self._inputs) > self.cache.memory_items:
                self._inputs.popitem(last=False)

    # -- prediction ------------------------------------------------------------------------------------
    @property
    def has_language(self) -> bool:
        """Whether the model carries a trained language stage (aligner with its text encoder recorded)."""
        al = (getattr(self.model, "config", None) or {}).get("aligner") or {}
        return getattr(self.model, "aligner", None) is not None and bool(al.get("text_tag"))

    def language(self):
        """The :class:`~anatomy_vlm.zeroshot.ZeroShotScorer` of this model (text encoder loaded once; text
        embeddings cached in ``<cache root>/text``).

        Raises:
            ValueError: the model has no trained language stage, or the text encoder found here is not
                the one the aligner was trained with.
        """
        if self._scorer is None:
            with self._scorer_lock:
                if self._scorer is None:
                    from .text import TextEncoder
                    from .zeroshot import ZeroShotScorer

                    if not self.has_language:
                        raise ValueError("this checkpoint has no language stage (train it with an `align` "
                                         "section, see anatomy_vlm.alignment)")
                    al = self.model.config["aligner"]
                    root = self.cache.root.parent / "text" if self.cache.root else None
                    text = TextEncoder(al.get("text_model"), cache_dir=root)
                    if text.tag != al["text_tag"]:
                        raise ValueError(f"the aligner was trained with text encoder {al['text_tag']}, but "
                                         f"{text.tag} was loaded from {text.path}")
                    self._scorer = ZeroShotScorer(self.model.aligner, text)
        return self._scorer

    def predict(self, image: str | os.PathLike | Radiograph, with_masks: bool = False,
                regions: str | Iterable[str | int] | None = None, align: bool = False) -> Prediction:
        """Boxes, scores (and masks) of ``regions`` (default all 29) in original-image pixels.

        ``align`` also computes the language stage's region and image embeddings (``Prediction.aligned``;
        a few milliseconds on top).

        Raises:
            ValueError: an unknown region name (message lists the valid ones); ``align`` without a
                language stage.
            ImageReadError: the image cannot be read.
        """
        idx = resolve_regions(regions)
        if align and not self.has_language:
            raise ValueError("this checkpoint has no language stage (train it with an `align` section)")
        t0 = time.perf_counter()
        # the dense mask head places the served boxes, so it runs for detection too
        dense = bool(getattr(self.model, "boxes_from_masks", False))
        run_masks = with_masks or dense or align
        need_image = run_masks or getattr(self.model, "boxes_need_image", False)
        emb, box, cached, src, x = self._embedding(image, need_input=need_image)
        t1 = time.perf_counter()
        S = float(self.model.input_size)
        with torch.no_grad():
            # All 29 masks in one call even for a subset: the query mask head computes its per-pixel
            # features once per image and pairs region embeddings with boxes by position.
            if dense:  # the head through ONNX Runtime when it works (see _dense_head)
                out = self.model(images=x[None], embeddings=emb[None], with_masks=False)
                out.masks = self._dense_head(emb)(emb[None], x[None])
            else:
                out = self.model(images=x[None] if need_image else None, embeddings=emb[None], with_masks=run_masks,
                                 refine_steps=self.refine_steps if run_masks else 0)
            boxes_in = out.boxes_xyxy[0].float() * S  # (Q, 4) input-frame pixel edges
            scores = out.scores[0].float().numpy()
            aligned = None
            if align:  # pooled inside the raw head masks, as in training (anatomy_vlm.alignment.precompute)
                aligned = self.model.align(emb[None], out, x[None] if x is not None else None)
            all_logits = out.masks[0] if run_masks else None
            if dense:
                all_logits = clean_logits(all_logits)
            logits = all_logits[idx] if with_masks else None
        t2 = time.perf_counter()
        dec = np.asarray(box.boxes_to_original(boxes_in[idx].numpy()), np.float32)
        final, source, masks = dec.copy(), ["decoder"] * len(idx), None
        if dense:
            mb, empty = boxes_from_logits(all_logits[idx], box.resized_size, box.original_size)
            q = mask_quality(all_logits[idx]).numpy()
            if self.box_calibration is not None:  # the reference boxes' convention, per region
                mb = apply_box_calibration(mb, self.box_calibration[list(idx)], tuple(box.original_size))
            for j in range(len(idx)):
                if not empty[j]:
                    final[j], source[j] = mb[j], "mask"
            # rank detections by presence x mask certainty; an empty mask keeps the decoder's box at half score
            scores = scores.copy()
            scores[list(idx)] = scores[list(idx)] * np.where(empty, 0.5, q)
        if logits is not None:
            H, W = box.original_size
            masks = np.zeros((len(idx), H, W), bool)
            for k in range(0, len(idx), self.mask_chunk):
                with torch.no_grad():
                    up = box.masks_to_original(logits[k:k + self.mask_chunk].float())
                masks[k:k + self.mask_chunk] = (up > 0).numpy()
            if not dense:  # (the dense head's boxes are already the masks', to a fraction of a pixel)
                mb = mask_boxes(torch.from_numpy(masks)).numpy()
                for k in range(len(idx)):
                    if mb[k, 2] > mb[k, 0]:  # non-empty mask
                        final[k], source[k] = mb[k], "mask"
        t3 = time.perf_counter()
        timing = {"embed": round(t1 - t0, 4), "cached": bool(cached), "decode": round(t2 - t1, 4),
                  "masks": round(t3 - t2, 4), "total": round(t3 - t0, 4)}
        check = self.input_check(emb, box, image if isinstance(image, Radiograph) else src)
        return Prediction(src, tuple(box.original_size), tuple(idx), final, scores[idx].astype(np.float32),
                          dec, masks, tuple(source), timing, aligned, check)

    def input_check(self, emb: torch.Tensor, box, image: str | os.PathLike | Radiograph) -> dict[str, Any]:
        """How far one image is from the training images (its embedding against the checkpoint's
        familiarity reference) plus notes on its DICOM attributes; see :mod:`anatomy_vlm.familiarity`."""
        if self.familiarity is None:
            why = (f"its familiarity reference is unusable ({self._familiarity_error})" if self._familiarity_error
                   else "this checkpoint has no familiarity reference")
            out: dict[str, Any] = {"level": "unknown", "message": f"{why} (fit one with `anatomy-vlm fit-familiarity`)"}
        else:
            out = self.familiarity.grade(pooled_features(emb, box.resized_size, box.input_size))
        meta = image.meta if isinstance(image, Radiograph) else header_meta(image) if image else {}
        out["notes"] = metadata_notes(meta)
        return out

    # -- background encoding ---------------------------------------------------------------------------
    def prefetch(self, paths: Iterable[str | os.PathLike]) -> int:
        """Queue images whose embeddings should be computed in the background (e.g. the next active-
        learning picks); returns how many were queued. Errors are logged, never raised."""
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._queue = queue.Queue()
                self._worker = threading.Thread(target=self._prefetch_loop, name="anatomy-vlm-prefetch",
                                                daemon=True)
                self._worker.start()
        n = 0
        for p in paths:
            self._queue.put(str(p))
            n += 1
        return n

    def join_prefetch(self, timeout: float | None = None) -> bool:
        """Wait until the prefetch queue is empty; True if it is."""
        q = self._queue
        if q is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while q.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _prefetch_loop(self) -> None:
        q = self._queue
        while True:
            path = q.get()
            try:
                self._embedding(path)
            except Exception as e:  # noqa: BLE001 - a bad file must not kill the worker
                logger.warning(f"prefetch of {path} failed: {e}")
            finally:
                q.task_done()


# ======================================================================================================
# Viewer exports: Slicer markups ROI JSON, multi-layer .seg.nrrd, flat label map
# ======================================================================================================
@dataclass(frozen=True)
class ImageGeometry:
    """Where an image's pixels sit in patient space, as ITK (and so 3D Slicer and MONAI's ITKReader) reads it.

    Index ``(i, j, k)`` = ``(column, row, 0)``; LPS point = ``origin + direction @ (spacing * index)``.

    Attributes:
        size: ``(W, H)`` in pixels.
        origin: LPS mm of the centre of pixel ``(0, 0)`` (3 values).
        spacing: mm per column, per row, and a slice thickness (3 values).
        direction: ``3 x 3`` LPS direction cosines, columns = image axes.
    """

    size: tuple[int, int]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    direction: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @property
    def matrix(self) -> np.ndarray:
        """``3 x 3`` index-to-LPS matrix ``direction @ diag(spacing)``."""
        return np.asarray(self.direction, float) @ np.diag(self.spacing)

    def to_lps(self, index: Sequence[float]) -> np.ndarray:
        """Continuous index ``(col, row, k)`` (pixel centres at integers) -> LPS mm."""
        return np.asarray(self.origin, float) + self.matrix @ np.asarray(index, float)


def image_geometry(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> ImageGeometry:
    """The geometry ITK reads from an image file's header (no pixel data is read).

    2D files (PNG, JPEG, 2D NIfTI) and single-frame DICOM get a third axis of 1 mm. If ITK cannot read the
    header, the geometry falls back to origin 0, identity direction, spacing 1 and ``shape`` ``(H, W)``.
    """
    try:
        import itk

        reader = itk.ImageFileReader.New(FileName=str(path))
        reader.UpdateOutputInformation()
        img = reader.GetOutput()
        dim = img.GetImageDimension()
        size = [int(s) for s in img.GetLargestPossibleRegion().GetSize()]
        sp = [float(s) for s in img.GetSpacing()]
        org = [float(s) for s in img.GetOrigin()]
        d = np.asarray(itk.array_from_matrix(img.GetDirection()), float)
        D = np.eye(3)
        D[:dim, :dim] = d[:3, :3]
        sp3 = (sp + [1.0, 1.0])[:3] if dim < 3 else sp[:3]
        org3 = (org + [0.0, 0.0])[:3] if dim < 3 else org[:3]
        return ImageGeometry((size[0], size[1]), tuple(org3), tuple(sp3), tuple(map(tuple, D)))
    except Exception as e:  # noqa: BLE001
        if shape is None:
            raise
        logger.warning(f"ITK cannot read the geometry of {path} ({e}); using origin 0, spacing 1")
        return ImageGeometry((int(shape[1]), int(shape[0])))


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                   "Resources/Schema/markups-schema-v1.0.3.json#")


def slicer_roi_markups(pred: Prediction, geometry: ImageGeometry) -> dict[str, Any]:
    """A 3D Slicer markups JSON document with one box ROI per predicted region.

    The layout follows MONAI Label's own detection output
    (``monailabel/utils/others/detection.py:create_slicer_detection_json``, which the stock Slicer panel loads
    with ``slicer.util.loadMarkups``): ``coordinateSystem`` LPS, ``center`` / ``size`` in mm, orientation
    ``diag(-1, -1, 1)`` for an image with identity direction. In addition each ROI carries the region
    name as node name and control-point label, its score in the description and the registry colour.
    A box's pixel edges ``[x0, y0, x1, y1]`` map to centre index ``((x0+x1)/2 - 0.5, (y0+y1)/2 - 0.5, 0)``
    and size ``(x1-x0) * col_mm, (y1-y0) * row_mm, slice mm``.
    """
    R = np.asarray(geometry.direction, float)
    orient = (_LPS_TO_RAS @ R).reshape(-1)
    orient = [float(v) + 0.0 for v in orient]
    markups = []
    for k, i in enumerate(pred.indices):
        r = REGIONS[i]
        x0, y0, x1, y1 = (float(v) for v in pred.boxes[k])
        center = geometry.to_lps(((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5, 0.0))
        size = [abs(x1 - x0) * geometry.spacing[0], abs(y1 - y0) * geometry.spacing[1], geometry.spacing[2]]
        center = [round(float(v), 4) for v in center]
        colour = [round(c / 255.0, 4) for c in r.colour]
        score = float(pred.scores[k])
        markups.append({
            "name": r.display,
            "type": "ROI",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": 1,
            "roiType": "Box",
            "center": center,
            "orientation": orient,
            "size": [round(float(v), 4) for v in size],
            "insideOut": False,
            "label": {"value": r.name, "id": r.id, "score": round(score, 4)},
            "controlPoints": [{
                "id": "1", "label": r.name, "description": f"{r.display} (id {r.id}, score {score:.3f})",
                "associatedNodeID": "", "position": center, "orientation": orient, "selected": True,
                "locked": False, "visibility": True, "positionStatus": "defined",
            }],
            "measurements": [{"name": "volume", "enabled": False, "units": "cm3", "printFormat": "%-#4.4g%s"}],
            "display": {"visibility": True, "color": colour, "selectedColor": colour, "activeColor": colour,
                        "propertiesLabelVisibility": True, "pointLabelsVisibility": False, "fillOpacity": 0.1},
        })
    return {"@schema": _MARKUPS_SCHEMA, "markups": markups}


def write_slicer_roi_markups(pred: Prediction, geometry: ImageGeometry, path: str | os.PathLike) -> Path:
    """Write :func:`slicer_roi_markups` to ``path`` (``.json``; Slicer's own name is ``.mrk.json``)."""
    p = Path(path)
    p.write_text(json.dumps(slicer_roi_markups(pred, geometry), indent=1), encoding="utf-8")
    return p


def _pack_layers(masks: np.ndarray) -> list[int]:
    """Greedy layer per mask so that masks sharing a layer never overlap (Slicer's overlapping segments)."""
    layers: list[np.ndarray] = []
    out = []
    for m in masks:
        for li, occ in enumerate(layers):
            if not np.any(occ & m):
                occ |= m
                out.append(li)
                break
        else:
            layers.append(m.copy())
            out.append(len(layers) - 1)
    return out


def write_seg_nrrd(pred: Prediction, geometry: ImageGeometry, path: str | os.PathLike) -> tuple[Path, list[dict]]:
    """Write the masks as a 3D Slicer segmentation (``.seg.nrrd``), overlapping regions as separate segments.

    Format (Slicer's ``vtkMRMLSegmentationStorageNode``; the fields slicerio reads): uint8 voxels
    ``(layers, W, H, 1)`` with kinds ``list domain domain domain``, ``space`` left-posterior-superior,
    ``space directions`` / ``space origin`` from ``geometry`` (so the labels sit on the image as Slicer and
    ITK load it: axis 1 = column, axis 2 = row), one segment per region with ``SegmentN_ID`` / ``Name`` /
    ``Color`` (registry, 0..1) / ``LabelValue`` / ``Layer`` / ``Extent``. Non-overlapping regions share a
    layer (greedy packing); an empty mask is still listed (empty extent).

    Returns:
        ``(path, segments)`` with ``segments`` = ``[{"name", "id", "layer", "label_value", "color"}, ...]``.
    """
    import nrrd

    if pred.masks is None:
        raise ValueError("the prediction has no masks (predict with with_masks=True)")
    masks = np.asarray(pred.masks, bool)
    K, H, W = masks.shape
    layer_of = _pack_layers(masks)
    n_layers = max(layer_of) + 1 if layer_of else 1
    label_of: list[int] = []
    data = np.zeros((n_layers, W, H, 1), np.uint8)
    counts = [0] * n_layers
    for k in range(K):
        counts[layer_of[k]] += 1
        label_of.append(counts[layer_of[k]])
        data[layer_of[k], :, :, 0][masks[k].T] = label_of[-1]
    M = geometry.matrix
    header: dict[str, Any] = {
        "type": "unsigned char", "dimension": 4, "space": "left-posterior-superior",
        "sizes": list(data.shape), "kinds": ["list", "domain", "domain", "domain"],
        "space directions": np.vstack([np.full(3, np.nan), M.T]),  # rows: (none), axis 0..2 vectors
        "space origin": np.asarray(geometry.origin, float), "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": "",
    }
    segments = []
    for k, i in enumerate(pred.indices):
        r = REGIONS[i]
        rows = np.flatnonzero(masks[k].any(axis=1))
        cols = np.flatnonzero(masks[k].any(axis=0))
        extent = (f"{cols[0]} {cols[-1]} {rows[0]} {rows[-1]} 0 0" if rows.size else "0 -1 0 -1 0 -1")
        colour = [c / 255.0 for c in r.colour]
        pre = f"Segment{k}_"
        header.update({
            pre + "ID": r.key, pre + "Name": r.name, pre + "NameAutoGenerated": "0",
            pre + "Color": " ".join(f"{c:.6f}" for c in colour), pre + "ColorAutoGenerated": "0",
            pre + "LabelValue": str(label_of[k]), pre + "Layer": str(layer_of[k]), pre + "Extent": extent,
            pre + "Tags": f"Segmentation.Status:inprogress|AnatomyVLM.RegionId:{r.id}|"
                          f"AnatomyVLM.Score:{float(pred.scores[k]):.4f}|",
        })
        segments.append({"name": r.name, "id": r.id, "layer": layer_of[k], "label_value": label_of[k],
                         "color": list(r.colour)})
    p = Path(path)
    nrrd.write(str(p), data, header, index_order="F")
    return p, segments


def flat_labelmap(pred: Prediction, values: Sequence[int] | None = None) -> np.ndarray:
    """One ``(H, W)`` uint8 label map: each pixel takes the value of the *smallest* region covering it, so
    nested zones stay visible inside their lung (the overlap itself is lost). ``values`` default the ids."""
    if pred.masks is None:
        raise ValueError("the prediction has no masks (predict with with_masks=True)")
    values = list(values) if values is not None else list(pred.ids)
    H, W = pred.image_shape
    out = np.zeros((H, W), np.uint8)
    order = np.argsort([-int(m.sum()) for m in pred.masks], kind="stable")  # largest first, smallest wins
    for k in order:
        out[pred.masks[k]] = values[k]
    return out


def write_flat_labelmap(pred: Prediction, geometry: ImageGeometry, path: str | os.PathLike,
                        values: Sequence[int] | None = None) -> Path:
    """Write :func:`flat_labelmap` with ITK using ``geometry`` (2D image: ITK index ``[col, row]``, the way
    MONAI Label's ITK writer stores 2D labels), e.g. as ``.nii.gz``."""
    return write_image_map(flat_labelmap(pred, values), geometry, path)


def write_image_map(arr: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike) -> Path:
    """Write an ``(H, W)`` array on the image grid (a label map, a heatmap) with ITK, placed with
    ``geometry`` (ITK index ``[col, row]``), e.g. as ``.nii.gz`` or ``.nrrd``."""
    import itk

    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"an image map is 2D (H, W), got shape {arr.shape}")
    img = itk.image_from_array(np.ascontiguousarray(arr))  # ITK's array view is [row, col] = index (col, row)
    img.SetSpacing([float(geometry.spacing[0]), float(geometry.spacing[1])])
    img.SetOrigin([float(geometry.origin[0]), float(geometry.origin[1])])
    D = np.asarray(geometry.direction, float)[:2, :2]
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(D)))
    itk.imwrite(img, str(path), compression=True)
    return Path(path)
