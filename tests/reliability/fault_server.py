"""`cmserve serve` with faults injected into the engine, as a real process for the reliability
tests:  python -m tests.reliability.fault_server <serve flags...>

A batch holding seed 666 raises; one holding seed 777 returns NaNs. FAULT_SLOW_MS (env) adds
that many milliseconds to every batch (with --batching step, to every evaluation), so tests can
keep requests queued and in flight.
"""

from __future__ import annotations

import os
import sys
import time

from server import engine as engine_mod
from server.cli import main

_orig_run, _orig_noise = engine_mod.Engine.run_batch, engine_mod.Engine.make_noise
_slow_s = float(os.environ.get("FAULT_SLOW_MS", "0")) / 1000.0


def faulty_run_batch(self, steps, labels, seeds, model=None, edits=None):  # type: ignore[no-untyped-def]
    if _slow_s:
        time.sleep(_slow_s)
    if 666 in seeds:
        raise RuntimeError("injected fault: internal detail that must not leak")
    return _orig_run(self, steps, labels, seeds, model, edits)


def faulty_noise(self, steps, seeds, model=None, edits=None):  # type: ignore[no-untyped-def]
    z = _orig_noise(self, steps, seeds, model, edits)
    if 777 in seeds:
        z[:, seeds.index(777)].fill_(float("nan"))  # a NaN image: the non-finite check must catch it
    return z


_orig_step = engine_mod.Engine.step


def faulty_step(self, model, joining, drop):  # type: ignore[no-untyped-def]
    """The same faults under --batching step: rows know their request (key = (job, image))."""
    if _slow_s:
        time.sleep(_slow_s)
    if any(job.seeds[i] == 666 for job, i in (r.key for r in joining)):
        raise RuntimeError("injected fault: internal detail that must not leak")
    finished, n = _orig_step(self, model, joining, drop)
    for f in finished:
        job, i = f.key
        if job.seeds[i] == 777:
            f.finite = False  # as if the output held a NaN: the batcher must catch it
    return finished, n


engine_mod.Engine.run_batch = faulty_run_batch  # type: ignore[method-assign]
engine_mod.Engine.step = faulty_step  # type: ignore[method-assign]
engine_mod.Engine.make_noise = faulty_noise  # type: ignore[method-assign]

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
