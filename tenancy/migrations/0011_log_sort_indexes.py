"""The console's sortable logs (docs/console.md, "Sorting"): every order the request log and the
audit log offer reads an index in (column, id) order, so a keyset page never sorts the table.

Request log: (latency_ms, id), (cost, id), (status_code, id) for operators
across tenants, and the same after tenant for one tenant. Audit log: (actor_label, id) and
(action, id), alone and after tenant_id. On PostgreSQL each usage index is built on every
partition of the usage table (0008), holding a lock that blocks its writes meanwhile (measured
in docs/console.md).
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_pools_routes_health"),
        ("tenancy", "0010_console_indexes"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="auditentry",
            index=models.Index(fields=["actor_label", "id"], name="audit_actor_id"),
        ),
        migrations.AddIndex(
            model_name="auditentry",
            index=models.Index(fields=["tenant_id", "actor_label", "id"], name="audit_tenant_actor_id"),
        ),
        migrations.AddIndex(
            model_name="auditentry",
            index=models.Index(fields=["action", "id"], name="audit_action_id"),
        ),
        migrations.AddIndex(
            model_name="auditentry",
            index=models.Index(fields=["tenant_id", "action", "id"], name="audit_tenant_action_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["latency_ms", "id"], name="usage_latency_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["tenant", "latency_ms", "id"], name="usage_tenant_latency_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["cost", "id"], name="usage_cost_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["tenant", "cost", "id"], name="usage_tenant_cost_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["status_code", "id"], name="usage_status_id"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=models.Index(fields=["tenant", "status_code", "id"], name="usage_tenant_status_id"),
        ),
    ]
