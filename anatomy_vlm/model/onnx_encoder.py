"""The frozen image encoder run by an inference runtime (OpenVINO, else ONNX Runtime): the same weights
and outputs, 2-3x faster here.

Eager PyTorch spends most of LiteMedSAM's encoder time between its many small operators (TinyViT:
MBConv blocks, windowed attention, layer norms); the runtimes fuse them. Measured on this 2-core CPU
(bench/rest_speed.py and bench/predict_speed.py report the current figures): 0.9-1.7 s per 256x256
image eager, 0.53-0.6 s with ONNX Runtime, 0.37-0.38 s with OpenVINO (an AVX-512 machine, both runtimes
back to back), outputs equal to PyTorch's to 1e-5.

How: the first time an encoder (identified by its weight digest, the same tag as the embedding
cache's) is needed, it is exported with ``torch.onnx.export`` to ``<cache>/onnx/<tag>.onnx`` (written
atomically, a few seconds, once per machine), compiled by OpenVINO (:class:`OpenVinoModule`; fp32, as the
model was trained) or loaded into an ``onnxruntime.InferenceSession`` (:class:`OnnxModule`), and checked
against PyTorch on one input. Anything that goes wrong (a runtime not installed, an export error,
outputs that disagree) logs a warning and moves on to the next runtime, then to the PyTorch encoder:
this is an accelerator, never a point of failure. ``ANATOMY_VLM_ENCODER_BACKEND`` chooses: ``auto``
(default: OpenVINO, then ONNX Runtime), ``openvino``, ``onnxruntime``, or ``torch`` (off).

Only frozen encoders are exported: a trainable one changes at every step.

The same machinery serves any frozen module with fixed-size tensor inputs (:func:`fast_module`): the
Predictor runs the dense mask head through it too (33-37 ms instead of 75 ms eager here, logits equal to
4e-5), exported once per checkpoint version (the tag is the head's weight digest).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "OnnxEncoder", "OnnxModule", "OpenVinoModule", "fast_encoder", "fast_module",
           "release_freed_heap"]

BACKENDS = ("openvino", "onnxruntime")
"""The runtimes :func:`fast_module` tries, in this order (``ANATOMY_VLM_ENCODER_BACKEND=auto``)."""

_TOLERANCE = 1e-3  # max abs difference to PyTorch accepted (embeddings are O(1); measured ~3e-6)


def release_freed_heap() -> bool:
    """Hand the C heap's freed memory back to the operating system (glibc's ``malloc_trim``).

    A long-lived server keeps the pages of large one-off allocations (an eager check run, a model load)
    resident after Python and PyTorch free them; trimming makes them go. Returns whether anything could be
    done: False (and no error) where the C library has no ``malloc_trim`` (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


class OnnxModule:
    """Callable ``(*tensors) -> tensor`` for a frozen module with fixed-size inputs, through ONNX Runtime.

    Args:
        module: The frozen PyTorch module (kept for the export only).
        path: Where the ``.onnx`` file is (exported there, atomically, if missing).
        example_inputs: One batch-1 example per input (their shapes are the exported shapes).
        input_names: Names of the inputs, in order.
        memory_arena: Keep ONNX Runtime's CPU memory arena (faster repeated runs, more resident memory).
        memory_pattern: ONNX Runtime's memory pattern (one block planned for a run's whole peak); default:
            on without the arena, off with it (see the comment in the body).
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    backend = "onnxruntime"

    def __init__(self, module: torch.nn.Module, path: str | os.PathLike, example_inputs: tuple[torch.Tensor, ...],
                 input_names: tuple[str, ...], threads: int | None = None, memory_arena: bool = True,
                 memory_pattern: bool | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.input_names = tuple(input_names)
        if not self.path.is_file():
            self._export(module, self.path, tuple(example_inputs), self.input_names)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: PyTorch's threads work right after this session on the same cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The CPU memory arena keeps the peak activations allocated between runs: worth its memory for the
        # encoder (about 360 MB here with the memory pattern off, and about 10 % faster), not for small modules.
        so.enable_cpu_mem_arena = bool(memory_arena)
        # The memory pattern plans one block for a run's whole peak. With the arena that block comes on top of
        # what the arena keeps: the encoder held 643 MB after 10 runs with it and 361 MB without, for 2 % more
        # time per run (sessions alternating in one process on this 2-core CPU). Without the arena it pays:
        # the dense mask head runs in 41 ms with it against 49 ms without, for ~25 MB.
        so.enable_mem_pattern = (not memory_arena) if memory_pattern is None else bool(memory_pattern)
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    @staticmethod
    def _export(module: torch.nn.Module, path: Path, example_inputs: tuple[torch.Tensor, ...],
                input_names: tuple[str, ...]) -> None:
        import warnings

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, example_inputs, str(tmp), input_names=list(input_names),
                                  output_names=["output"], opset_version=17, dynamo=False)
            os.replace(tmp, path)
        finally:
            module.train(was_training)
            if tmp.exists():
                tmp.unlink()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = [x.detach().float().cpu().numpy() for x in inputs]
        outs = []
        with self._lock:  # one run at a time: the session already uses every thread it was given
            for i in range(arrays[0].shape[0]):  # exported with batch 1
                feed = {n: np.ascontiguousarray(a[i:i + 1]) for n, a in zip(self.input_names, arrays)}
                outs.append(self.session.run(None, feed)[0])
        return torch.from_numpy(np.concatenate(outs, 0))


class OnnxEncoder(OnnxModule):
    """Callable ``(B, 3, S, S)`` float tensor -> ``(B, C, h, w)`` float tensor, through ONNX Runtime.

    Args:
        encoder: The frozen PyTorch encoder (exposes ``input_size``); kept for the export only.
        path: Where the ``.onnx`` file is (exported there if missing).
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, encoder: torch.nn.Module, path: str | os.PathLike, threads: int | None = None):
        self.input_size = int(getattr(encoder, "input_size", 256))
        size = self.input_size
        super().__init__(encoder, path, (torch.rand(1, 3, size, size),), ("image",), threads)


