"""Celery tasks of the supply side. They take ids (or nothing) and call accounts.health.probing.

Schedule ``accounts.probe`` periodically (every 30 s is a good default) in
``gateway/conf/celery.py``'s beat schedule. Overlapping runs are harmless: Redis-mode
trials are locked per account, and a re-admission is idempotent.
"""

from __future__ import annotations

from collections import Counter

from celery import shared_task

from accounts.health import probing


@shared_task(name="accounts.probe", ignore_result=True)
def accounts_probe() -> dict[str, int]:
    """Probe every account disabled by an upstream error or with an open circuit due a trial.

    Re-admits those that answer (see accounts/health/probing.py). Returns verdict counts.
    """
    return dict(Counter(outcome.verdict for outcome in probing.accounts_probe_run()))


@shared_task(name="accounts.probe_account", ignore_result=True)
def account_probe(account_id: int) -> str:
    """Probe one account now, if it is a probe candidate; returns the verdict or ``not_a_candidate``."""
    outcomes = probing.accounts_probe_run([account_id])
    return outcomes[0].verdict if outcomes else "not_a_candidate"
