"""Billing report timings (docs/billing.md, "Measurements") on the database of ``DATABASE_URL``.

    DATABASE_URL=postgres://.../bill_seed python -m bench.billing --month 2026-11 [--repeat 20]

Times the heaviest report, a month grouped by key and model, for all tenants and for one
tenant: through the selector (``tenancy.reports.usage_report``) and through the API
(``GET /api/v1/reports/usage`` as an operator, Django's test client: authentication, JSON
rendering included). Also the same month with ``percentiles=true`` and a day by hour. Prints
the median and the slowest of ``--repeat`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime


def timed(repeat: int, run: Callable[[], object]) -> tuple[float, float]:
    """Median and slowest of ``repeat`` calls of ``run`` after one warm-up call, in ms."""
    run()  # warm-up
    took = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        took.append((time.perf_counter() - began) * 1000)
    return statistics.median(took), max(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
    import django

    django.setup()
    from django.contrib.auth.models import User
    from rest_framework.test import APIClient

    from tenancy.models import Tenant, UsageRecord, UsageRollup, UsageRollupDay
    from tenancy.reports import ReportQuery, usage_report

    year, month = (int(part) for part in args.month.split("-"))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    tenant = Tenant.objects.filter(slug="seed-00").first() or Tenant.objects.first()
    assert tenant is not None, "seed the database first (manage.py usage_seed)"
    print(
        f"records {UsageRecord.objects.count():,}, 15-minute rows {UsageRollup.objects.count():,}, "
        f"day rows {UsageRollupDay.objects.count():,}"
    )
    user, _ = User.objects.get_or_create(username="bench-operator", defaults={"is_staff": True})
    client = APIClient(SERVER_NAME="localhost")
    client.force_authenticate(user)

    def get(url: str) -> object:
        answer = client.get(url)
        assert answer.status_code == 200, (url, answer.status_code, answer.content[:300])
        return answer

    base = f"/api/v1/reports/usage?from={start.isoformat()}&to={end.isoformat()}".replace("+", "%2B")
    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "selector: month by key and model, all tenants",
            lambda: usage_report(ReportQuery(None, start, end, "UTC", "month", ("key", "model")), as_of=None),
        ),
        (
            "selector: month by key and model, one tenant",
            lambda: usage_report(ReportQuery([tenant.pk], start, end, "UTC", "month", ("key", "model")), as_of=None),
        ),
        (
            "API: month by key and model, all tenants",
            lambda: get(base + "&granularity=month&group_by=key,model"),
        ),
        (
            "API: month by key and model, one tenant",
            lambda: get(base + f"&granularity=month&group_by=key,model&tenant={tenant.slug}"),
        ),
        (
            "API: month by key and model, all tenants, percentiles",
            lambda: get(base + "&granularity=month&group_by=key,model&percentiles=true"),
        ),
        ("API: month by day and model, all tenants", lambda: get(base + "&granularity=day&group_by=model")),
    ]
    for name, run in cases:
        median, slowest = timed(args.repeat, run)
        print(f"{name}: median {median:.1f} ms, max {slowest:.1f} ms")


if __name__ == "__main__":
    main()
