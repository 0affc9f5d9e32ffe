"""The API-key check, standard library only (the ops process imports it without torch)."""

from __future__ import annotations

import hmac


def key_ok(authorization: str, keys: list[str]) -> bool:
    """Whether an Authorization header carries one of `keys` (none configured: always)."""
    if not keys:
        return True
    scheme, _, token = authorization.partition(" ")
    ok = False
    if scheme.lower() == "bearer" and token:
        # compare against every key so the time taken does not tell which (or whether one) matched
        for k in keys:
            ok |= hmac.compare_digest(token.encode(), k.encode())
    return ok
