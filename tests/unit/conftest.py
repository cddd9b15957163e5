"""Fixtures of the unit suite."""

from __future__ import annotations

import pytest

from gateway.conf import env


@pytest.fixture
def config_errors(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """An empty gateway.conf.env.CONFIG_ERRORS for the test; the real list comes back after."""
    errors: list[tuple[str, str]] = []
    monkeypatch.setattr(env, "CONFIG_ERRORS", errors)
    return errors
