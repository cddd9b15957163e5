"""Writes of the configuration change feed (tenancy.models.ConfigChange).

The gateway's signal handlers (gateway.config.notify) record one row per configuration
write, inside the writer's transaction, so a change is in the feed exactly when it is
committed. Old rows are pruned here, now and then, so the table stays small.
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from tenancy.models import ConfigChange

# Rows older than this are deleted (every PRUNE_EVERY-th change): every replica reads the
# feed at least every GATEWAY_SNAPSHOT_MAX_AGE, far more often than this.
RETENTION = timedelta(days=1)
PRUNE_EVERY = 1000


def config_change_record(*, kind: str, prefix: str = "", tenant_id: int | None = None) -> ConfigChange:
    """Append a change of ``kind`` (ConfigChange.KEY/TENANT/CONFIG) to the feed."""
    change = ConfigChange.objects.create(kind=kind, prefix=prefix, tenant_id=tenant_id)
    if change.pk % PRUNE_EVERY == 0:
        ConfigChange.objects.filter(created_at__lt=timezone.now() - RETENTION).delete()
    return change
