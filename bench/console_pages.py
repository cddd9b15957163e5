"""Console page timings on a large usage table (docs/console.md, "Measurements").

    DATABASE_URL=postgres://.../con python manage.py usage_seed --records 3000000
    DATABASE_URL=postgres://.../con python manage.py billing_rollup
    DATABASE_URL=postgres://.../con python -m bench.console_pages [--repeat 5] [--explain] [--only log]

Renders, as an operator through Django's test client (session, template and all), the request
log with every combination of its filters (tenant, key, model, account, status; each with and
without a date range; values taken from a real record so that every combination matches
something) plus filters that match nothing, its second page, one request, the overview over
each range and the usage page. Then the log's orders (``?sort=``: latency, cost, tokens, status
and time, each way; alone, with a tenant, on a deep page, going back a page, for a member of
two tenants; every order but time sorts a bounded date range (tenancy.selectors.USAGE_SORTS):
a key, model, account or status filter sorted by something else, over the default day and a
week, and a range over the cap, which is refused),
the audit log's orders and the API's request log (first and second page). Prints the median
and the slowest of ``--repeat`` runs after a warm-up, per page; ``--explain`` also prints the
PostgreSQL plan of each request-log query and flags any sequential scan of the usage table;
``--only log,one,audit,api`` keeps the pages whose label starts with one of those.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from bench.billing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--explain", action="store_true", help="Print the plan of each request-log query.")
    parser.add_argument("--only", default="", help="Only the pages whose label starts with one of these (a,b,...).")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from tenancy.models import Membership, Tenant, UsageRecord
    from tenancy.services.members import member_add

    count = UsageRecord.objects.count()
    user, _ = User.objects.get_or_create(username="bench-console", defaults={"is_staff": True})
    client = Client(SERVER_NAME="localhost")
    client.force_login(user)
    # a member of two tenants (one index range per tenant, merged)
    for slug in ("seed-00", "seed-01"):
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant and not Membership.objects.filter(tenant=tenant, user__username="bench-member").exists():
            member_add(tenant=tenant, username="bench-member", role="viewer")
    member = Client(SERVER_NAME="localhost")
    member.force_login(User.objects.get(username="bench-member"))
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
    pages.append(("log page 2", _following(client, "/console/requests/")))
    for key in ("1h", "24h", "7d", "30d"):
        pages.append((f"overview {key}", f"/console/?range={key}"))
        pages.append((f"overview {key} one tenant", f"/console/?range={key}&tenant={values['tenant']}"))
    pages += [("usage 30d", "/console/usage/?range=30d"), ("usage 7d by key", "/console/usage/?range=7d&group_by=key")]
    pages += _sorted_pages(client, values)
    pages += [
        ("audit by who", "/console/audit/?sort=actor"),
        ("audit by action, Z to A", "/console/audit/?sort=-action"),
        ("audit tenant, action, by time", f"/console/audit/?tenant={values['tenant']}&action=apikey.create"),
        ("api records", "/api/v1/usage/records/"),
        ("api records page 2", _following(client, "/api/v1/usage/records/")),
        ("api records one tenant", f"/api/v1/usage/records/?tenant={values['tenant']}"),
    ]
    member_pages = [
        ("log member of 2 tenants", "/console/requests/"),
        ("log member of 2 tenants -latency", "/console/requests/?sort=-latency"),
        ("log member of 2 tenants cost", "/console/requests/?sort=cost"),
        ("api records member of 2 tenants", "/api/v1/usage/records/"),
    ]
    print(f"{count:,} usage records; {connection.vendor}; median and slowest of {args.repeat} runs (ms)")
    runs = [(client, *page) for page in pages] + [(member, *page) for page in member_pages]
    for who, label, url in runs:
        if not label.startswith(tuple(args.only.split(","))):
            continue
        status = who.get(url).status_code
        # an order no index serves is refused (400) over UNINDEXED_SORT_CAP matching records
        assert status == 200 or (status == 400 and ("unindexed" in label or "refused" in label)), (url, status)
        median, slowest = timed(args.repeat, functools.partial(who.get, url))
        refused = "  (400: over the cap)" if status == 400 else ""
        print(f"{label:<52} {median:9.1f} {slowest:9.1f}{refused}")
        if args.explain and label.startswith("log") and connection.vendor == "postgresql":
            with CaptureQueriesContext(connection) as queries:
                who.get(url)
            for query in queries.captured_queries:
                if "usagerecord" not in query["sql"].lower():
                    continue
                with connection.cursor() as cursor:
                    cursor.execute("EXPLAIN " + query["sql"])
                    plan = "\n".join(row[0] for row in cursor.fetchall())
                scan = " SEQ SCAN!" if "Seq Scan on tenancy_usagerecord" in plan else ""
                print(f"  plan{scan}:\n    " + plan.replace("\n", "\n    "))


def _following(client: Any, url: str, pages: int = 1) -> str:
    """The URL ``pages`` pages after ``url`` (console: the "Next" link; API: ``next``)."""
    for _ in range(pages):
        answer = client.get(url)
        if url.startswith("/api/"):
            url = answer.json()["next"].split("localhost", 1)[-1]
            continue
        found = re.search(r'href="(\?[^"]*)" rel="next"', answer.content.decode())
        assert found, url
        url = url.split("?", 1)[0] + found.group(1).replace("&amp;", "&")
    return url


def _preceding(client: Any, url: str) -> str:
    """The "Previous" link of the console page ``url``."""
    found = re.search(r'href="(\?[^"]*)" rel="prev"', client.get(url).content.decode())
    assert found, url
    return url.split("?", 1)[0] + found.group(1).replace("&amp;", "&")


def _sorted_pages(client: Any, values: dict[str, str]) -> list[tuple[str, str]]:
    """The request log in each order (docs/console.md, "Sorting")."""
    log = "/console/requests/"
    tenant = values["tenant"]
    pages: list[tuple[str, str]] = []
    for name in ("latency", "cost", "tokens", "status", "time"):
        for sort in (f"-{name}", name):
            pages.append((f"log sort {sort}", f"{log}?sort={sort}"))
            pages.append((f"log sort {sort} tenant", f"{log}?sort={sort}&tenant={tenant}"))
    deep = _following(client, f"{log}?sort=-latency", 20)
    pages += [
        ("log sort -latency page 2", _following(client, f"{log}?sort=-latency")),
        ("log sort cost tenant page 2", _following(client, f"{log}?sort=cost&tenant={tenant}")),
        ("log sort -latency page 21", deep),
        ("log sort -latency back to page 20", _preceding(client, deep)),
    ]
    week = (datetime.now(UTC) - timedelta(days=7)).date().isoformat()
    month = (datetime.now(UTC) - timedelta(days=40)).date().isoformat()
    for name in ("key", "model", "account", "status"):
        chosen = f"{name}={values[name]}"
        pages.append((f"log {name} sort -latency (unindexed, 1 day)", f"{log}?{chosen}&sort=-latency"))
        pages.append((f"log {name} sort cost (unindexed, 7 days)", f"{log}?{chosen}&sort=cost&from={week}"))
    pages.append(
        ("log model sort -tokens 40 days (refused)", f"{log}?model={values['model']}&sort=-tokens&from={month}")
    )
    return pages


if __name__ == "__main__":
    main()
