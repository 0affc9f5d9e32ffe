from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-cases", type=int, default=300, help="schemathesis examples per operation")
    parser.addoption("--run-soak", action="store_true", help="run the 10-minute soak test")
