"""A Python client for cmserve's `POST /v1/generate`, sync and async, over httpx.

    from server.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as c:
        res = c.generate(class_label=7, n=4, seed=1)
        res.images[0].save("seven.png")        # PIL images (bytes in res.pngs)

Retries 429 and 503 (queue full, loading, draining) honouring `Retry-After`, within a bounded
number of attempts and a total retry budget in seconds; sends the deadline as
`x-request-timeout`; every error raised carries the server's message, code and request id.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRYABLE = (429, 503)


class CmserveError(Exception):
    """An error answer: status, the server's message and code, and the request id to quote."""

    def __init__(self, status: int, message: str, code: str | None, request_id: str | None) -> None:
        super().__init__(f"{status} {code or 'error'}: {message} (request id {request_id})")
        self.status, self.message, self.code, self.request_id = status, message, code, request_id


@dataclass
class GenerateResult:
    model: str
    steps: int
    pngs: list[bytes]
    seeds: list[int]
    class_label: int | None
    timings_ms: dict[str, float]
    request_id: str | None
    attempts: int = 1
    _images: list[Any] = field(default_factory=list, repr=False)

    @property
    def images(self) -> list[Any]:
        """The PNGs decoded as PIL images (Pillow is a dependency of the server)."""
        if not self._images:
            from PIL import Image

            self._images = [Image.open(io.BytesIO(p)) for p in self.pngs]
        return self._images


def _request(
    class_label: int | None, n: int, seed: int | None, steps: int | None, timeout_s: float
) -> dict[str, Any]:
    """The keyword arguments of one POST /v1/generate: its body and its deadline header."""
    body: dict[str, Any] = {"class_label": class_label, "n": n}
    if seed is not None:
        body["seed"] = seed
    if steps is not None:
        body["steps"] = steps
    return {"json": body, "headers": {"x-request-timeout": str(timeout_s)}}


def _raise_for_error(r: httpx.Response) -> None:
    if r.status_code == 200:
        return
    try:
        err = r.json()["error"]
        message, code = str(err.get("message")), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = r.text[:300] or r.reason_phrase, None
    raise CmserveError(r.status_code, message, code, r.headers.get("x-request-id"))


def _result(r: httpx.Response, attempts: int) -> GenerateResult:
    _raise_for_error(r)
    j = r.json()
    data = j["data"]
    return GenerateResult(
        model=j["model"],
        steps=j["steps"],
        pngs=[base64.b64decode(d["b64_json"]) for d in data],
        seeds=[d["seed"] for d in data],
        class_label=data[0]["class_label"] if data else None,
        timings_ms=j.get("timings_ms", {}),
        request_id=r.headers.get("x-request-id"),
        attempts=attempts,
    )


@dataclass
class RetryPolicy:
    """At most `attempts` tries in all, sleeping what `Retry-After` says (or `backoff_s`), and
    never more than `budget_s` seconds of sleeping in total."""

    attempts: int = 4
    budget_s: float = 30.0
    backoff_s: float = 0.5

    def wait(self, r: httpx.Response, attempt: int, slept: float) -> float | None:
        """Seconds to sleep before trying again, or None to answer with `r` as it is."""
        if r.status_code not in RETRYABLE or attempt >= self.attempts:
            return None
        try:
            wait = max(0.0, float(r.headers.get("retry-after", self.backoff_s)))
        except ValueError:
            wait = self.backoff_s
        return wait if slept + wait <= self.budget_s else None


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s + 5, transport=transport)
        self.timeout_s, self.retry = timeout_s, retry or RetryPolicy()

    def generate(
        self, class_label: int | None = None, n: int = 1, seed: int | None = None, steps: int | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:  # fmt: skip
        """Images of `class_label` (None = unconditional); the server's deadline is `timeout_s`."""
        req = _request(class_label, n, seed, steps, timeout_s or self.timeout_s)
        slept, attempt = 0.0, 0
        while True:
            attempt += 1
            r = self.http.post("/v1/generate", **req)
            wait = self.retry.wait(r, attempt, slept)
            if wait is None:
                return _result(r, attempt)
            time.sleep(wait)
            slept += wait

    def models(self) -> list[dict[str, Any]]:
        r = self.http.get("/v1/models")
        _raise_for_error(r)
        return list(r.json()["data"])

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """`Client`'s asyncio twin: the same arguments, `await c.generate(...)`."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout_s + 5, transport=transport
        )
        self.timeout_s, self.retry = timeout_s, retry or RetryPolicy()

    async def generate(
        self, class_label: int | None = None, n: int = 1, seed: int | None = None, steps: int | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:  # fmt: skip
        req = _request(class_label, n, seed, steps, timeout_s or self.timeout_s)
        slept, attempt = 0.0, 0
        while True:
            attempt += 1
            r = await self.http.post("/v1/generate", **req)
            wait = self.retry.wait(r, attempt, slept)
            if wait is None:
                return _result(r, attempt)
            await asyncio.sleep(wait)
            slept += wait

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
