from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "tenancy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the Celery tasks in every process: services queue them by name, and
        # with CELERY_TASK_ALWAYS_EAGER an unregistered name would go to the broker instead.
        # Every change a service announces (either side) is stored in the audit log.
        from accounts.infra.audit import changed
        from tenancy import tasks  # noqa: F401
        from tenancy.audit import audit_entry_store

        changed.connect(audit_entry_store, dispatch_uid="tenancy.audit")