class OpenVinoModule:
    """Callable ``(*tensors) -> tensor`` for a frozen module with fixed-size inputs, compiled by OpenVINO
    from the same ONNX export as :class:`OnnxModule` (exported there if missing).

    Compiled for the CPU with the latency hint, ``threads`` inference threads and fp32 inference precision
    (OpenVINO would otherwise pick bf16 on CPUs that have it; the heads were trained on fp32 embeddings).
    One inference request, one run at a time (it already uses every thread it was given). Resident memory
    for the encoder: about 315 MB after 10 runs here, against ONNX Runtime's 361 MB.

    Args: as :class:`OnnxModule` (no memory options: OpenVINO manages its own).
    """

    backend = "openvino"

    def __init__(self, module: torch.nn.Module, path: str | os.PathLike, example_inputs: tuple[torch.Tensor, ...],
                 input_names: tuple[str, ...], threads: int | None = None):
        import openvino as ov

        self.path = Path(path)
        self.input_names = tuple(input_names)
        if not self.path.is_file():
            OnnxModule._export(module, self.path, tuple(example_inputs), self.input_names)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = [x.detach().float().cpu().numpy() for x in inputs]
        outs = []
        with self._lock:
            for i in range(arrays[0].shape[0]):  # exported with batch 1
                feed = {n: np.ascontiguousarray(a[i:i + 1]) for n, a in zip(self.input_names, arrays)}
                res = self._request.infer(feed)
                outs.append(np.array(res[self.compiled.output(0)], copy=True))  # the request reuses its buffer
        return torch.from_numpy(np.concatenate(outs, 0))


