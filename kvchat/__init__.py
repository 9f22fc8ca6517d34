"""kvchat: chat and batch generation with a compressed KV cache."""

import os

# Idle OpenMP threads sleep instead of spinning. With torch's default (spin), a decode step on a
# 2-core machine with one other busy process took ~1,000 ms instead of ~35 ms: the per-op barriers of
# a small model's many small ops starve. Must be set before torch loads; KVCHAT users can override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
