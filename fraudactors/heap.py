"""Garbage-collector settings for the long-running processes (engine, load generator).

CPython's cyclic collector stops the process while it scans; a full (generation 2) pass walks
every tracked object, and a process that has imported onnxruntime, numpy, aiokafka and redis and
built its actors holds hundreds of thousands of them, none of which will ever be garbage. Measured
in a 5,000 TPS demo: the engine paused up to 30 ms per full pass (32 passes in 95 s) and the load
generator, holding the simulated world, 60-70 ms -- pauses that land directly in P99.

:func:`settle` is called once start-up is over (the engine; each process-pool worker after its
initializer; the load generator before its clock starts): one last collection, then
``gc.freeze()`` moves every surviving object to the permanent generation (never scanned again), so
later passes only walk what the running service allocated since; and young collections run every
``GEN0_THRESHOLD`` allocations instead of 700, so a micro-batch's short-lived containers are
mostly freed by reference counting before a pass ever sees them. Cycles are still collected.

The count is of containers allocated and not yet freed, so a pass comes only when that many are
alive or in uncollected cycles at once: cyclic garbage is bounded by it. At 10,000 a drain's batches
in flight crossed it all the time (`bench drain --records 60000 --history-days 30`, 477,890
records): 468 passes, 3.4 s of collection, passes of the middle generation up to 23 ms, and 6.6 %
of the engine's CPU samples in another run; at 100,000, one young pass in the whole drain and
0.4 % of the samples (docs/benchmarks.md, "The compiled feature kernel").
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 100_000


def settle() -> None:
    """Freeze what start-up built and collect young objects less often (see the module doc)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
