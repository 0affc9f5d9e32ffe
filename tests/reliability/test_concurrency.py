"""Many clients for 30 s — mixed steps and n, some hanging up, some with deadlines too short —
against one server: every request that stays gets exactly one complete, correct answer; the
server counts exactly one answer per request; a watchdog fails the test if the batcher stalls."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.loadgen import RawHTTP
from tests.procs import serve_process

pytestmark = pytest.mark.slow
DURATION = 30.0


async def _client(k: int, port: int, stop: float, log: list[dict]) -> None:
    rng = random.Random(k)
    http = RawHTTP("127.0.0.1", port)
    while time.monotonic() < stop:
        kind = rng.choices(["normal", "hangup", "deadline"], weights=[8, 1, 1])[0]
        n, steps, seed = rng.choice([1, 1, 2, 4]), rng.choice([1, 2, 3, 4]), rng.randrange(2**40)
        body = {"n": n, "steps": steps, "seed": seed, "class_label": rng.choice([None, *range(10)])}
        if kind == "deadline":
            body["timeout_s"] = 0.001
        raw = json.dumps(body).encode()
        if kind == "hangup":  # send the whole request, then close without reading
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(
                b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(raw), raw)
            )
            await w.drain()
            await asyncio.sleep(rng.uniform(0, 0.05))
            w.close()
            log.append({"kind": kind})
            continue
        status, payload = await http.post("/v1/generate", raw, timeout=60)
        entry = {"kind": kind, "status": status, "n": n, "seed": seed}
        if status == 200:
            data = json.loads(payload)["data"]
            entry["seeds"] = [d["seed"] for d in data]
        log.append(entry)
    http.close()


def test_many_clients_no_lost_or_duplicated_answers(tiny_ckpt: Path, tmp_path: Path) -> None:
    args = (
        "--checkpoint",
        str(tiny_ckpt),
        "--buckets",
        "1,2,4,8,16",
        "--max-batch-size",
        "16",
        "--max-queue-images",
        "256",
    )
    with serve_process(*args, tmp=tmp_path) as sp:
        port = int(sp.url.rsplit(":", 1)[1])
        stalled: list[str] = []
        done = threading.Event()

        def watchdog() -> None:
            """Fails the test if images are queued but no batch completes for 10 s."""
            with httpx.Client(base_url=sp.url, timeout=5) as c:
                last, last_t = -1.0, time.monotonic()
                while not done.is_set():
                    text = c.get("/metrics").text
                    batches = float(
                        next(
                            ln.split()[1]
                            for ln in text.splitlines()
                            if ln.startswith("cmserve_batch_size_images_count")
                        )
                    )
                    queued = float(
                        next(
                            ln.split()[1]
                            for ln in text.splitlines()
                            if ln.startswith("cmserve_queue_depth_images")
                        )
                    )
                    if batches != last:
                        last, last_t = batches, time.monotonic()
                    elif queued > 0 and time.monotonic() - last_t > 10:
                        stalled.append(f"batcher stalled with {queued} images queued")
                        return
                    time.sleep(0.5)

        dog = threading.Thread(target=watchdog)
        dog.start()
        before = sp.metric("cmserve_requests_total", route="/v1/generate", default=0.0)
        log: list[dict] = []

        async def main() -> None:
            stop = time.monotonic() + DURATION
            await asyncio.gather(*(_client(k, port, stop, log) for k in range(24)))

        try:
            asyncio.run(main())
            time.sleep(1.5)  # let the server finish answering the hung-up requests
        finally:
            done.set()
            dog.join(10)
        answered = sp.metric("cmserve_requests_total", route="/v1/generate") - before
        assert sp.metric("cmserve_queue_depth_images") == 0 and sp.metric("cmserve_inflight_requests") == 0
    assert not stalled, stalled
    stay = [e for e in log if e["kind"] != "hangup"]
    print(
        f"\n{len(log)} requests: {sum(e['kind'] == 'hangup' for e in log)} hung up, "
        f"statuses {sorted({e['status'] for e in stay})}"
    )
    assert len(stay) > 100
    for e in stay:
        assert e["status"] in (200, 429, 504), e  # one answer each, none lost (status 0) or 5xx
        if e["status"] == 200:
            assert e["seeds"] == [e["seed"] + i for i in range(e["n"])], e  # its own images, all of them
    assert any(e["status"] == 504 for e in stay if e["kind"] == "deadline")
    assert answered == len(log)  # the server answered (or dropped and counted) every request once
