"""Shared fixtures: tiny random models of each supported architecture, and the embedded SmolLM2.

The embedded model is converted once per test run into a session directory; every test gets its own
KVCHAT_HOME (history, calibrations) whose `models/` points at that shared conversion.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


import kvchat  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, takes the checkout off sys.path)
import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this once, at import: set before anything imports it so the kernel tests can run
    # in this process on CPU tensors. It changes nothing else (the engine picks the torch refs on CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Fixed threads: results compared across runs must not depend on what else the machine is doing.
os.environ["KVCHAT_ADAPTIVE_THREADS"] = "0"


class ToyTokenizer:
    """Enough of a tokenizer for the engine on tiny random models: ids <-> space-separated numbers."""

    eos_token_id = None
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        """Byte-level ids (the tiny models' vocab is 320): enough for calibrations that read text."""
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)

    def get_vocab(self):
        return {}


def tiny_config(arch: str, layers: int = 3):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-6,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, layers: int = 3, rope: dict | None = None):
    """A tiny random model of `arch`; `rope`: the config's rope_parameters instead of the default RoPE."""
    from transformers import AutoModelForCausalLM

    from kvchat.model import LoadedModel, describe

    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers)
    if rope is not None:
        cfg.rope_parameters = rope
    cfg._attn_implementation = "sdpa"
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is too flat to tell tokens apart: sharpen it
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return LoadedModel(hf=hf, tokenizer=ToyTokenizer(), desc=describe(hf, f"tiny-{arch}"), eos_ids=frozenset())


def tiny_llama(dtype: torch.dtype = torch.float32):
    """A 6-layer Llama of random weights (hidden 128, 4 query and 2 KV heads of 64, vocab 256) in `dtype`:
    the native evictions' end-to-end tests, which need head size 64 and enough layers to compress."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvchat.model import LoadedModel, describe

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    hf = LlamaForCausalLM(cfg).eval().to(dtype)
    return LoadedModel(hf=hf, tokenizer=ToyTokenizer(), desc=describe(hf, "tiny-llama"), eos_ids=frozenset())


ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """The embedded model converted once for the whole run."""
    home = tmp_path_factory.mktemp("kvchat-home-shared")
    old = os.environ.get("KVCHAT_HOME")
    os.environ["KVCHAT_HOME"] = str(home)
    try:
        from kvchat.model import embedded_dir

        embedded_dir()
    finally:
        if old is None:
            os.environ.pop("KVCHAT_HOME", None)
        else:
            os.environ["KVCHAT_HOME"] = old
    return home / "models"


@pytest.fixture(scope="session")
def calibrations_dir(tmp_path_factory):
    """Calibrations of the embedded model, computed once for the whole run (each takes seconds)."""
    return tmp_path_factory.mktemp("kvchat-calibrations-shared")


@pytest.fixture(autouse=True)
def kvchat_home(tmp_path, monkeypatch, request):
    """A fresh KVCHAT_HOME per test; `models/` and `calibrations/` link to the run's shared ones when a
    test uses the embedded model (a test of calibration itself points KVCHAT_HOME elsewhere)."""
    home = tmp_path / "kvchat-home"
    home.mkdir()
    monkeypatch.setenv("KVCHAT_HOME", str(home))
    for var in ("KVCHAT_MODEL", "KVCHAT_PROFILE", "KVCHAT_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    if "models_dir" in request.fixturenames or "embedded" in request.fixturenames:
        (home / "models").symlink_to(request.getfixturevalue("models_dir"))
        (home / "calibrations").symlink_to(request.getfixturevalue("calibrations_dir"))
    return home


@pytest.fixture(scope="session")
def embedded(models_dir):
    """The embedded SmolLM2-135M-Instruct, loaded once (fp32, CPU)."""
    os.environ["KVCHAT_HOME"] = str(models_dir.parent)
    from kvchat.loading import quiet_transformers
    from kvchat.model import load_model

    quiet_transformers()
    return load_model(device="cpu", dtype="float32")


def chat_ids(lm, text: str, system: str | None = None) -> list[int]:
    from kvchat.templating import prompt_ids

    return prompt_ids(lm.tokenizer, [{"role": "user", "content": text}], system)


def bench_module(name: str = "bench_methods"):
    """A benchmark script under benchmarks/ as a module: model tests reuse its prompts and runners."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
