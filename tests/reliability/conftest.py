from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-cases", type=int, default=300, help="schemathesis examples per operation")
    parser.addoption("--run-soak", action="store_true", help="run the 10-minute soak test")


@pytest.fixture(autouse=True, params=["request", "step"], ids=["request-batching", "step-batching"])
def batching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every reliability test runs against both batching modes: the server processes they start
    read CMSERVE_BATCHING from the environment they inherit."""
    monkeypatch.setenv("CMSERVE_BATCHING", request.param)
    return str(request.param)
