"""The encoder through OpenVINO or ONNX Runtime: same outputs as PyTorch, and a safe fallback to PyTorch."""

from __future__ import annotations

import pytest
import torch

from anatomy_vlm.model import LiteMedSAMEncoder
from anatomy_vlm.model.onnx_encoder import OnnxEncoder, OpenVinoModule, fast_encoder

pytest.importorskip("onnxruntime", reason="onnxruntime is part of the lock; this guards a partial install")
pytest.importorskip("openvino", reason="openvino is part of the lock; this guards a partial install")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return LiteMedSAMEncoder(pretrained=False).eval()


@pytest.mark.parametrize("backend, cls", [("auto", OpenVinoModule), ("openvino", OpenVinoModule),
                                          ("onnxruntime", OnnxEncoder)])
def test_encoder_runtime_matches_pytorch_and_is_reused(encoder, tmp_path, monkeypatch, backend, cls):
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", backend)
    fast = fast_encoder(encoder, tmp_path, "enc-test")
    assert isinstance(fast, cls) and fast.backend == ("openvino" if backend == "auto" else backend)
    path = tmp_path / "onnx" / "enc-test.onnx"
    assert path.is_file()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref = encoder(x)
    out = fast(x)
    assert out.shape == ref.shape == (2, 256, 64, 64)
    assert float((out - ref).abs().max()) < 1e-3
    assert not torch.equal(out[0], out[1])  # each batch item its own result (the request reuses its buffer)
    stamp = path.stat().st_mtime_ns
    assert isinstance(fast_encoder(encoder, tmp_path, "enc-test"), cls)
    assert path.stat().st_mtime_ns == stamp  # loaded, not exported again


def test_a_failing_runtime_hands_over_to_the_next(encoder, tmp_path, monkeypatch):
    from anatomy_vlm.model import onnx_encoder as oe

    def broken(*a, **k):
        raise RuntimeError("no CPU plugin")

    monkeypatch.setattr(oe, "OpenVinoModule", broken)
    fast = fast_encoder(encoder, tmp_path, "enc-next")
    assert isinstance(fast, OnnxEncoder) and fast.backend == "onnxruntime"
    assert (tmp_path / "onnx" / "enc-next.onnx").is_file()  # ONNX Runtime uses the export: kept
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "openvino")  # only the broken one: PyTorch answers
    assert fast_encoder(encoder, tmp_path, "enc-next") is encoder
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "tensorrt")  # unknown: treated as auto, with a warning
    assert isinstance(fast_encoder(encoder, tmp_path, "enc-next"), OnnxEncoder)


def test_fallbacks_to_pytorch(encoder, tmp_path, monkeypatch):
    # a damaged export: PyTorch answers, the bad file is removed (the next start exports again)
    bad = tmp_path / "onnx" / "broken.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an onnx model")
    assert fast_encoder(encoder, tmp_path, "broken") is encoder
    assert not bad.exists()
    # switched off by the environment
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "torch")
    assert fast_encoder(encoder, tmp_path, "off") is encoder
    monkeypatch.delenv("ANATOMY_VLM_ENCODER_BACKEND")
    # a trainable encoder changes every step: never exported
    trainable = LiteMedSAMEncoder(pretrained=False, trainable_blocks=1)
    assert fast_encoder(trainable, tmp_path, "trainable") is trainable
    assert not (tmp_path / "onnx" / "trainable.onnx").exists()


def test_dense_mask_head_through_onnx_matches_pytorch_and_falls_back(tmp_path, monkeypatch):
    from anatomy_vlm.model.dense_mask_head import DenseMaskHead
    from anatomy_vlm.model.onnx_encoder import OnnxModule, fast_module

    torch.manual_seed(0)
    head = DenseMaskHead(widths=(16, 16, 16), fine=(8, 8)).eval()
    head.requires_grad_(False)
    ex = (torch.randn(1, 256, 64, 64), torch.rand(1, 3, 256, 256))
    fast = fast_module(head, ex, ("embedding", "image"), tmp_path, "head-test")
    assert isinstance(fast, OpenVinoModule)
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "onnxruntime")
    assert isinstance(fast_module(head, ex, ("embedding", "image"), tmp_path, "head-test"), OnnxModule)
    monkeypatch.delenv("ANATOMY_VLM_ENCODER_BACKEND")
    e, x = torch.randn(2, 256, 64, 64), torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref = head(e, x)
    out = fast(e, x)
    assert out.shape == ref.shape == (2, 29, 256, 256)
    assert float((out - ref).abs().max()) < 1e-3
    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "torch")
    assert fast_module(head, ex, ("embedding", "image"), tmp_path, "head-off") is head
    monkeypatch.delenv("ANATOMY_VLM_ENCODER_BACKEND")
    head.requires_grad_(True)  # trainable: never exported
    assert fast_module(head, ex, ("embedding", "image"), tmp_path, "head-train") is head


def test_memory_settings_and_heap_release(encoder, tmp_path, monkeypatch):
    """The encoder keeps ONNX Runtime's arena without the memory pattern (the pattern's block came on top
    of the arena: 643 vs 361 MB resident); an arena-less module keeps the pattern (faster); the eager
    agreement check's memory is handed back to the OS once the check is done."""
    from anatomy_vlm.model import onnx_encoder as oe
    from anatomy_vlm.model.dense_mask_head import DenseMaskHead

    monkeypatch.setenv("ANATOMY_VLM_ENCODER_BACKEND", "onnxruntime")
    calls = []
    real = oe.release_freed_heap
    monkeypatch.setattr(oe, "release_freed_heap", lambda: calls.append(1) or real())
    fast = oe.fast_encoder(encoder, tmp_path, "enc-mem")
    assert isinstance(fast, oe.OnnxEncoder) and calls == [1]
    so = fast.session.get_session_options()
    assert so.enable_cpu_mem_arena and not so.enable_mem_pattern
    head = DenseMaskHead(widths=(16, 16, 16), fine=(8, 8)).eval().requires_grad_(False)
    ex = (torch.randn(1, 256, 64, 64), torch.rand(1, 3, 256, 256))
    small = oe.fast_module(head, ex, ("embedding", "image"), tmp_path, "head-mem", memory_arena=False)
    assert isinstance(small, oe.OnnxModule) and calls == [1, 1]
    so = small.session.get_session_options()
    assert not so.enable_cpu_mem_arena and so.enable_mem_pattern
    explicit = oe.OnnxModule(head, tmp_path / "onnx" / "head-mem.onnx", ex, ("embedding", "image"),
                             memory_arena=True, memory_pattern=True)
    assert explicit.session.get_session_options().enable_mem_pattern


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_release_freed_heap_on_glibc():
    from anatomy_vlm.model.onnx_encoder import release_freed_heap

    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # ~128 MB of heap chunks below the mmap threshold
    del blocks
    assert release_freed_heap() is True
