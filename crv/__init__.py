"""crv: verify chain-of-thought steps via their attribution graphs."""

import os as _os

# OpenMP threads that reach a barrier sleep instead of spinning. With the default (spin), a
# 2-thread step graph on a machine where another process keeps a core busy costs 4x its time
# (SmolLM2, cap 1024: 8.5 s -> 33 s, CPU time = wall time: one thread spins while the other
# waits for its core). It must be set before torch loads OpenMP, so import crv before torch
# or export it yourself; a value you set is kept. Measured in benchmarks/smollm2.py (spread).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
