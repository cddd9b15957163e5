"""PostgreSQL: the usage table becomes partitioned by month of ``created_at`` (docs/billing.md).

SQLite is left as it is. PostgreSQL requires every unique index of a partitioned table to
include the partition key, so the primary key becomes ``(id, created_at)`` and the unique
``request_id`` becomes unique ``(request_id, created_at)``: a replayed usage event (same
request id, same ``created_at``: events are journaled with it) is still ignored by the
writer's ``ON CONFLICT DO NOTHING``. No table references usage records, so nothing else
changes. Existing rows are copied into monthly partitions (a long step for a large table:
plan it). Django's model state is unchanged (id stays the model's primary key). Not
reversible on PostgreSQL.
"""

from django.db import migrations

TABLE = "tenancy_usagerecord"
OLD = "tenancy_usagerecord_unpartitioned"


def partition(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    from tenancy.services.partitions import month_partitions_sql

    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = 0")
        cursor.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = %s::regclass", [TABLE])
        if cursor.fetchone():
            return
        cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {OLD}")
        cursor.execute(
            f"CREATE TABLE {TABLE} (LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE) "
            "PARTITION BY RANGE (created_at)"
        )
        cursor.execute(f"CREATE SEQUENCE {TABLE}_pid_seq OWNED BY {TABLE}.id")
        cursor.execute(f"ALTER TABLE {TABLE} ALTER COLUMN id SET DEFAULT nextval('{TABLE}_pid_seq')")
        cursor.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey_part PRIMARY KEY (id, created_at)")
        cursor.execute(
            f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_request_id_created_uniq UNIQUE (request_id, created_at)"
        )
        cursor.execute(f"SELECT min(created_at), max(created_at), max(id) FROM {OLD}")
        first, last, top = cursor.fetchone()
        for statement in month_partitions_sql(first, last):
            cursor.execute(statement)
        cursor.execute(f"CREATE TABLE {TABLE}_default PARTITION OF {TABLE} DEFAULT")
        cursor.execute(f"INSERT INTO {TABLE} SELECT * FROM {OLD}")
        cursor.execute(f"SELECT setval('{TABLE}_pid_seq', %s)", [max(top or 0, 1)])
        # The old table's indexes and foreign keys, re-created under the same names.
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass)",
            [OLD, OLD],
        )
        indexes = cursor.fetchall()
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = %s::regclass AND contype = 'f'",
            [OLD],
        )
        foreign_keys = cursor.fetchall()
        cursor.execute(f"DROP TABLE {OLD}")
        cursor.execute(f"ALTER SEQUENCE {TABLE}_pid_seq RENAME TO {TABLE}_id_seq")
        for _, definition in indexes:
            cursor.execute(
                definition.replace(f" ON public.{OLD} ", f" ON public.{TABLE} ").replace(f" ON {OLD} ", f" ON {TABLE} ")
            )
        for name, definition in foreign_keys:
            cursor.execute(f'ALTER TABLE {TABLE} ADD CONSTRAINT "{name}" {definition}')


class Migration(migrations.Migration):
    atomic = True
    dependencies = [("tenancy", "0007_billing")]
    operations = [migrations.RunPython(partition, migrations.RunPython.noop, elidable=False)]
