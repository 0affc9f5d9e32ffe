"""The cyclic garbage collector set for a server process that has finished loading.

By then a process holds every container object that torch, pydantic, FastAPI and the model
made, far more than a request's short-lived ones (futures, coroutines, dicts), and they live
as long as the process. With CPython's default thresholds (700, 10, 10) a collection runs every 700
net allocations and the older generations' collections walk that whole start-up heap again and
again, for nothing. So, once before the server takes requests:

- gc.freeze() moves every object alive into a permanent generation the collector never walks
  (after a collection, so no garbage is frozen in with it);
- the youngest generation's threshold goes from 700 to GEN0_THRESHOLD allocations: a request's
  objects mostly die before a collection sees them, instead of being walked and promoted.

Reference cycles are still collected (what leaks is only cyclic garbage among frozen objects:
start-up's, which stays alive anyway). docs/performance.md has what this saves per request.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000


def settle() -> None:
    """Collect, freeze what is alive, raise the youngest generation's threshold."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
