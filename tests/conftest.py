"""Shared test set-up: deterministic, quiet, and kind to a 2-core machine."""

from __future__ import annotations

import os

# Tests run while other processes may use the second core: one torch thread avoids the collapse measured in
# FACTS.md, and keeps results deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".torchinductor")
)
os.environ.setdefault("MPLBACKEND", "Agg")
