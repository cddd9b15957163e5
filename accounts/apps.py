from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gateway.notify import connect_signals

        # Pool and account edits (services, commands, admin) reach every replica.
        # Idempotent: tenancy's ready() calls it too.
        connect_signals()
