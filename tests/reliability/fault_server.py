"""`cmserve serve` with faults injected into the engine, as a real process for the reliability
tests:  python -m tests.reliability.fault_server <serve flags...>

A batch holding seed 666 raises; one holding seed 777 returns NaNs. FAULT_SLOW_MS (env) adds
that many milliseconds to every batch, so tests can keep requests queued and in flight.
"""

from __future__ import annotations

import os
import sys
import time

from server import engine as engine_mod
from server.cli import main

_orig = engine_mod.Engine.run_batch
_slow_s = float(os.environ.get("FAULT_SLOW_MS", "0")) / 1000.0


def faulty_run_batch(self, steps, labels, seeds):  # type: ignore[no-untyped-def]
    if _slow_s:
        time.sleep(_slow_s)
    if 666 in seeds:
        raise RuntimeError("injected fault: internal detail that must not leak")
    if 777 in seeds:
        self.poison_output = True
    return _orig(self, steps, labels, seeds)


engine_mod.Engine.run_batch = faulty_run_batch  # type: ignore[method-assign]

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
