from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gateway.conf import checks  # noqa: F401  (registers the system checks)
        from gateway.conf.celery import app  # noqa: F401  (makes it the default app for shared_task)
        from gateway.config.notify import connect_signals

        # Saves and deletes of configuration rows (tenancy and accounts: services, commands,
        # the admin) announce a change to every replica. The gateway listens; the lower rooms
        # know nothing of it.
        connect_signals()
