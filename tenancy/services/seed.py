"""Synthetic usage records for measurements (``manage.py usage_seed``): never for real tenants.

Rows go in with PostgreSQL's ``COPY ... FROM STDIN`` (psycopg 3's ``cursor.copy``), about
10x faster than INSERTs; on SQLite with ``executemany``. Tenants ``seed-NN``, their keys,
upstream accounts and model prices are created on first use (through the services).
Records are spread uniformly over ``[start, start + span)`` and over keys, models and
accounts; one in 20 carries a failed attempt on another account, one in 50 has no usage.
Costs are computed like the data plane's (``tenancy.pricing``) at the seeded prices.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction

from accounts.models import UpstreamAccount
from accounts.services import pool_get_or_create, upstream_account_create
from tenancy import pricing
from tenancy.models import ApiKey, PriceVersion, Tenant, UsageRecord
from tenancy.services.keys import apikey_create
from tenancy.services.prices import price_set
from tenancy.services.tenants import tenant_create

COLUMNS = (
    "request_id",
    "tenant_id",
    "api_key_id",
    "account_id",
    "model",
    "status_code",
    "outcome",
    "stream",
    "response_id",
    "latency_ms",
    "ttfb_ms",
    "created_at",
    "input_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost",
    "price_version_id",
    "attempts",
)


_COPY_CHUNK = 1_000_000


@dataclass(frozen=True)
class SeedShape:
    tenants: int = 20
    keys_per_tenant: int = 10
    models: int = 4
    accounts: int = 3


def _setup(shape: SeedShape, start: datetime) -> tuple[list[tuple[int, int]], list[str], list[int], dict[str, Any]]:
    keys: list[tuple[int, int]] = []
    for t in range(shape.tenants):
        slug = f"seed-{t:02d}"
        tenant = Tenant.objects.filter(slug=slug).first() or tenant_create(slug=slug)
        have = list(ApiKey.objects.filter(tenant=tenant).values_list("id", flat=True))
        while len(have) < shape.keys_per_tenant:
            have.append(apikey_create(tenant=tenant, name=f"seed {len(have)}")[0].pk)
        keys += [(tenant.pk, key_id) for key_id in have[: shape.keys_per_tenant]]
    models = [f"seed-model-{m}" for m in range(shape.models)]
    prices: dict[str, Any] = {}
    for m, model in enumerate(models):
        price = PriceVersion.objects.filter(model=model).order_by("effective_from").first()
        if price is None:
            price = price_set(
                model=model,
                input=f"{1 + m}",
                cached_input="0.25",
                cache_write="1.25",
                output=f"{4 * (1 + m)}",
                effective_from=start - timedelta(days=365),
            )
        prices[model] = (price.pk, pricing.rates_micro(price))
    pool = pool_get_or_create(name="seed")
    accounts = list(UpstreamAccount.objects.filter(pool=pool).values_list("id", flat=True))
    while len(accounts) < shape.accounts:
        accounts.append(
            upstream_account_create(
                pool=pool, base_url=f"http://127.0.0.1:9/seed{len(accounts)}/v1", models=models, api_key="sk-seed"
            ).pk
        )
    return keys, models, accounts[: shape.accounts], prices


def _nano(pusd: int) -> str:
    nano = (pusd + 500) // 1000
    return f"{nano // 10**9}.{nano % 10**9:09d}"


def _rows(
    count: int, start: datetime, span: timedelta, setup: tuple[Any, ...], rng: random.Random
) -> Iterator[tuple[Any, ...]]:
    keys, models, accounts, prices = setup
    run = uuid.uuid4().hex[:10]
    seconds = span.total_seconds()
    for n in range(count):
        tenant_id, key_id = keys[rng.randrange(len(keys))]
        model = models[rng.randrange(len(models))]
        account = accounts[rng.randrange(len(accounts))]
        price_id, rates = prices[model]
        at = start + timedelta(seconds=rng.random() * seconds)
        roll = rng.random()
        attempts = "[]"
        cost_pusd = 0
        if roll < 0.02:
            inp = cached = out = reasoning = None
            status, outcome, cost = 502, "upstream_error", None
        else:
            inp = rng.randrange(50, 4000)
            cached = rng.randrange(0, inp)
            out = rng.randrange(1, 1500)
            reasoning = rng.randrange(0, out)
            status, outcome = 200, "completed"
            cost_pusd = pricing.cost_pusd((inp - cached, cached, 0, out - reasoning, reasoning), rates)
            if roll < 0.07:
                other = accounts[(accounts.index(account) + 1) % len(accounts)]
                attempts = json.dumps(
                    [
                        {
                            "account_id": other,
                            "outcome": "upstream_error",
                            "status": 500,
                            "input_tokens": inp,
                            "output_tokens": 0,
                            "total_tokens": inp,
                        }
                    ]
                )
                cost_pusd += pricing.cost_pusd((inp, 0, 0, 0, 0), rates)
            cost = _nano(cost_pusd)
        latency = rng.lognormvariate(6.5, 0.8)
        yield (
            f"seed-{run}-{n}",
            tenant_id,
            key_id,
            account,
            model,
            status,
            outcome,
            False,
            "",
            latency,
            latency * 0.3,
            at,
            inp,
            cached,
            0 if inp is not None else None,
            out,
            reasoning,
            (inp + out) if inp is not None and out is not None else None,
            cost,
            price_id,
            attempts,
        )


def usage_seed(*, records: int, start: datetime, span: timedelta, shape: SeedShape, seed: int = 1) -> int:
    """Insert ``records`` synthetic usage records; return how many."""
    rng = random.Random(seed)
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    names = ", ".join(connection.ops.quote_name(c) for c in COLUMNS)
    # Before the COPY starts: the connection serves nothing else while it runs.
    rows = _rows(records, start, span, _setup(shape, start), rng)
    if connection.vendor == "postgresql":
        # One COPY per million rows, each in its own transaction without a statement timeout.
        while True:
            chunk = list(itertools.islice(rows, _COPY_CHUNK))
            if not chunk:
                return records
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL statement_timeout = 0")
                with cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    for row in chunk:
                        copy.write_row(row)
    marks = ", ".join(["%s"] * len(COLUMNS))
    batch: list[tuple[Any, ...]] = []
    with transaction.atomic(), connection.cursor() as cursor:
        for row in rows:
            batch.append(row)
            if len(batch) >= 5000:
                cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", batch)
                batch.clear()
        if batch:
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", batch)
    return records
