"""kvchat_kernels stays below kvchat, and the implementation choice obeys its overrides."""

import ast
from pathlib import Path

import pytest
import torch

from kvchat_kernels.dispatch import choose_impl, triton_available

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_kernels_import_nothing_from_kvchat():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert files, f"no kernel sources under {KERNELS_DIR}"
    bad = [(f.name, m) for f in files for m in _imported_modules(f) if m == "kvchat" or m.startswith("kvchat.")]
    assert not bad, f"kernels/ must not import kvchat: {bad}"


def test_choose_impl_defaults(monkeypatch):
    from kvchat_kernels import cpu

    monkeypatch.delenv("KVCHAT_KERNELS", raising=False)
    assert cpu.available(), f"the native CPU ops must build on this machine: {cpu.status()}"
    assert choose_impl(torch.device("cpu")) == "native"
    monkeypatch.setenv("KVCHAT_NATIVE", "0")
    assert choose_impl(torch.device("cpu")) == "ref"
    assert choose_impl(torch.device("cuda")) == ("triton" if triton_available() else "ref")


def test_choose_impl_honours_env(monkeypatch):
    monkeypatch.setenv("KVCHAT_KERNELS", "ref")
    assert choose_impl(torch.device("cuda")) == "ref"
    assert choose_impl(torch.device("cpu"), impl="ref") == "ref"
    if triton_available():
        monkeypatch.setenv("KVCHAT_KERNELS", "triton")
        assert choose_impl(torch.device("cpu")) == "triton"
        assert choose_impl(torch.device("cpu"), impl="ref") == "ref"  # an explicit impl= wins over the env
    monkeypatch.setenv("KVCHAT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="KVCHAT_KERNELS"):
        choose_impl(torch.device("cpu"))


def test_dispatcher_uses_ref_when_told(monkeypatch):
    # With KVCHAT_KERNELS=ref a CPU call must never reach Triton (it would need the interpreter).
    from kvchat_kernels import paged_decode_attention, paged_decode_attention_ref

    monkeypatch.setenv("KVCHAT_KERNELS", "ref")
    k = torch.randn(4, 8, 16)
    table = torch.tensor([[[2, 0]]], dtype=torch.int32)
    lengths = torch.tensor([[5]], dtype=torch.int32)
    q = torch.randn(1, 2, 16)
    got = paged_decode_attention(q, k, k, table, lengths, 0.25)
    assert torch.equal(got, paged_decode_attention_ref(q, k, k, table, lengths, 0.25))


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels_gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA: the benchmark would run for real")
def test_gpu_benchmark_refuses_without_cuda_and_its_code_runs():
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(BENCH)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the same code path on tiny shapes under the interpreter
    r = subprocess.run([sys.executable, str(BENCH), "--interpret-smoke"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "paged/sdpa" in r.stdout
