"""The console's sortable audit log (docs/console.md, "Sorting"): who and action read an index in
(column, id) order, alone and after tenant_id, so a keyset page never sorts the table. The
request log's orders other than time have no index (a pair per order made inserting usage
records 2.5 times as slow on PostgreSQL): a page sorts a bounded date range instead.
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
    ]
