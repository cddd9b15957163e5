"""Settings read on every request, as plain attributes: ``from gateway.conf.hot import hot``.

``hot.NAME`` is ``settings.NAME``: read from ``django.conf.settings`` on first use, then kept
as an instance attribute. Django's ``settings`` answers every read through
``LazyObject.__getattribute__`` (a Python call plus a ``getattr``, ~0.4 µs); the data plane
reads about ten a request. A changed setting (Django's ``setting_changed`` signal, sent by
``override_settings`` and pytest-django's ``settings`` fixture) is forgotten here and read
again on next use, so tests that change settings see their values. Only the data plane's
per-request reads go through here; everything else reads ``settings`` as usual, and the
values and their defaults live in gateway/conf/settings.py alone.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.signals import setting_changed


class HotSettings:
    """Attribute access to settings, cached per name (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:  # only for names not cached yet
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(settings, name)
        self.__dict__[name] = value
        return value

    def forget(self, name: str) -> None:
        self.__dict__.pop(name, None)


hot = HotSettings()


def _changed(*, setting: str, **kwargs: Any) -> None:
    hot.forget(setting)


setting_changed.connect(_changed, dispatch_uid="gateway.conf.hot")
