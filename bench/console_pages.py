"""Console page timings on a large usage table (docs/console.md, "Measurements").

    DATABASE_URL=postgres://.../con python manage.py usage_seed --records 3000000
    DATABASE_URL=postgres://.../con python manage.py billing_rollup
    DATABASE_URL=postgres://.../con python -m bench.console_pages [--repeat 5] [--explain]

Renders, as an operator through Django's test client (session, template and all), the request
log with every combination of its filters (tenant, key, model, account, status; each with and
without a date range; values taken from a real record so that every combination matches
something) plus filters that match nothing, its second page, one request, the overview over
each range and the usage page. Prints the median and the slowest of ``--repeat`` runs after a
warm-up, per page; ``--explain`` also prints the PostgreSQL plan of each request-log query and
flags any sequential scan of the usage table.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
from typing import Any
from urllib.parse import urlencode

from bench.billing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--explain", action="store_true", help="Print the plan of each request-log query.")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from tenancy.models import UsageRecord

    count = UsageRecord.objects.count()
    user, _ = User.objects.get_or_create(username="bench-console", defaults={"is_staff": True})
    client = Client(SERVER_NAME="localhost")
    client.force_login(user)
    error = UsageRecord.objects.filter(status_code__gte=400, api_key__isnull=False, account__isnull=False)
    sample: Any = error.select_related("tenant").order_by("-created_at").first()
    if sample is None:
        raise SystemExit("No usage record with an error: seed first (python manage.py usage_seed).")
    values = {
        "tenant": sample.tenant.slug,
        "key": str(sample.api_key_id),
        "model": sample.model,
        "account": str(sample.account_id),
        "status": str(sample.status_code),
    }
    dates = {"from": (sample.created_at.date().isoformat()), "to": "2999-01-01"}
    pages: list[tuple[str, str]] = []
    for size in range(len(values) + 1):
        for names in itertools.combinations(values, size):
            chosen = {name: values[name] for name in names}
            pages.append(("log " + ("+".join(names) or "(no filter)"), "/console/requests/?" + urlencode(chosen)))
            pages.append(("log " + "+".join([*names, "dates"]), "/console/requests/?" + urlencode({**chosen, **dates})))
    pages += [
        ("log model (no match)", "/console/requests/?model=no-such-model"),
        ("log tenant+model (no match)", "/console/requests/?" + urlencode({"tenant": values["tenant"], "model": "x"})),
        ("log status 404 (no match)", "/console/requests/?status=404"),
        ("log request id", "/console/requests/?request_id=" + sample.request_id),
        ("one request", f"/console/requests/{sample.request_id}/"),
    ]
    first = client.get("/console/requests/").content.decode()
    older = re.search(r'href="(\?[^"]*before=[^"]+)" rel="next"', first)
    if older:
        pages.append(("log page 2", "/console/requests/" + older.group(1).replace("&amp;", "&")))
    for key in ("1h", "24h", "7d", "30d"):
        pages.append((f"overview {key}", f"/console/?range={key}"))
        pages.append((f"overview {key} one tenant", f"/console/?range={key}&tenant={values['tenant']}"))
    pages += [("usage 30d", "/console/usage/?range=30d"), ("usage 7d by key", "/console/usage/?range=7d&group_by=key")]
    print(f"{count:,} usage records; {connection.vendor}; median and slowest of {args.repeat} runs (ms)")
    for label, url in pages:
        assert client.get(url).status_code == 200, url
        median, slowest = timed(args.repeat, functools.partial(client.get, url))
        print(f"{label:<44} {median:9.1f} {slowest:9.1f}")
        if args.explain and label.startswith("log") and connection.vendor == "postgresql":
            with CaptureQueriesContext(connection) as queries:
                client.get(url)
            for query in queries.captured_queries:
                if "usagerecord" not in query["sql"].lower():
                    continue
                with connection.cursor() as cursor:
                    cursor.execute("EXPLAIN " + query["sql"])
                    plan = "\n".join(row[0] for row in cursor.fetchall())
                scan = " SEQ SCAN!" if "Seq Scan on tenancy_usagerecord" in plan else ""
                print(f"  plan{scan}:\n    " + plan.replace("\n", "\n    "))


if __name__ == "__main__":
    main()
