"""Per-key fairness: a request-rate limit per API key (token bucket), so one tenant cannot take
the whole server; its queue share is capped by the batcher (`Batcher.tenant_limit`)."""

from __future__ import annotations

import hashlib
import math
import time

from fastapi import Request


def tenant_of(request: Request) -> str:
    """Whose request it is: its API key (hashed: keys are not kept in memory as text beyond
    the settings), or, on a server without keys, the client's address."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    client = request.client
    return "addr:" + (client.host if client else "unknown")


class RateLimiter:
    """`rate` requests/s per tenant with bursts of `burst` (token bucket); rate 0 = no limit."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst or math.ceil(rate))
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)

    def take(self, tenant: str, now: float | None = None) -> int:
        """0 if the request may go; else the seconds until it could (its Retry-After)."""
        if self.rate <= 0:
            return 0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            return 0
        self._buckets[tenant] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))
