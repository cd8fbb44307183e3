"""The frozen text encoder (packaged all-MiniLM-L6-v2, or any local model folder) and its cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from anatomy_vlm.text import MAX_PROMPT_CHARS, TextEncoder, check_prompt, default_text_model_path


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    torch.set_num_threads(2)
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("text-cache"))


def test_synonyms_are_closer_than_unrelated_findings(enc):
    e = enc.encode(["pleural effusion", "fluid in the pleural space", "fracture of the left clavicle"])
    assert e.shape == (3, enc.dim) == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), atol=1e-4, rtol=0)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1


def test_each_text_is_encoded_once(enc, tmp_path):
    calls = enc.encoder_calls
    a = enc.encode(["a small right pneumothorax", "cardiomegaly"])
    assert enc.encoder_calls == calls + 1
    b = enc.encode(["cardiomegaly", "a small right pneumothorax", "cardiomegaly"])
    assert enc.encoder_calls == calls + 1  # all cached
    torch.testing.assert_close(b[1], a[0])
    torch.testing.assert_close(b[0], b[2])
    # the disk cache serves a new encoder on the same folder
    enc2 = TextEncoder(cache_dir=enc.cache_dir.parent)
    enc2.encode(["cardiomegaly"])
    assert enc2.encoder_calls == 0
    assert enc.encode([]).shape == (0, enc.dim)
    with pytest.raises(ValueError, match="list of texts"):
        enc.encode("cardiomegaly")


def test_a_plain_hugging_face_folder_loads_through_the_same_wrapper(tmp_path):
    src = default_text_model_path()
    dst = tmp_path / "plain-hf"
    dst.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy2(src / name, dst / name)  # no modules.json: not a sentence-transformers folder
    enc = TextEncoder(dst)
    assert enc.dim == json.loads((dst / "config.json").read_text())["hidden_size"]
    e = enc.encode(["pleural effusion", "fluid in the pleural space", "fracture of the left clavicle"])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        TextEncoder(tmp_path / "no-such-model")


@pytest.mark.parametrize("bad, msg", [("", "empty"), ("   ", "empty"), ("x" * (MAX_PROMPT_CHARS + 1), "at most"),
                                      (42, "must be text"), (None, "must be text"), ("!!! 123", "words")])
def test_bad_prompts_are_refused_with_a_message(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_prompt(bad)


def test_prompts_are_normalised():
    assert check_prompt("  small   right\neffusion ") == "small right effusion"
