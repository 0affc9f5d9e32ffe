"""A front-end process of its own (`--frontends N`): the HTTP app, fed by the engine process.

It parses, validates, re-rolls, encodes PNGs and answers exactly as the single-process server
does — the routes are the same code — but its queue is a `RemoteBatcher` and its engine an
`EngineView`, both a connection (server/ipc.py) to the engine process, which batches and
samples for every front end. N processes share the API port (SO_REUSEPORT: the kernel spreads
connections over them), so the work that one event loop could not keep up with (a GPU samples
tens of thousands of images per second; one loop parses and answers about a thousand requests)
runs on N cores.

When the engine process goes away, every request waiting on it is answered 503 and the process
drains and exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.interface import ModelInfo
from models.latent_cm import TableFull
from server import ipc
from server.batcher import BatchFailed, DeadlineExceeded, Draining, Job, QueueFull
from server.deps import ApiError, ServerState
from server.engine import pick
from server.metrics import families
from server.tiers import Tier

log = logging.getLogger("cmserve.frontend")


@dataclass
class ModelView:
    """A served model as a front end sees it (no network, no buffers)."""

    card: ModelInfo
    tiers: list[Tier]
    placeholder: bool
    accept_check: bool

    @property
    def name(self) -> str:
        return self.card.name


class Link:
    """The connection to the engine process: jobs and calls waiting on it, its latest state."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: ServerState,
        stop: Callable[[], None],
    ) -> None:  # fmt: skip
        """stop: begins this process's drain (DrainingServer's SIGTERM path)."""
        self.reader, self.st, self.stop = reader, st, stop
        self.chan = ipc.Channel(writer)
        self.jobs: dict[int, Job] = {}
        self.ids: dict[Job, int] = {}
        self.calls: dict[int, asyncio.Future[Any]] = {}
        self._next = itertools.count()
        self.predictions: dict[tuple[str, int], float] = {}
        self.meta: asyncio.Future[tuple[dict[str, ModelView], str]] = (
            asyncio.get_running_loop().create_future()
        )
        self.idle = asyncio.Event()
        self.idle.set()
        self.lost = False

    def send(self, *msg: Any) -> None:
        self.chan.send(msg)

    def next_id(self) -> int:
        return next(self._next)

    async def call(self, name: str, *args: Any) -> Any:
        """Ask the engine process; 503 if it is gone (before or while asking)."""
        if self.lost:
            raise _gone()
        cid = self.next_id()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls[cid] = fut
        self.send("call", cid, name, args)
        return await fut

    def settle(self, jid: int) -> Job | None:
        job = self.jobs.pop(jid, None)
        if job is not None:
            self.ids.pop(job, None)
        if not self.jobs:
            self.idle.set()
        return job

    async def run(self) -> None:
        """Read the engine's messages until it goes away; then fail what waits on it."""
        try:
            while True:
                self._on(await ipc.receive(self.reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._lost()

    def _on(self, msg: tuple[Any, ...]) -> None:
        kind, st = msg[0], self.st
        if kind == "state":
            _, ready, draining, load_error, self.predictions = msg
            st.ready = ready and not draining and self.meta.done()
            st.load_error = load_error
            st.metrics.ready.set(int(st.ready))
        elif kind == "meta" and not self.meta.done():
            self.meta.set_result((msg[1], msg[2]))
        elif kind in ("done", "fail", "cancelled"):
            job = self.settle(msg[1])
            if job is None or job.future.done():
                return
            if kind == "done":
                job.future.set_result(msg[2])
            elif kind == "cancelled":
                job.future.cancel()
            else:
                job.future.set_exception(_failure(msg[2], msg[3]))
        elif kind in ("reply", "fail-call"):
            fut = self.calls.pop(msg[1], None)
            if fut is not None and not fut.done():
                if kind == "reply":
                    fut.set_result(msg[2])
                elif msg[2] == "text_cache_full":
                    fut.set_exception(TableFull("the engine's text table is full"))
                else:
                    fut.set_exception(RuntimeError("the engine process could not answer"))
        elif kind == "drain" and not st.draining:
            log.info("the engine process is draining: this front end drains too")
            self.stop()

    def _lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        st = self.st
        st.ready = False
        st.load_error = "the engine process is gone"
        st.metrics.ready.set(0)
        for job in list(self.jobs.values()):
            if not job.future.done():
                job.future.set_exception(Draining())
        self.jobs.clear()
        self.ids.clear()
        self.idle.set()
        for fut in self.calls.values():
            if not fut.done():
                fut.set_exception(_gone())
        self.calls.clear()
        if not self.meta.done():
            self.meta.set_exception(RuntimeError("the engine process is gone"))
        if not st.draining:
            log.error("lost the engine process: draining and exiting")
            self.stop()


def _gone() -> ApiError:
    return ApiError(503, "server is shutting down", code="draining", headers={"Retry-After": "1"})


def _failure(kind: str, args: tuple[Any, ...]) -> Exception:
    if kind == "deadline":
        return DeadlineExceeded()
    if kind == "full":
        return QueueFull(*args)
    if kind == "failed":
        return BatchFailed(*args)
    return Draining()


class RemoteBatcher:
    """The engine process's queue, as `JobQueue`: a job is sent there and its future settled by
    the answer. Refusals (queue full) come back as the future's exception, not from `submit`."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def submit(self, job: Job) -> None:
        link = self.link
        if link.lost:
            raise _gone()
        jid = link.next_id()
        link.jobs[jid], link.ids[job] = job, jid
        link.idle.clear()
        spec = ipc.JobSpec(
            job.steps, job.labels, job.seeds, job.deadline, job.request_id, job.model, job.tenant, job.edits,
            job.priority, job.enqueued,
        )  # fmt: skip
        link.send("submit", jid, spec)
        job.future.add_done_callback(lambda f: self._settled(jid, f))

    def _settled(self, jid: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() and self.link.settle(jid) is not None:  # given up here: tell the engine
            self.link.send("cancel", jid)

    def abandon(self, job: Job) -> None:
        jid = self.link.ids.get(job)
        if jid is not None:
            self.link.send("gone", jid)

    def predict_s(self, model: str, steps: int) -> float:
        return self.link.predictions.get((model, steps), 0.0)

    async def drain(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.link.idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        for job in list(self.link.jobs.values()):
            if not job.future.done():
                job.future.set_exception(Draining())

    def snapshot(self) -> dict[str, Any]:
        return {"waiting_on_engine": len(self.link.jobs)}


class EngineView:
    """The engine process's models, as `EngineFacts`."""

    def __init__(self, link: Link, models: dict[str, ModelView], default: str) -> None:
        self.link, self._models, self._default = link, models, default

    @property
    def default(self) -> str:
        return self._default

    @property
    def models(self) -> Mapping[str, ModelView]:
        return self._models

    def get(self, name: str | None = None) -> ModelView:
        return pick(self._models, self._default, name)

    async def acquire_text(self, model: str, prompt: str, w: float) -> tuple[int, bool, bool]:
        row, cut, hit = await self.link.call("text", model, prompt, w)
        return row, cut, hit

    def release_text(self, model: str, row: int) -> None:
        self.link.send("release", model, row)

    def shadow(self, *args: Any) -> None:
        self.link.send("shadow", *args)

    def close(self, wait: bool = True) -> None:
        self.link.chan.close()


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


async def connect(st: ServerState, path: str, index: int, stop: Callable[[], None] = _sigterm_self) -> None:
    """The front end's start-up, awaited before it listens: connect to the engine process and
    wait for its models; then, in the background, follow its state (readiness) and push this
    process's metrics to it. stop: begins this process's drain."""
    reader, writer = await asyncio.open_unix_connection(path)
    link = Link(reader, writer, st, stop)
    link.send("hello", index)
    for coro in (link.run(), _push_metrics(st, link)):
        task = asyncio.create_task(coro)
        st.tasks.add(task)
        task.add_done_callback(st.tasks.discard)
    models, default = await link.meta
    st.engine = EngineView(link, models, default)
    st.batcher = RemoteBatcher(link)

    async def scrape() -> bytes:
        body: bytes = await link.call("scrape", families(st.metrics.registry))
        return body

    st.scrape = scrape
    if st.settings.key_rate_limit > 0:

        async def rate_check(tenant: str) -> int:
            wait: int = await link.call("take", tenant)
            return wait

        st.rate_check = rate_check


async def _push_metrics(st: ServerState, link: Link) -> None:
    while not link.lost:
        link.send("metrics", families(st.metrics.registry))
        await asyncio.sleep(ipc.PUSH_S * 2)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, so every front end binds the same
    port and the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_frontend(settings: Any, path: str, index: int) -> None:
    """Entry point of a front-end process (spawned by the engine process's FrontendPool)."""
    from server import heap, logs
    from server.app import DrainingServer, create_app, uvicorn_config

    logs.configure(settings.log_level, settings.log_format)
    s = settings.model_copy(update={"frontends": 1, "ops_port": 0})  # the keys file's keys kept
    app = create_app(s, starter=lambda st: connect(st, path, index))
    sock = reuseport_socket(s.host, s.port)
    heap.settle()
    DrainingServer(uvicorn_config(app, s), app.state.cm).run(sockets=[sock])
