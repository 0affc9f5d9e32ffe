"""Messages between the engine process and its front-end processes (`--frontends N`).

One Unix-domain stream per front end; each message a tuple whose first item names it, pickled
(protocol 5: numpy images travel as raw buffers) behind a 4-byte length. Both ends are this
program's own processes, spawned by the engine process, over a socket in a directory only its
user can enter, so pickle carries nothing that was not ours.

What travels (front end -> engine):
    ("hello", index)                              first message
    ("submit", id, JobSpec)                       a job for the batcher
    ("gone", id) / ("cancel", id)                 the client left / the request gave up on it
    ("call", call_id, name, args)                 an answer wanted: "text" (a text row), "take"
                                                  (the key rate limit), "scrape" (/metrics)
    ("release", model, row)                       a prompted model's text row is free again
    ("shadow", model, label, seed, pos, score, accepted, threshold)
    ("metrics", families)                         the front end's own metrics, every PUSH_S
engine -> front end:
    ("meta", models, default)                     once, when the engine has loaded
    ("state", ready, draining, load_error, predictions)   every PUSH_S
    ("done", id, JobResult) / ("fail", id, kind, args) / ("cancelled", id)
    ("reply", call_id, value) / ("fail-call", call_id, kind) / ("drain",)
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass
from typing import Any

PUSH_S = 0.25  # how stale a front end's view of readiness and queue predictions may be
_LEN = 4


@dataclass
class JobSpec:
    """What a front end's `Job` holds that the engine's copy of it needs (not its future)."""

    steps: int
    labels: list[int | None]
    seeds: list[int]
    deadline: float  # time.monotonic(): CLOCK_MONOTONIC is the same clock in every process
    request_id: str
    model: str
    tenant: str
    edits: list[Any] | None
    priority: str
    enqueued: float


class Channel:
    """The sending side of one stream. Messages sent during one turn of the event loop leave in
    one write at its end: under load one system call carries many answers instead of one each.
    Never blocks: the transport buffers, and what is in flight is bounded by the queue's own
    bound on images."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def send(self, msg: tuple[Any, ...]) -> None:
        if self.writer.is_closing():
            return
        data = pickle.dumps(msg, protocol=5)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out += (len(data).to_bytes(_LEN, "little"), data)

    def _flush(self) -> None:
        if not self.writer.is_closing():
            self.writer.writelines(self._out)
        self._out = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


async def receive(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message; raises asyncio.IncompleteReadError at EOF."""
    n = int.from_bytes(await reader.readexactly(_LEN), "little")
    msg: tuple[Any, ...] = pickle.loads(await reader.readexactly(n))
    return msg
