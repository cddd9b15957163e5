"""Billing with a real Celery worker: ``manage.py serve --celery`` (what ``make run`` runs) rolls
up the usage its gateway meters on the beat schedule, with no command run by hand."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests import harness as live
from tests.conftest import MODEL, Live
from tests.harness import poll


def test_the_celery_beat_rolls_up_metered_usage(live_gw: Live, start_gateway: Callable[..., live.LiveProcess]) -> None:
    from tenancy.models import BillingState, UsageRollup, UsageRollupDay
    from tenancy.services.rollups import ROLLUP_STATE

    gateway = start_gateway(args=("--celery",), GATEWAY_BILLING_ROLLUP_SECONDS="5")
    api_key, key = live_gw.new_key()
    ids = []
    for _ in range(3):
        answer = httpx.post(
            gateway.url + "/v1/responses",
            json={"model": MODEL, "input": "bill me", "max_output_tokens": 16},
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.headers["x-request-id"])
    records = [live_gw.wait_usage(request_id) for request_id in ids]

    def rolled_up() -> int:
        rows = UsageRollup.objects.filter(api_key_id=api_key.pk)
        return sum(rows.values_list("requests", flat=True)) if rows.exists() else 0

    poll(lambda: rolled_up() == 3, timeout=60, what="the beat task rolling up the three requests")
    rows = UsageRollup.objects.filter(api_key_id=api_key.pk)
    assert sum(rows.values_list("input_uncached_tokens", flat=True)) + sum(
        rows.values_list("input_cached_tokens", flat=True)
    ) == sum(r.input_tokens for r in records)
    assert sum(UsageRollupDay.objects.filter(api_key_id=api_key.pk).values_list("requests", flat=True)) == 3
    state = BillingState.objects.get(name=ROLLUP_STATE)
    assert state.as_of is not None
    assert state.last_record_id >= max(r.pk for r in records)
