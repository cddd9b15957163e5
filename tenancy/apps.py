from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "tenancy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gateway.notify import connect_signals

        # Key and tenant edits (services, commands, admin) reach every replica.
        connect_signals()
