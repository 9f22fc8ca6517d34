"""Weight memory on huge pages (kvchat/engine/arena.py): the native layout's weights, copied in the order a
decode step reads them into 2 MiB-aligned chunks advised for transparent huge pages."""

from __future__ import annotations

import os

import torch

from conftest import tiny_model
from kvchat.engine import arena
from kvchat.engine.weights import Weights
from kvchat_kernels import cpu


def thp_available() -> bool:
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    return os.path.exists(path) and "[never]" not in open(path).read()


def test_placed_tensors_are_equal_copies_aligned_in_order_in_2mib_aligned_chunks():
    ar = arena.Arena(chunk=4 << 20)
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(n, 37, generator=g).to(dt) for n, dt in
            [(3, torch.float32), (1000, torch.bfloat16), (40000, torch.float32), (5, torch.bfloat16)]]
    outs = [ar.place(t) for t in srcs]
    for t, o in zip(srcs, outs):
        assert torch.equal(o, t) and o.dtype == t.dtype and o.shape == t.shape and o.is_contiguous()
        assert o.data_ptr() % 64 == 0 and o.data_ptr() != t.data_ptr()
    # the first two share a chunk, in order; the third (5.9 MB) is larger than a chunk: its own, of 6 MiB
    assert outs[0].data_ptr() < outs[1].data_ptr() < outs[0].data_ptr() + (4 << 20)
    assert outs[2].data_ptr() % arena.HUGE == 0
    assert outs[3].data_ptr() == outs[2].data_ptr() + -(-outs[2].nbytes // 64) * 64  # right after it
    big = ar.place(torch.ones(3 << 20, dtype=torch.float32))  # 12 MiB: larger than a chunk, its own
    assert big.data_ptr() % arena.HUGE == 0 and bool((big == 1).all())
    assert ar.advised == ((4 << 20) + (6 << 20) + (12 << 20) if thp_available() else 0)


def test_a_skewed_arena_starts_every_tensor_the_skew_past_a_64_byte_boundary():
    ar = arena.Arena(chunk=2 << 20, skew=32)
    outs = [ar.place(torch.full((n,), float(n))) for n in (1, 7, 300_000, 1000)]  # the third needs a chunk
    assert [o.data_ptr() % 64 for o in outs] == [32] * 4
    assert all(bool((o == o.numel()).all()) for o in outs)


def test_native_weights_live_in_the_arena_in_read_order_shared_with_the_hf_modules():
    lm, twin = tiny_model("llama"), tiny_model("llama")
    ids = torch.tensor([[5, 9, 2, 77, 31]])
    w = Weights.of(lm, 1)
    assert w.layout == "native" and w.arena is not None
    ptrs = [p for lw in w.layers for p in (lw.qkv.w.data_ptr(), lw.o.w.data_ptr(), lw.gate_up.w.data_ptr(),
                                            lw.down.w.data_ptr())] + [w.lm_head.w.data_ptr()]
    assert ptrs == sorted(ptrs)  # one forward stream through memory
    assert {p % 64 for p in ptrs} == {0 if cpu.amx() else arena.WEIGHT_SKEW}
    chunk = w.arena.buf
    assert chunk.data_ptr() <= ptrs[-1] < chunk.data_ptr() + chunk.numel()
    layer = lm.hf.model.layers[1]
    assert layer.self_attn.q_proj.weight.data_ptr() == w.layers[1].qkv.w.data_ptr()  # a view, not a copy
    assert layer.mlp.down_proj.weight.data_ptr() == w.layers[1].down.w.data_ptr()
    assert torch.equal(lm.hf(ids).logits, twin.hf(ids).logits)


def test_kvchat_hugepages_0_leaves_the_weights_where_torch_put_them(monkeypatch):
    monkeypatch.setenv("KVCHAT_HUGEPAGES", "0")
    lm = tiny_model("llama")
    down = lm.hf.model.layers[0].mlp.down_proj.weight.data_ptr()
    w = Weights.of(lm, 1)
    assert w.arena is None and w.layers[0].down.w.data_ptr() == down
