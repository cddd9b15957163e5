"""Configuration change notification between replicas (and operator commands).

Every gateway replica keeps an in-memory snapshot of keys, tenants and accounts
(gateway.config.snapshot). Instead of querying the database per request, it asks for a cheap
*change token* and reloads the snapshot when the token moves:

- embedded mode (``REDIS_URL`` empty): the token is ``(st_mtime_ns, st_ino)`` of
  ``DATA_DIR/config.gen`` (one ``os.stat``), and a change atomically replaces that
  file, so the inode changes even when two changes share an mtime tick;
- Redis mode: the token is the value of ``gw:config:gen``, and a change does
  ``INCR gw:config:gen`` then ``PUBLISH gw:config <value>`` (for listeners that
  prefer push over polling).

``connect_signals()`` (called from the tenancy and accounts apps' ``ready()``) makes
every save/delete of a Tenant, ApiKey, PriceVersion, Pool, UpstreamAccount, ModelRoute or
ModelRouteTarget announce a change
once its transaction commits, whether it came from a service, a command or the
admin, and appends a row to the change feed (tenancy.models.ConfigChange) in the same
transaction, so replicas can drop just the keys that changed. Queryset ``.update()`` fires
no signal; usage_records_write relies on that for ``ApiKey.last_used_at``, which must not
cause reloads. AccountTransition rows (health
history) are not configuration and announce nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save

from accounts.infra.redis import sync_client

if TYPE_CHECKING:
    import redis as redis_sync
    import redis.asyncio as redis_async

logger = logging.getLogger(__name__)

CONFIG_GEN_KEY = "gw:config:gen"
CONFIG_CHANNEL = "gw:config"
CONFIG_GEN_FILENAME = "config.gen"


# (REDIS_URL, client): created on first use, rebuilt if the URL changes (tests).
def config_gen_path() -> Path:
    return Path(settings.DATA_DIR) / CONFIG_GEN_FILENAME


def file_token(path: str | None = None) -> object:
    """The embedded-mode token; pass ``path`` (str of the config.gen path) on hot paths."""
    try:
        st = os.stat(path or config_gen_path())
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ino)


def _redis() -> redis_sync.Redis:
    return sync_client(settings.REDIS_URL)


def config_token() -> object:
    """A value that changes whenever the configuration changed (compare with ``==``).

    Embedded: ``(st_mtime_ns, st_ino)`` of DATA_DIR/config.gen, or None while the file
    does not exist. Redis: the raw value of ``gw:config:gen`` (bytes, or None before
    the first change). Redis errors propagate.
    """
    if settings.REDIS_URL:
        return _redis().get(CONFIG_GEN_KEY)
    return file_token()


async def config_token_async(redis: redis_async.Redis | None) -> object:
    """Async :func:`config_token` for the hot path, using the caller's async client.

    With ``redis`` None (embedded mode) this is the file token: an ``os.stat`` is
    cheaper than a hop to a worker thread. The value type follows the client's
    ``decode_responses``; compare tokens from one source only.
    """
    if redis is None:
        return file_token()
    return await redis.get(CONFIG_GEN_KEY)


def config_changed() -> None:
    """Announce a configuration change to every replica (see the module docstring)."""
    if settings.REDIS_URL:
        client = _redis()
        value = client.incr(CONFIG_GEN_KEY)
        client.publish(CONFIG_CHANNEL, str(value))
        return
    path = config_gen_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh temp file renamed over the old one: readers never see a partial file,
    # and the new inode differs from the one being replaced.
    fd, tmp = tempfile.mkstemp(prefix=".config.gen.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(f"{time.time_ns()} {os.getpid()}\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _announce_after_commit(using: str | None) -> None:
    connection = transaction.get_connection(using)
    # One announcement per transaction is enough: skip if one is already queued
    # (a cascade delete of a tenant fires a signal per key). run_on_commit holds
    # (savepoint ids, callback, robust) and is emptied on rollback, so nothing stays
    # marked as pending after a rollback.
    if connection.in_atomic_block and any(
        entry[1] is config_changed for entry in getattr(connection, "run_on_commit", ())
    ):
        return
    # robust: the write is already committed; a failed announcement (Redis down) is
    # logged rather than turned into an error for the admin user or the command.
    transaction.on_commit(config_changed, using=using, robust=True)


def _on_config_write(sender: type[Any], **kwargs: Any) -> None:
    if kwargs.get("raw"):  # loaddata: fixtures are not live configuration edits
        return
    _record_change(sender, kwargs["instance"])
    _announce_after_commit(kwargs.get("using"))


def _record_change(sender: type[Any], instance: Any) -> None:
    """Append the write to the change feed, in the writer's transaction (committed with it)."""
    from tenancy.models import ApiKey, ConfigChange, Tenant
    from tenancy.services.changes import config_change_record

    if sender is ApiKey:
        config_change_record(kind=ConfigChange.KEY, prefix=instance.prefix, tenant_id=instance.tenant_id)
    elif sender is Tenant:
        config_change_record(kind=ConfigChange.TENANT, tenant_id=instance.pk)
    else:
        config_change_record(kind=ConfigChange.CONFIG)


def connect_signals() -> None:
    """Announce saves and deletes of the config models after commit. Idempotent."""
    from accounts.models import ModelRoute, ModelRouteTarget, Pool, UpstreamAccount
    from tenancy.models import ApiKey, PriceVersion, Tenant

    for model in (Tenant, ApiKey, PriceVersion, Pool, UpstreamAccount, ModelRoute, ModelRouteTarget):
        label = model._meta.label_lower
        post_save.connect(_on_config_write, sender=model, dispatch_uid=f"gateway.config.notify.save.{label}")
        post_delete.connect(_on_config_write, sender=model, dispatch_uid=f"gateway.config.notify.delete.{label}")
