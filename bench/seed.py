"""Seed a throw-away gateway database for the benchmark (run by bench/run.py, not by hand).

``python -m bench.seed --route MODEL=URL [--route ...] --keys N --tenants T --keys-file PATH`` with
``GATEWAY_DATA_DIR`` and the secrets of the run in the environment, after ``manage.py migrate``.

Creates the ``bench`` tenant with one key (printed), one upstream account per route (a model served
by the fake upstream at a base URL), and the key mix: ``N`` keys spread over ``T`` tenants, their secrets written to
``PATH`` one per line. Every key and tenant gets generous limits where the models have limit fields,
so the limit checks run on every request without ever refusing one. Prints one JSON line.

The key mix is written with ``bulk_create`` in one transaction (the services save rows one by one,
which for 10,000 keys is most of the set-up time); bulk writes fire no ``post_save`` signal, so the
change is announced once with ``gateway.config.notify.config_changed()``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# The operator whose console live view watches the `watched` column (bench/live_watch.py).
OPERATOR = "bench-operator"

# Generous values for the limit fields that exist in this build: checked on every request, never
# reached by a benchmark run. Spend budgets are left unset: they depend on the price table.
GENEROUS_LIMITS: dict[str, int] = {
    "rpm": 100_000_000,
    "tpm": 10**15,
    "concurrency": 100_000,
    "budget_tokens": 10**17,
}


def fast_keys() -> Iterator[tuple[str, str]]:
    """A generator of ``(secret, prefix)`` shaped like ``tenancy.keys.generate_api_key()``, ~20x faster.

    ``generate_api_key`` draws each character from ``secrets`` (right for real keys); 10,000 bench keys
    in a throw-away database only need to be unique and well-formed, so one seeded PRNG call per key does.
    """
    from tenancy.keys import KEY_MARKER, PREFIX_LENGTH, PREFIX_RANDOM_LENGTH, SECRET_LENGTH, key_prefix

    rng = random.Random(os.urandom(32))
    alphabet = string.ascii_letters + string.digits
    while True:
        secret = KEY_MARKER + "".join(rng.choices(alphabet, k=PREFIX_RANDOM_LENGTH + SECRET_LENGTH))
        assert key_prefix(secret) == secret[:PREFIX_LENGTH]
        yield secret, secret[:PREFIX_LENGTH]


def limit_values(model: Any) -> dict[str, int]:
    """The subset of :data:`GENEROUS_LIMITS` that ``model`` has as concrete fields."""
    names = {field.name for field in model._meta.get_fields() if getattr(field, "concrete", False)}
    return {name: value for name, value in GENEROUS_LIMITS.items() if name in names}


def seed(routes: dict[str, str], keys: int, tenants: int, keys_file: Path) -> dict[str, Any]:
    from django.conf import settings
    from django.db import transaction

    from accounts.services import pool_get_or_create, upstream_account_create
    from gateway.config import notify
    from tenancy.keys import key_digest
    from tenancy.models import ApiKey, Tenant
    from tenancy.services.keys import apikey_create
    from tenancy.services.members import user_get_or_create
    from tenancy.services.tenants import tenant_create

    # An operator for the ``watched`` column's console live view (bench/live_watch.py).
    operator_password = "".join(random.SystemRandom().choices(string.ascii_letters + string.digits, k=24))
    operator, _ = user_get_or_create(username=OPERATOR, password=operator_password)
    type(operator).objects.filter(pk=operator.pk).update(is_staff=True)
    tenant_limits = limit_values(Tenant)
    key_limits = limit_values(ApiKey)
    tenant = tenant_create(slug="bench", name="Benchmark")
    Tenant.objects.filter(pk=tenant.pk).update(**tenant_limits)
    api_key, main_secret = apikey_create(tenant=tenant, name="bench main")
    ApiKey.objects.filter(pk=api_key.pk).update(**key_limits)
    pool = pool_get_or_create(name="bench")
    for model_name, base_url in routes.items():
        upstream_account_create(pool=pool, base_url=base_url, api_key="sk-fake-upstream", models=[model_name])

    secrets: list[str] = []
    with transaction.atomic():
        mix_tenants = Tenant.objects.bulk_create(
            [Tenant(slug=f"mix-{i:05d}", name=f"Mix {i}", **tenant_limits) for i in range(tenants)]
        )
        rows: list[ApiKey] = []
        prefixes: set[str] = set()
        generate = fast_keys()
        while len(rows) < keys:
            secret, prefix = next(generate)
            if prefix in prefixes:  # a prefix collision would break the bulk insert: draw again
                continue
            prefixes.add(prefix)
            rows.append(
                ApiKey(
                    tenant=mix_tenants[len(rows) % len(mix_tenants)],
                    name=f"mix {len(rows)}",
                    prefix=prefix,
                    digest=key_digest(secret),
                    allowed_models=[],
                    **key_limits,
                )
            )
            secrets.append(secret)
        ApiKey.objects.bulk_create(rows, batch_size=1000)
    notify.config_changed()
    keys_file.write_text("\n".join(secrets) + "\n", encoding="ascii")
    # The settings the gateway processes will run with (same environment), for the report.
    effective = {
        name: getattr(settings, name, None)
        for name in ("GATEWAY_SERVER", "GATEWAY_UPSTREAM_TRANSPORT", "GATEWAY_USAGE_FLUSH_SECONDS")
    }
    return {
        "main_key": main_secret,
        "operator": OPERATOR,
        "operator_password": operator_password,
        "keys": len(secrets),
        "tenants": tenants,
        "limits": sorted(key_limits),
        "settings": effective,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--route", action="append", required=True, help="MODEL=BASE_URL, e.g. gpt-4.1=http://127.0.0.1:P/v1"
    )
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--keys-file", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.conf.settings")
    import django

    django.setup()
    routes = dict(route.split("=", 1) for route in args.route)
    result = seed(routes, args.keys, max(1, args.tenants), args.keys_file)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
