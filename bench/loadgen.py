"""Open-loop load generation: Poisson arrivals that never wait for responses.

Each request is scheduled at its arrival time and its latency is measured from that scheduled
time, so a slow server cannot slow the arrivals down and hide its own tail (coordinated
omission). The HTTP/1.1 client is a few lines over asyncio streams with a keep-alive connection
pool: far cheaper per request than a general client, which matters when the load generator
shares 2 cores with the server.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed (it comes with uvicorn[standard]): the load
    generator then spends ~half the CPU per request that it does on the default loop, CPU it
    would otherwise take from the server it measures on the same cores."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class RawHTTP:
    def __init__(self, host: str, port: int, max_conns: int = 1024) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.sem = asyncio.Semaphore(max_conns)

    async def post(self, path: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
        """-> (status, body); status 0 when no response came. A pooled connection the server
        closed while idle (keep-alive timeout) is retried once on a fresh one, as HTTP clients do."""
        async with self.sem:
            for attempt in range(2):
                reused = bool(self.idle) and attempt == 0
                conn = self.idle.pop() if reused else await self._connect()
                if conn is None:
                    return 0, b""
                r, w = conn
                try:
                    w.write(
                        b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body)
                    )
                    await w.drain()
                    status, payload, keep = await asyncio.wait_for(self._read(r), timeout)
                except TimeoutError:  # the server may be working on it: never resend
                    w.close()
                    return 0, b""
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    w.close()
                    if reused:
                        continue
                    return 0, b""
                if keep:
                    self.idle.append(conn)
                else:
                    w.close()
                return status, payload
            return 0, b""

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            return None

    @staticmethod
    async def _read(r: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        status = int((await r.readline()).split()[1])
        length, keep = 0, True
        while (line := await r.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                keep = False
        return status, await r.readexactly(length), keep

    def close(self) -> None:
        for _, w in self.idle:
            w.close()
        self.idle.clear()


@dataclass
class RunResult:
    rate: float
    duration_s: float
    sent: int = 0
    latencies_ok: list[float] = field(default_factory=list)  # seconds, 2xx only
    statuses: dict[int, int] = field(default_factory=dict)
    images_ok: int = 0
    wall_s: float = 0.0
    by_class: dict[str, list[float]] = field(default_factory=dict)  # 2xx latencies per request class

    @classmethod
    def combined(cls, parts: list[RunResult]) -> RunResult:
        """The results of loads run side by side (one per client process), as one."""
        res = cls(sum(p.rate for p in parts), max(p.duration_s for p in parts))
        res.wall_s = max(p.wall_s for p in parts)
        for p in parts:
            res.sent += p.sent
            res.images_ok += p.images_ok
            res.latencies_ok += p.latencies_ok
            for k, v in p.statuses.items():
                res.statuses[k] = res.statuses.get(k, 0) + v
            for c, lat in p.by_class.items():
                res.by_class.setdefault(c, []).extend(lat)
        return res

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ok)

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 2) if lat else None

        rejected = sum(v for k, v in self.statuses.items() if k in (429, 503))
        errors = sum(v for k, v in self.statuses.items() if not (200 <= k < 300) and k not in (429, 503))
        return {
            "rate_rps": round(self.rate, 2),
            "sent": self.sent,
            "ok": len(lat),
            "rejected": rejected,
            "errors": errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "throughput_images_per_s": round(self.images_ok / self.wall_s, 2) if self.wall_s else 0.0,
            "p50_ms": q(0.50),
            "p95_ms": q(0.95),
            "p99_ms": q(0.99),
            "max_ms": round(lat[-1] * 1e3, 2) if lat else None,
        }


def make_body(rng: random.Random, n: int = 1, steps: int = 2, classes: int = 10) -> bytes:
    """A generate body: a random class of `classes` (none for an unconditional model, 0)."""
    body: dict[str, int] = {"seed": rng.randrange(2**31), "n": n, "steps": steps}
    if classes:
        body = {"class_label": rng.randrange(classes), **body}
    return json.dumps(body).encode()


def generate_body(rng: random.Random, steps: int = 2, classes: int = 10) -> tuple[bytes, int]:
    """One n = 1 generate body and its image count (a picklable body_fn for client processes)."""
    return make_body(rng, steps=steps, classes=classes), 1


def open_loop_client(
    port: int, rate: float, duration_s: float, seed: int, steps: int, classes: int
) -> RunResult:
    """One client process's share of an open-loop load (module level: spawned processes import it)."""
    body_fn = partial(generate_body, steps=steps, classes=classes)
    return run(open_loop("127.0.0.1", port, rate, duration_s, seed=seed, body_fn=body_fn))


