"""The data plane and the project wiring.

Nothing is imported here: ``python -m gateway.devtools.fake_upstream`` must start without
Django or Celery. The Celery app is loaded by ``GatewayConfig.ready()``.
"""
