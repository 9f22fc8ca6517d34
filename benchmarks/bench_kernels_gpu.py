"""Achieved memory bandwidth of paged decode attention vs torch SDPA over a dense cache (CUDA only).

Decode attention reads every cached K and V byte once per step and does ~2 flops per byte, so it is
memory bound: the figure of merit is bytes moved / time. Bytes moved = K + V bytes read (tokens x H_kv x
head_dim x 2 x dtype size) + q and out (B x H_q x head_dim x dtype size each); block tables and lengths
are negligible and not counted. Both implementations move the same bytes, so their GB/s compare
directly; a device-to-device copy's GB/s is printed as the practical ceiling. L2 is flushed before
every timed call so small caches are not served from it.

    python benchmarks/bench_kernels_gpu.py                  # SmolLM2-135M heads (9 q / 3 kv x 64), bf16
    python benchmarks/bench_kernels_gpu.py --heads 32 --kv-heads 8 --head-dim 128

Without a CUDA device it prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=9, help="query heads")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", default="4096,8192,16384,32768,65536", help="context lengths")
    p.add_argument("--batch", default="1,4,8,16,32", help="batch sizes")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--mem-frac", type=float, default=0.8, help="skip configs needing more of the free memory")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="check this script on CPU under TRITON_INTERPRET=1 with tiny shapes; numbers are meaningless")
    return p.parse_args(argv)


class Timer:
    """Median seconds of fn(), flushing L2 (CUDA) before every call."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn, iters):
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copy_bandwidth(device, timer, nbytes=1 << 30):
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / t / 1e9  # read + write


def build(B, T, args, dtype, device):
    """A paged store (shuffled block ids) and the same cache dense, every head holding T tokens."""
    Hq, Hkv, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    n_per_head = -(-T // bs)
    n_blocks = B * Hkv * n_per_head
    k_dense = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    v_dense = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    ids = torch.randperm(n_blocks, device=device).view(B, Hkv, n_per_head)
    k_pool = torch.zeros(n_blocks, bs, D, dtype=dtype, device=device)
    v_pool = torch.zeros_like(k_pool)
    pad = n_per_head * bs - T
    k_pool[ids.flatten()] = F.pad(k_dense, (0, 0, 0, pad)).reshape(-1, bs, D)
    v_pool[ids.flatten()] = F.pad(v_dense, (0, 0, 0, pad)).reshape(-1, bs, D)
    table = ids.to(torch.int32)
    lengths = torch.full((B, Hkv), T, dtype=torch.int32, device=device)
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)
    return q, k_pool, v_pool, table, lengths, k_dense, v_dense


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kvchat_kernels imports triton
        device, dtype = torch.device("cpu"), torch.float32
        tokens, batches, args.iters = [40, 100], [1, 2], 2
    else:
        if not torch.cuda.is_available():
            print("bench_kernels_gpu: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU",
                  file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), DTYPES[args.dtype]
        tokens = [int(x) for x in args.tokens.split(",")]
        batches = [int(x) for x in args.batch.split(",")]

    from kvchat_kernels.paged_attention import paged_decode_attention

    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    esize = torch.empty((), dtype=dtype).element_size()
    scale = D**-0.5
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke run)"
    print(f"{name}: H_q={Hq} H_kv={Hkv} D={D} block={args.block_size} {dtype}; "
          f"copy {copy_bandwidth(device, timer, 1 << 24 if args.interpret_smoke else 1 << 30):.0f} GB/s")
    print(f"{'tokens':>7} {'batch':>5} {'MB moved':>9} | {'paged us':>9} {'GB/s':>7} | {'sdpa us':>9} {'GB/s':>7} "
          f"| {'paged/sdpa':>10} {'max err':>8}")
    for T in tokens:
        for B in batches:
            kv_bytes = 2 * B * Hkv * T * D * esize
            need = 2 * kv_bytes * 1.1  # paged pool + dense cache
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                if need > args.mem_frac * free:
                    print(f"{T:>7} {B:>5}  skipped: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
                    continue
            q, k_pool, v_pool, table, lengths, k_dense, v_dense = build(B, T, args, dtype, device)
            q4 = q.unsqueeze(2)  # (B, H_q, 1, D)

            def paged():
                return paged_decode_attention(q, k_pool, v_pool, table, lengths, scale, impl="triton")

            def sdpa():
                return F.scaled_dot_product_attention(q4, k_dense, v_dense, scale=scale, enable_gqa=True)

            err = (paged().float() - sdpa().squeeze(2).float()).abs().max().item()
            moved = kv_bytes + 2 * B * Hq * D * esize
            tp, ts = timer(paged, args.iters), timer(sdpa, args.iters)
            print(f"{T:>7} {B:>5} {moved / 1e6:>9.1f} | {tp * 1e6:>9.1f} {moved / tp / 1e9:>7.0f} | "
                  f"{ts * 1e6:>9.1f} {moved / ts / 1e9:>7.0f} | {ts / tp:>9.2f}x {err:>8.1e}")
            del q, k_pool, v_pool, table, lengths, k_dense, v_dense
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
