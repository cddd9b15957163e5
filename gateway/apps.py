from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gateway import checks  # noqa: F401  (registers the system checks)
        from gateway.celery import app  # noqa: F401  (makes it the default app for shared_task)
