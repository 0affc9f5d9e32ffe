"""server/heap.py: a settled process keeps start-up's objects out of the collector's walks and
still collects the reference cycles it makes later. Run in a child process: freezing the test
process's heap would keep every later test's cyclic garbage alive."""

from __future__ import annotations

import subprocess
import sys

from tests.procs import ROOT

CHECK = """
import gc, weakref
from server import heap

class Node:
    pass

kept = [Node() for _ in range(1000)]  # alive at start-up
heap.settle()
assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
assert gc.get_threshold()[0] == heap.GEN0_THRESHOLD

# a request's worth of live objects: far below the threshold, so no collection walks them
before = gc.get_stats()[0]["collections"]
live = [Node() for _ in range(heap.GEN0_THRESHOLD // 2)]
assert gc.get_stats()[0]["collections"] == before

# a cycle made after settling is still garbage the collector finds
a, b = Node(), Node()
a.other, b.other = b, a
gone = []
weakref.finalize(a, gone.append, "a")
del a, b
gc.collect()
assert gone == ["a"], "a reference cycle made after settle() was not collected"
print("ok")
"""


def test_settle_freezes_startup_and_still_collects_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
