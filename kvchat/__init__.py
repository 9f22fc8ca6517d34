"""kvchat: chat and batch generation with a compressed KV cache."""

import os

# OpenMP threads that finish a parallel region spin only briefly before sleeping. With torch's
# default (long spins) a decode step on this 2-core machine took ~1,000 ms instead of ~50 ms while one
# other process was busy; passive waiting fixed that but cost ~20% on an idle machine. A short spin
# (measured: 48 ms idle, 56 ms busy, vs 46 / 550 ms with long spins) keeps both. Must be set before
# torch loads its OpenMP runtime; a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"
