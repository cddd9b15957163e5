"""The request log's indexes (docs/console.md, "Measurements"): every filter of the log reads an
index in (created_at, id) order, so a newest-first keyset page never scans the usage table.

(tenant, created_at) becomes (tenant, created_at, id); new: (model, created_at), (account,
created_at) and (status_code, created_at) for errors only (status >= 400, a partial index).
On PostgreSQL the usage table is partitioned (0008): each index is created on every partition.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_pools_routes_health"),
        ("tenancy", "0009_stateful"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="usagerecord",
            name="tenancy_usa_tenant__7296f2_idx",
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["tenant", "created_at", "id"], name="usage_tenant_time_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["model", "created_at"], name="usage_model_time"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["account", "created_at"], name="usage_account_time"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(
                condition=models.Q(("status_code__gte", 400)),
                fields=["status_code", "created_at"],
                name="usage_error_time",
            ),
        ),
    ]
