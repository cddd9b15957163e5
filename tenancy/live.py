"""Names shared by the console's live view (tenancy/console/live.py, the watcher) and the data
plane's publisher (gateway/dataplane/live.py): channel-layer groups and the Redis key that says
someone is watching."""

from __future__ import annotations

# Operators watch every request; a tenant's members watch their tenant's group.
GROUP_ALL = "live.all"
# Set (with a short expiry) by every open live view while Redis is configured, so that a
# replica without a watcher of its own still publishes for one connected to another replica.
WATCH_KEY = "gw:live:watching"
WATCH_KEY_SECONDS = 15
WATCH_REFRESH_SECONDS = 5.0


def tenant_group(tenant_id: int) -> str:
    return f"live.tenant.{tenant_id}"


class LocalWatchers:
    """Live views open in this process (the embedded default serves them in-process)."""

    count = 0
