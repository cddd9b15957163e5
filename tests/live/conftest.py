"""The live suite: gateway and fake-upstream processes over real sockets (``make test-live``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import KnobbedFake

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.live)


@pytest.fixture
def failing() -> Iterator[KnobbedFake]:
    """An upstream (in a thread of the test process) that answers every request 500."""
    upstream = KnobbedFake(history=50)
    upstream.set(status="500")
    yield upstream
    upstream.close()
