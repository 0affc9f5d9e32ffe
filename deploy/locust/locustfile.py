"""Open-loop load test for cmserve with an SLO verdict in the exit code.

Each simulated user fires requests on a Poisson schedule (mean --user-rate per second) without
waiting for the previous answer (each request runs in its own greenlet), so slow responses do
not slow the arrivals. The mix of n, steps and class labels is configurable. When the time is up
no new request is sent, and the ones in flight get up to --drain-timeout seconds to finish; any
still unfinished then count as failures (the slowest tail is what the p99 gates on, so it must
not fall out of the count). The run fails (exit code 1) when p95 or p99 exceed their SLO or the
failure ratio exceeds its bound; the verdict prints requests sent against completed.

    locust -f deploy/locust/locustfile.py --headless -H http://127.0.0.1:8000 -u 10 -r 10 -t 30s \
        --slo-p95-ms 500 --slo-p99-ms 1000 --max-fail-ratio 0.01
"""

from __future__ import annotations

import json
import random

import gevent
from locust import FastHttpUser, events, task


@events.init_command_line_parser.add_listener
def _args(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--slo-p95-ms", type=float, default=1000.0, help="fail if p95 exceeds this")
    parser.add_argument("--slo-p99-ms", type=float, default=2000.0, help="fail if p99 exceeds this")
    parser.add_argument("--max-fail-ratio", type=float, default=0.01, help="fail if more requests fail")
    parser.add_argument("--user-rate", type=float, default=2.0, help="requests/s per user (Poisson)")
    parser.add_argument(
        "--mix",
        default='{"n": {"1": 0.7, "2": 0.2, "4": 0.1}, "steps": {"1": 0.2, "2": 0.7, '
        '"4": 0.1}, "unconditional": 0.1}',
        help="JSON: weights of n and steps, share unconditional",
    )
    parser.add_argument("--api-key", default="", help="bearer key, if the server wants one")
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds the requests in flight get at the end"
    )


# requests fired and not yet answered (each runs in a greenlet of its own), and requests fired
INFLIGHT: set[gevent.Greenlet] = set()
SENT = {"n": 0}


def _pick(weights: dict[str, float]) -> int:
    keys = list(weights)
    return int(random.choices(keys, weights=[weights[k] for k in keys])[0])


class Generate(FastHttpUser):
    concurrency = 64  # requests a user may have in flight (open loop)

    def wait_time(self) -> float:  # type: ignore[override]
        return random.expovariate(self.environment.parsed_options.user_rate)

    @task
    def fire(self) -> None:
        g = gevent.spawn(self._one)  # do not wait: the next arrival keeps its schedule
        SENT["n"] += 1
        INFLIGHT.add(g)
        g.link(INFLIGHT.discard)

    def _one(self) -> None:
        opts = self.environment.parsed_options
        mix = json.loads(opts.mix)
        body = {
            "n": _pick(mix["n"]),
            "steps": _pick(mix["steps"]),
            "class_label": None if random.random() < mix["unconditional"] else random.randrange(10),
        }
        headers = {"authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        with self.client.post(
            "/v1/generate", json=body, headers=headers, name=f"generate n={body['n']}", catch_response=True
        ) as r:
            if r.status_code == 200 and len(r.json().get("data", [])) != body["n"]:
                r.failure("wrong number of images")


@events.test_stop.add_listener
def _drain(environment, **_kw) -> None:  # type: ignore[no-untyped-def]
    """No more arrivals: wait for the requests in flight; what is left counts as failed."""
    timeout = environment.parsed_options.drain_timeout
    if INFLIGHT:
        print(f"waiting up to {timeout:g} s for {len(INFLIGHT)} requests in flight", flush=True)
        gevent.joinall(list(INFLIGHT), timeout=timeout)
    left = list(INFLIGHT)
    for g in left:
        g.kill(block=False)
        environment.events.request.fire(
            request_type="POST", name="unfinished at the end", response_time=timeout * 1000.0,
            response_length=0, exception=TimeoutError(f"no answer within the {timeout:g} s drain"),
            context={},
        )  # fmt: skip
    INFLIGHT.clear()


@events.quitting.add_listener
def _verdict(environment, **_kw) -> None:  # type: ignore[no-untyped-def]
    opts = environment.parsed_options
    total = environment.stats.total
    p95, p99 = total.get_response_time_percentile(0.95), total.get_response_time_percentile(0.99)
    unfinished = environment.stats.get("unfinished at the end", "POST").num_failures
    verdict = {
        "sent": SENT["n"],
        "completed": total.num_requests - unfinished,
        "unfinished": unfinished,
        "requests": total.num_requests,
        "failures": total.num_failures,
        "fail_ratio": round(total.fail_ratio, 4),
        "p95_ms": p95,
        "p99_ms": p99,
        "slo_p95_ms": opts.slo_p95_ms,
        "slo_p99_ms": opts.slo_p99_ms,
    }
    failed = []
    if total.num_requests == 0:
        failed.append("no requests completed")
    if p95 > opts.slo_p95_ms:
        failed.append(f"p95 {p95} ms > {opts.slo_p95_ms} ms")
    if p99 > opts.slo_p99_ms:
        failed.append(f"p99 {p99} ms > {opts.slo_p99_ms} ms")
    if total.fail_ratio > opts.max_fail_ratio:
        failed.append(f"fail ratio {total.fail_ratio:.4f} > {opts.max_fail_ratio}")
    verdict["result"] = "FAIL: " + "; ".join(failed) if failed else "PASS"
    print("SLO verdict: " + json.dumps(verdict))
    if failed:
        environment.process_exit_code = 1