class ClientProcesses:
    """k processes that generate load side by side, each running one share of it, the results
    combined: one event loop sends a few thousand requests per second at most, below what
    several front-end processes answer. Spawned once, their imports done before any timed load;
    with k = 1 the load runs in this process."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.pool: ProcessPoolExecutor | None = None
        if k > 1:
            self.pool = ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn"))
            list(self.pool.map(abs, range(k)))

    def run(self, fn: Callable[..., RunResult], shares: list[tuple[Any, ...]]) -> RunResult:
        """fn(*share) for each of the k shares (fn at module level), as one result."""
        if self.pool is None:
            (share,) = shares
            return fn(*share)
        return RunResult.combined(list(self.pool.map(fn, *zip(*shares, strict=True))))

    def open_loop(self, port: int, rate: float, duration_s: float, steps: int, classes: int) -> RunResult:
        """Poisson arrivals at `rate` req/s, rate/k from each process (the sum of independent
        Poisson streams is one at the sum of their rates)."""
        shares = [(port, rate / self.k, duration_s, seed, steps, classes) for seed in range(self.k)]
        return self.run(open_loop_client, shares)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


async def open_loop(
    host: str,
    port: int,
    rate: float,
    duration_s: float,
    seed: int = 0,
    body_fn: Any = None,
    path: str = "/v1/generate",
    timeout: float = 60.0,
    on_answer: Any = None,
) -> RunResult:
    """Send Poisson arrivals at `rate` req/s for `duration_s`; wait for every answer.
    body_fn(rng) -> (body, images) or (body, images, class): a class files the latency under it.
    on_answer(status, body): called with every answer (to read what the bodies say)."""
    rng = random.Random(seed)
    body_fn = body_fn or generate_body
    client = RawHTTP(host, port)
    res = RunResult(rate, duration_s)
    tasks: list[asyncio.Task[None]] = []

    async def one(t_sched: float, body: bytes, n: int, cls: str | None) -> None:
        status, payload = await client.post(path, body, timeout)
        if on_answer is not None:
            on_answer(status, payload)
        res.statuses[status] = res.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            res.latencies_ok.append(time.perf_counter() - t_sched)
            res.images_ok += n
            if cls is not None:
                res.by_class.setdefault(cls, []).append(res.latencies_ok[-1])

    t0 = time.perf_counter()
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        delay = t0 + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body, n, *cls = body_fn(rng)
        tasks.append(asyncio.create_task(one(t0 + t, body, n, cls[0] if cls else None)))
        res.sent += 1
    await asyncio.gather(*tasks)
    res.wall_s = time.perf_counter() - t0
    client.close()
    return res


async def closed_loop(
    host: str, port: int, count: int, seed: int = 0, path: str = "/v1/generate", classes: int = 10
) -> list[float]:
    """One request at a time: the unloaded latency (seconds) of each."""
    rng = random.Random(seed)
    client = RawHTTP(host, port)
    out = []
    for _ in range(count):
        t = time.perf_counter()
        status, _ = await client.post(path, make_body(rng, classes=classes))
        if status == 200:
            out.append(time.perf_counter() - t)
    client.close()
    return out


async def concurrent_loop(
    host: str,
    port: int,
    concurrency: int,
    duration_s: float,
    seed: int = 0,
    path: str = "/v1/generate",
    n: int = 1,
    body_fn: Any = None,
) -> RunResult:
    """`concurrency` clients, each sending its next request as soon as its last is answered, for
    `duration_s`: the most the server sustains (a throughput ceiling, not a latency figure).
    body_fn(rng) -> (body, images, ...) as for `open_loop`; default n-image generate bodies."""
    rng = random.Random(seed)
    body_fn = body_fn or (lambda r: (make_body(r, n=n), n))
    client = RawHTTP(host, port)
    res = RunResult(0.0, duration_s)
    t0 = time.perf_counter()
    end = t0 + duration_s

    async def worker() -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            body, k, *_ = body_fn(rng)
            status, _ = await client.post(path, body)
            res.sent += 1
            res.statuses[status] = res.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                res.latencies_ok.append(time.perf_counter() - t)
                res.images_ok += k

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall_s = time.perf_counter() - t0
    res.rate = res.sent / res.wall_s
    client.close()
    return res
