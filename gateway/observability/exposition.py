"""``GET /metrics``: the Prometheus text format, for one process or several, protected.

Access: with ``GATEWAY_METRICS_TOKEN`` set, a request must carry ``Authorization: Bearer
<token>`` (compared in constant time); without it, only loopback clients (127.0.0.0/8, ::1)
are answered. Anything else gets ``403`` (no token configured) or ``401``, in the OpenAI
error envelope like every other refusal of the data plane.

Several processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set, the answer adds up every
process's values from that directory (prometheus-client's ``MultiProcessCollector``), so any
worker answers for all of them; otherwise it is this process's registry.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.contract.errors import GatewayError


def multiprocess_dir() -> str:
    """The shared metrics directory of this process's workers ("": one process)."""
    return str(settings.PROMETHEUS_MULTIPROC_DIR)


def allowed(client_host: str | None, authorization: bytes | None, token: str) -> None:
    """Raise a GatewayError unless the caller may read the metrics (see the module doc)."""
    if token:
        expected = b"Bearer " + token.encode()
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise GatewayError(
                401, "Send the metrics token as 'Authorization: Bearer <token>'.", code="invalid_api_key"
            )
        return
    try:
        loopback = client_host is not None and ipaddress.ip_address(client_host).is_loopback
    except ValueError:  # a unix socket's "client", or nothing parseable
        loopback = False
    if not loopback:
        raise GatewayError(
            403, "Metrics are served to loopback clients only; set GATEWAY_METRICS_TOKEN.", code="forbidden"
        )


def render() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    directory = multiprocess_dir()
    if directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
