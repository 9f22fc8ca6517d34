"""Which implementation runs: the Triton kernel on CUDA; on the CPU kernels/cpu.py's native ops where
they are built (kernels without a native form take the torch reference then), else the reference."""

from __future__ import annotations

import functools
import os

import torch

from kvchat_kernels import cpu

IMPLS = ("ref", "triton", "native")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose_impl(device: torch.device, impl: str | None = None) -> str:
    """`impl`, then `KVCHAT_KERNELS`, wins; otherwise Triton on CUDA, native on a CPU that has it, else ref.

    TRITON_INTERPRET=1 does not switch CPU tensors to Triton by itself: tests pass `impl="triton"`.
    """
    mode = impl or os.environ.get("KVCHAT_KERNELS") or None
    if mode is not None:
        if mode not in IMPLS:
            raise ValueError(f"KVCHAT_KERNELS must be one of {', '.join(IMPLS)}, got {mode!r}")
        if mode == "triton" and not triton_available():
            raise RuntimeError("KVCHAT_KERNELS=triton but triton is not importable (pip install triton)")
        if mode == "native" and not cpu.available():
            raise RuntimeError(f"KVCHAT_KERNELS=native but the native CPU ops are unavailable: {cpu.status()}")
        return mode
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and cpu.enabled():
        return "native"
    return "ref"
