"""The engine process's side of `--frontends N`: N front-end processes (server/remote.py) serve
HTTP on the API port and send their jobs here, where the one batcher and compute thread run.

The pool listens on a Unix socket, spawns the front ends, and restarts one that dies (its
queued jobs are dropped as abandoned, its text rows released; its counters are kept so rates do
not reset). /metrics anywhere is this process's registry with every front end's added
(`server.metrics.Merged`). On drain the front ends are told first; they stop taking requests,
wait for their answers from here and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest

from models.latent_cm import TableFull
from server import ipc
from server.batcher import BatchFailed, DeadlineExceeded, Draining, Job, JobResult, QueueFull
from server.deps import ServerState
from server.engine import Engine
from server.metrics import Families, Merged, added
from server.remote import ModelView, run_frontend
from server.shadow import queue_shadow

log = logging.getLogger("cmserve.frontends")
RESTART_BACKOFF_S = 1.0


@dataclass(eq=False)
class _Conn:
    chan: ipc.Channel
    index: int = -1
    jobs: dict[int, Job] = field(default_factory=dict)
    pins: list[tuple[str, int]] = field(default_factory=list)  # text rows it holds
    families: Families = field(default_factory=list)


class FrontendPool:
    def __init__(self, st: ServerState, n: int) -> None:
        self.st, self.n = st, n
        self.dir = tempfile.mkdtemp(prefix="cmserve-ipc-")  # mode 0700: only this user connects
        self.path = os.path.join(self.dir, "engine.sock")
        self.procs: list[Any] = [None] * n
        self.conns: set[_Conn] = set()
        self.retired: Families = []  # the summed counts of front ends that exited
        self._ctx = multiprocessing.get_context("spawn")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> FrontendPool:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        self._spawn_task(self._start_when_ready())
        self._spawn_task(self._push_state())
        self.st.merged_metrics = self.merged
        self.st.on_drain.append(self.drain)
        return self

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, i: int) -> None:
        p = self._ctx.Process(
            target=run_frontend, args=(self.st.settings, self.path, i), name=f"cmserve-frontend-{i}"
        )
        p.start()
        self.procs[i] = p
        log.info("front end %d started (pid %d)", i, p.pid)

    async def _start_when_ready(self) -> None:
        """Spawn the front ends once the engine is warm: their start-up (a Python process each,
        importing torch) would otherwise take the cores from the warm-up's timing of the buckets,
        which picks the max batch size (docs/operations.md)."""
        st = self.st
        while not st.ready:
            if st.load_error or st.draining:
                log.error("the engine did not start: no front end started (%s)", st.load_error)
                return
            await asyncio.sleep(0.05)
        for i in range(self.n):
            self._spawn(i)
        await self._supervise()

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(RESTART_BACKOFF_S)
            for i, p in enumerate(self.procs):
                if p is not None and not p.is_alive() and not self.st.draining:
                    log.error("front end %d (pid %d) exited with %s: restarting it", i, p.pid, p.exitcode)
                    self._spawn(i)

    async def _push_state(self) -> None:
        while True:
            self._broadcast(self._state())
            await asyncio.sleep(ipc.PUSH_S)

    def _state(self) -> tuple[Any, ...]:
        st = self.st
        predictions: dict[tuple[str, int], float] = {}
        if st.batcher is not None and st.engine is not None:
            for m in st.engine.models.values():
                for t in m.tiers:
                    predictions[t.sampler] = st.batcher.predict_s(*t.sampler)
        return ("state", st.ready, st.draining, st.load_error, predictions)

    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        for c in list(self.conns):
            c.chan.send(msg)

    # ---- one front end's connection ------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Conn(ipc.Channel(writer))
        self.conns.add(c)
        try:
            while True:
                msg = await ipc.receive(reader)
                if msg[0] == "hello":
                    c.index = msg[1]
                    self._send_meta(c)
                else:
                    self._on(c, msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._forget(c)

    def _send_meta(self, c: _Conn) -> None:
        st = self.st
        assert isinstance(st.engine, Engine)  # front ends start once the engine is ready
        models = {
            n: ModelView(m.card, m.tiers, m.placeholder, m.accept_check) for n, m in st.engine.models.items()
        }
        c.chan.send(("meta", models, st.engine.default))
        c.chan.send(self._state())

    def _on(self, c: _Conn, msg: tuple[Any, ...]) -> None:
        kind, st = msg[0], self.st
        if kind == "submit":
            self._submit(c, msg[1], msg[2])
        elif kind == "gone":
            job = c.jobs.get(msg[1])
            if job is not None and st.batcher is not None:
                st.batcher.abandon(job)
        elif kind == "cancel":
            job = c.jobs.pop(msg[1], None)
            if job is not None:
                job.future.cancel()
        elif kind == "call":
            self._spawn_task(self._call(c, msg[1], msg[2], msg[3]))
        elif kind == "release":
            with contextlib.suppress(ValueError):
                c.pins.remove((msg[1], msg[2]))
            if st.engine is not None:
                st.engine.release_text(msg[1], msg[2])
        elif kind == "shadow":
            queue_shadow(st, *msg[1:])
        elif kind == "metrics":
            c.families = msg[1]

    def _submit(self, c: _Conn, jid: int, spec: ipc.JobSpec) -> None:
        st = self.st
        if st.batcher is None:
            c.chan.send(("fail", jid, "draining", ()))
            return
        fut: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        job = Job(
            steps=spec.steps, labels=spec.labels, seeds=spec.seeds, deadline=spec.deadline,
            request_id=spec.request_id, future=fut, model=spec.model, tenant=spec.tenant, edits=spec.edits,
            priority=spec.priority, enqueued=spec.enqueued,
        )  # fmt: skip
        try:
            st.batcher.submit(job)
        except QueueFull as e:
            c.chan.send(("fail", jid, "full", (e.retry_after_s, e.reason)))
            return
        c.jobs[jid] = job
        fut.add_done_callback(lambda f: self._answer(c, jid, f))

    def _answer(self, c: _Conn, jid: int, fut: asyncio.Future[JobResult]) -> None:
        c.jobs.pop(jid, None)
        if fut.cancelled():
            c.chan.send(("cancelled", jid))
            return
        e = fut.exception()
        if e is None:
            c.chan.send(("done", jid, fut.result()))
        elif isinstance(e, DeadlineExceeded):
            c.chan.send(("fail", jid, "deadline", ()))
        elif isinstance(e, BatchFailed):
            c.chan.send(("fail", jid, "failed", (e.reason, e.request_ids)))
        else:  # Draining, or anything unforeseen: the request is answered 503, never left waiting
            if not isinstance(e, Draining):
                log.error("job %d of front end %d failed: %r", jid, c.index, e)
            c.chan.send(("fail", jid, "draining", ()))

    async def _call(self, c: _Conn, cid: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            if name == "text":
                assert self.st.engine is not None
                value: Any = await self.st.engine.acquire_text(*args)
                c.pins.append((args[0], value[0]))
            elif name == "take":  # the key rate limit, server-wide
                value = self.st.limiter.take(args[0])
            elif name == "scrape":
                c.families = args[0]
                value = self.merged()
            else:
                raise ValueError(f"unknown call {name!r}")
        except TableFull:
            c.chan.send(("fail-call", cid, "text_cache_full"))
            return
        except Exception:
            log.exception("call %s of front end %d failed", name, c.index)
            c.chan.send(("fail-call", cid, "error"))
            return
        c.chan.send(("reply", cid, value))

    def _forget(self, c: _Conn) -> None:
        """A front end's connection closed: what it queued is abandoned, what it pinned freed."""
        self.conns.discard(c)
        st = self.st
        for job in c.jobs.values():
            if st.batcher is not None:
                st.batcher.abandon(job)
        c.jobs.clear()
        if st.engine is not None:
            for model, row in c.pins:
                st.engine.release_text(model, row)
        # its counts stay in the sums (a restart must not look like a reset); its levels go
        self.retired = added(self.retired, c.families)
        with contextlib.suppress(Exception):
            c.chan.close()

    # ---- metrics, drain, stop ------------------------------------------------------------------
    def merged(self) -> bytes:
        others = [c.families for c in list(self.conns)] + [self.retired]
        return generate_latest(Merged(self.st.metrics.registry, others))

    def drain(self) -> None:
        """Draining begins: the front ends stop taking requests (each answers what it has).
        Called from a signal handler too: the message is written from the loop, never midway
        through another."""
        self._loop.call_soon_threadsafe(self._broadcast, ("drain",))

    def signal(self, sig: int) -> None:
        for p in self.procs:
            if p is not None and p.is_alive():
                os.kill(p.pid, sig)

    async def wait_frontends(self, timeout_s: float) -> None:
        """Wait (up to timeout_s) for the front ends to exit; then stop any that has not."""
        deadline = time.monotonic() + timeout_s
        while any(p is not None and p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in self.procs:
            if p is not None and p.is_alive():
                log.warning("front end %s did not exit in time: terminating it", p.name)
                p.kill()
                p.join(1)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            c.chan.close()
        shutil.rmtree(self.dir, ignore_errors=True)
