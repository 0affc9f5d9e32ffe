"""schemathesis against the OpenAPI schema of a real server process: no 5xx, and every
response (status code, content type, body) conforms to the schema. `make fuzz` runs more cases
(--fuzz-cases per operation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from tests.procs import serve_process

pytestmark = pytest.mark.slow


def test_api_conforms_and_never_5xx(tiny_ckpt: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    per_op = request.config.getoption("--fuzz-cases")
    sent: dict[str, int] = {}
    with serve_process(
        "--checkpoint", str(tiny_ckpt), "--buckets", "1,2,4,8", "--max-images-per-request", "8", tmp=tmp_path
    ) as sp:
        schema = schemathesis.openapi.from_url(sp.url + "/openapi.json")
        for result in schema.get_all_operations():
            op = result.ok()
            label = op.label
            n = per_op if label == "POST /v1/generate" else max(10, per_op // 10)

            @given(case=op.as_strategy())
            @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case) -> None:  # type: ignore[no-untyped-def]
                response = case.call(base_url=sp.url, timeout=30)
                # 504 is the specified answer to a deadline the client itself set too short
                asked_deadline = isinstance(case.body, dict) and (case.body.get("timeout_s") or 99) < 1
                asked_deadline |= float((case.headers or {}).get("x-request-timeout", 99)) < 1
                assert response.status_code < 500 or (response.status_code == 504 and asked_deadline), (
                    case.body,
                    response.text,
                )
                excluded = [not_a_server_error]  # 5xx checked above
                if label == "POST /v1/images/edits":  # noqa: B023 (called before the loop moves on)
                    # a schema-valid `image` is any bytes; only a PNG of the model's size is an image
                    excluded.append(positive_data_acceptance)
                case.validate_response(response, excluded_checks=excluded)
                sent[label] = sent.get(label, 0) + 1  # noqa: B023 (called before the loop moves on)

            fuzz()
    total = sum(sent.values())
    print(f"\nschemathesis: {total} cases sent {sent}")
    assert sent.get("POST /v1/generate", 0) >= min(per_op, 50)
    assert {"GET /healthz", "GET /readyz", "GET /v1/models", "GET /metrics"} <= set(sent)
    assert {"POST /v1/images/edits", "POST /v1/images/interpolations"} <= set(sent)
