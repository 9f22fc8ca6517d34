"""kvchat: chat and batch generation with a compressed KV cache."""

import os
import sys

# A source checkout's kernels/ is installed as `kvchat_kernels`. With the checkout's root on sys.path
# (`python -m ...` run there, Ray workers started from there) it would shadow Hugging Face's `kernels`
# package, which transformers 5 imports while loading a model ("cannot import name 'CUDAProperties'
# from 'kernels'"): that root comes off the path. Only a directory holding our kernels/cpu_ops.c.
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "kernels", "cpu_ops.c"))]

# OpenMP threads that finish a parallel region spin a little (~10 us) before sleeping: long enough to
# bridge the Python between a decode step's ops (with 1,000 spins the second thread slept between
# them and two threads decoded no faster than one: 44 vs 44 tok/s at batch 4, 2k tokens, against 71
# with 10,000), short enough not to hold a core for long. While other processes keep cores busy the
# engine uses fewer threads (kvchat/engine/threads.py): a team waiting on a descheduled thread is what
# made long spins ~20x slower on a busy machine. Must be set before torch loads its OpenMP runtime;
# a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
