"""``gateway.conf.hot``: per-request settings as plain attributes that follow setting changes."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import override_settings

from gateway.conf.hot import hot


def test_hot_reads_the_setting_and_follows_overrides() -> None:
    assert hot.GATEWAY_MAX_ATTEMPTS == settings.GATEWAY_MAX_ATTEMPTS
    original = settings.GATEWAY_MAX_ATTEMPTS
    with override_settings(GATEWAY_MAX_ATTEMPTS=original + 7):
        assert original + 7 == hot.GATEWAY_MAX_ATTEMPTS
    assert original == hot.GATEWAY_MAX_ATTEMPTS


def test_the_pytest_settings_fixture_is_followed(settings: pytest.FixtureRequest) -> None:
    _ = hot.GATEWAY_DEFAULT_OUTPUT_RESERVE  # cached now
    settings.GATEWAY_DEFAULT_OUTPUT_RESERVE = 1234  # type: ignore[attr-defined]
    assert hot.GATEWAY_DEFAULT_OUTPUT_RESERVE == 1234


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = hot.GATEWAY_NO_SUCH_SETTING