def _backends() -> list[str]:
    want = os.environ.get("ANATOMY_VLM_ENCODER_BACKEND", "auto").lower()
    if want in ("torch", "pytorch"):
        return []
    if want in BACKENDS:
        return [want]
    if want != "auto":
        logger.warning(f"ANATOMY_VLM_ENCODER_BACKEND={want!r} is not one of auto, {', '.join(BACKENDS)}, torch: "
                       "using auto")
    return list(BACKENDS)


def fast_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
                cache_root: str | os.PathLike | None, tag: str, tolerance: float = _TOLERANCE,
                memory_arena: bool = True, encoder_size: int | None = None):
    """The frozen ``module`` through the first runtime of :data:`BACKENDS` that is installed, loads the
    export and agrees with PyTorch on ``example_inputs`` (max abs difference <= ``tolerance``), otherwise
    ``module`` itself; never raises. ``ANATOMY_VLM_ENCODER_BACKEND`` picks the runtime or ``torch`` (module
    docstring). The export is ``<cache_root>/onnx/<tag>.onnx`` (``None``: the default cache,
    ``$ANATOMY_VLM_CACHE`` or ``~/.cache/anatomy_vlm``), shared by the runtimes; an export no runtime can
    use is removed (the next start exports again). ``memory_arena`` goes to :class:`OnnxModule`;
    ``encoder_size`` makes the ONNX Runtime callable an :class:`OnnxEncoder`. The callable's ``backend``
    says which runtime it is."""
    import importlib.util

    name = type(module).__name__
    order = _backends()
    if not order or any(p.requires_grad for p in module.parameters()):
        return module
    if cache_root:
        root = Path(cache_root)
    else:
        from ..embed import default_cache_dir

        root = default_cache_dir().parent
    path = root / "onnx" / f"{tag}.onnx"
    ref = None
    tried = []
    for backend in order:
        if importlib.util.find_spec(backend) is None:
            tried.append(f"{backend}: not installed")
            continue
        try:
            if backend == "openvino":
                fast = OpenVinoModule(module, path, example_inputs, input_names)
            elif encoder_size:
                fast = OnnxEncoder(module, path)
            else:
                fast = OnnxModule(module, path, example_inputs, input_names, memory_arena=memory_arena)
            if ref is None:
                with torch.no_grad():
                    was_training = module.training
                    module.eval()
                    ref = module(*example_inputs)
                    module.train(was_training)
                release_freed_heap()  # the eager check run's activations (~170 MB for the encoder) go back
            diff = float((fast(*example_inputs) - ref).abs().max())
            if not diff <= tolerance:
                raise RuntimeError(f"output differs from PyTorch by {diff:.2e}")
        except Exception as e:  # noqa: BLE001 - an accelerator must never stop the module from working
            tried.append(f"{backend}: {e}")
            continue
        logger.info(f"{name} runs in {backend} ({path})")
        return fast
    logger.warning(f"{name} runs in PyTorch ({'; '.join(tried)})")
    if any(not t.endswith("not installed") for t in tried):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    return module


def fast_encoder(encoder: torch.nn.Module | None, cache_root: str | os.PathLike | None, tag: str):
    """The fastest available callable for a frozen ``encoder``: an :class:`OpenVinoModule` or an
    :class:`OnnxEncoder` when that runtime works and agrees with PyTorch, otherwise ``encoder`` itself (see
    the module docstring).

    Args:
        encoder: The PyTorch encoder (``None`` is returned as is).
        cache_root: Folder for the exported model (``<cache_root>/onnx``); ``None``: the default cache
            (``$ANATOMY_VLM_CACHE`` or ``~/.cache/anatomy_vlm``).
        tag: The encoder's identity (``embed.encoder_tag``), the file name of the export.
    """
    if encoder is None:
        return encoder
    size = int(getattr(encoder, "input_size", 256))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return fast_module(encoder, (x,), ("image",), cache_root, tag, encoder_size=size)
