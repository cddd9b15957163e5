"""The limit flags shared by apikey_create, apikey_update, tenant_create and tenant_update.

Every flag is read as a string and parsed here, so a bad value ends the command with a
one-line CommandError naming the flag (argparse's own errors print the usage too).
Flags left out are not touched. In the update commands, the value ``none`` clears a
limit (unlimited / unrestricted); in the create commands a left-out flag is unlimited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.management.refusals import exit_on_refusal
from tenancy.models import ApiKey, BudgetPeriod, Tenant
from tenancy.services.keys import apikey_update
from tenancy.services.tenants import tenant_update

CLEAR = "none"


@dataclass(frozen=True, slots=True)
class _Flag:
    flag: str
    field: str
    # int | usd | period | datetime | percent | names | cidrs
    kind: str
    key_only: bool
    metavar: str
    help: str
    tenant_only: bool = False

    @property
    def dest(self) -> str:
        return f"limit_{self.field}"


FLAGS: tuple[_Flag, ...] = (
    _Flag("--rpm", "rpm", "int", False, "N", "Requests per minute."),
    _Flag("--tpm", "tpm", "int", False, "N", "Tokens (input + output) per minute."),
    _Flag("--concurrency", "concurrency", "int", False, "N", "Requests in flight at once."),
    _Flag("--budget-usd", "budget_usd", "usd", False, "X", "Spend limit in USD per budget period, e.g. 25.50."),
    _Flag("--budget-tokens", "budget_tokens", "int", False, "N", "Token limit per budget period."),
    _Flag(
        "--budget-period",
        "budget_period",
        "period",
        False,
        "day|week|month|fixed",
        "Budget window, in UTC: day, ISO week (from Monday), calendar month (default), or fixed "
        "(needs --budget-window-start and --budget-window-end).",
    ),
    _Flag(
        "--budget-window-start",
        "budget_window_start",
        "datetime",
        False,
        "ISO",
        "Start of a fixed budget window, e.g. 2026-01-01 or 2026-01-01T09:00+02:00 (no offset: UTC).",
    ),
    _Flag("--budget-window-end", "budget_window_end", "datetime", False, "ISO", "End (excluded) of a fixed window."),
    _Flag(
        "--budget-soft-percent",
        "budget_soft_percent",
        "percent",
        False,
        "P",
        "Record (and send to the alert webhook) an alert at P%% of a budget; 100%% blocks (default 80).",
    ),
    _Flag(
        "--max-output-tokens",
        "max_output_tokens",
        "int",
        True,
        "N",
        "Cap on max_output_tokens: larger requests are clamped; also bounds budget reservations.",
    ),
    _Flag(
        "--reasoning-efforts",
        "reasoning_efforts",
        "names",
        True,
        "E,E",
        "Allowed reasoning.effort values, e.g. low,medium (others: 403); '' allows none.",
    ),
    _Flag(
        "--allowed-tools",
        "allowed_tools",
        "names",
        True,
        "T,T",
        "Allowed tool types, e.g. function,web_search (others: 403); '' allows no tools.",
    ),
    _Flag(
        "--allowed-ips",
        "allowed_ips",
        "cidrs",
        True,
        "CIDR,CIDR",
        "Client addresses or networks the key may be used from, e.g. 10.0.0.0/8,2001:db8::/32.",
    ),
    _Flag(
        "--stateful",
        "stateful",
        "onoff",
        False,
        "on|off",
        "Stored responses and conversations (previous_response_id, store, conversation, background); "
        "a key's setting overrides its tenant's ('none' on a key: follow the tenant).",
    ),
    _Flag(
        "--stored-ttl-days",
        "stored_ttl_days",
        "int",
        False,
        "N",
        "Days stored responses and conversations are kept (default GATEWAY_STORED_TTL_DAYS).",
        tenant_only=True,
    ),
)


def add_limit_arguments(parser: CommandParser, *, key_level: bool, clearable: bool) -> None:
    """Add the limit flags (key-only ones if ``key_level``); ``clearable``: ``none`` clears."""
    title = "limits (leave a flag out to keep the current value; 'none' clears it)" if clearable else "limits"
    group = parser.add_argument_group(title)
    for spec in FLAGS:
        if (spec.key_only and not key_level) or (spec.tenant_only and key_level):
            continue
        group.add_argument(spec.flag, dest=spec.dest, default=None, metavar=spec.metavar, help=spec.help)


def _parse_int(spec: _Flag, raw: str, *, low: int, high: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise CommandError(f"{spec.flag} must be a whole number {bounds}, or '{CLEAR}' (got {raw!r}).")
    return value


def _parse_datetime(spec: _Flag, raw: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise CommandError(f"{spec.flag} must be an ISO date or datetime such as 2026-01-31 (got {raw!r}).") from None
    # A date or a datetime without offset is read as UTC, the zone of every budget window.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _parse(spec: _Flag, raw: str) -> Any:
    if spec.kind == "int":
        return _parse_int(spec, raw, low=1)
    if spec.kind == "percent":
        return _parse_int(spec, raw, low=1, high=100)
    if spec.kind == "usd":
        return raw.strip()  # the service parses the decimal (floats would round money)
    if spec.kind == "period":
        period = raw.strip().lower()
        if period not in BudgetPeriod.values:
            raise CommandError(f"{spec.flag} must be one of {', '.join(BudgetPeriod.values)} (got {raw!r}).")
        return period
    if spec.kind == "datetime":
        return _parse_datetime(spec, raw)
    if spec.kind == "onoff":
        flag = raw.strip().lower()
        if flag not in ("on", "off"):
            raise CommandError(f"{spec.flag} must be on or off (got {raw!r}).")
        return flag == "on"
    # names, cidrs: comma-separated; validated by the service.
    return [item.strip() for item in raw.split(",") if item.strip()]


def limits_from_options(options: dict[str, Any], *, key_level: bool, clearable: bool) -> dict[str, Any]:
    """The service keyword arguments for the limit flags given in ``options`` (parsed).

    Raises CommandError (one line, naming the flag) on a malformed value.
    """
    limits: dict[str, Any] = {}
    for spec in FLAGS:
        if (spec.key_only and not key_level) or (spec.tenant_only and key_level):
            continue
        raw = options.get(spec.dest)
        if raw is None:
            continue
        raw = str(raw)
        if raw.strip().lower() == CLEAR:
            if not clearable:
                raise CommandError(f"{spec.flag} {CLEAR}: leave the flag out instead (a new limit starts unlimited).")
            if spec.kind == "period":
                raise CommandError(f"{spec.flag} cannot be cleared: choose day, week, month or fixed.")
            limits[spec.field] = None
            continue
        limits[spec.field] = _parse(spec, raw)
    return limits


def limits_update_and_show(command: BaseCommand, obj: Tenant | ApiKey, options: dict[str, Any]) -> None:
    """What tenant_update and apikey_update do with the tenant or key they name.

    The limit flags given in ``options`` go to tenant_update or apikey_update; a first line
    names ``obj`` and the changed limits (without flags nothing changes and it just names
    ``obj``); then the limits as they are now. A refused value: CommandError, nothing changed.
    """
    update: Callable[..., Tenant | ApiKey]
    if isinstance(obj, ApiKey):
        label, update = f"API key {obj.prefix} of tenant {obj.tenant.slug}", partial(apikey_update, api_key=obj)
    else:
        label, update = f"tenant {obj.slug}", partial(tenant_update, tenant=obj)
    limits = limits_from_options(options, key_level=isinstance(obj, ApiKey), clearable=True)
    if limits:
        with exit_on_refusal():
            obj = update(**limits)
        command.stdout.write(f"Updated {label}: {', '.join(sorted(limits))}.")
    else:
        command.stdout.write(f"{label[:1].upper()}{label[1:]}:")
    if isinstance(obj, ApiKey) and obj.revoked_at is not None:
        command.stderr.write(f"warning: this key was revoked at {obj.revoked_at.isoformat()}.")
    for line in describe_limits(obj):
        command.stdout.write(line)


def _amount(value: Any, unit: str = "") -> str:
    return "unlimited" if value is None else f"{value}{unit}"


def _names(value: list[str] | None, *, empty: str) -> str:
    if value is None:
        return "any"
    return ", ".join(value) if value else empty


def describe_limits(obj: Tenant | ApiKey) -> list[str]:
    """Human lines summarizing the limits (and, for a key, the policy) of ``obj``."""
    lines = [
        f"Rate limits: rpm {_amount(obj.rpm)}, tpm {_amount(obj.tpm)}, concurrency {_amount(obj.concurrency)}",
    ]
    if obj.budget_period == BudgetPeriod.FIXED and obj.budget_window_start and obj.budget_window_end:
        period = f"from {obj.budget_window_start.isoformat()} to {obj.budget_window_end.isoformat()}"
    else:
        period = f"per {obj.budget_period} (UTC)"
    soft = f"soft alert at {obj.budget_soft_percent}%" if obj.budget_soft_percent is not None else "no soft alert"
    usd = "unlimited" if obj.budget_usd is None else f"{obj.budget_usd.normalize():f}"
    lines.append(f"Budget: {usd} USD, {_amount(obj.budget_tokens)} tokens {period}; {soft}")
    if isinstance(obj, ApiKey):
        lines.append(
            f"Policy: max output tokens {_amount(obj.max_output_tokens)}; "
            f"reasoning efforts {_names(obj.reasoning_efforts, empty='none allowed')}; "
            f"tools {_names(obj.allowed_tools, empty='none allowed')}; "
            f"client IPs {_names(obj.allowed_ips, empty='none')}"
        )
        follows = "" if obj.stateful is not None else " (follows the tenant)"
        on = obj.stateful if obj.stateful is not None else obj.tenant.stateful
        lines.append(f"Stateful: {'on' if on else 'off'}{follows}")
    else:
        ttl = f"{obj.stored_ttl_days} days" if obj.stored_ttl_days is not None else "the default"
        lines.append(f"Stateful: {'on' if obj.stateful else 'off'}; stored objects kept {ttl}")
    return lines
