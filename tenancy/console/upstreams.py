"""The supply side's pages, operators only (anyone else: 404): pools and their strategy,
upstream accounts (the credential write-only) with their health and its history, the "Test"
probe, and models (routes with their fallbacks, prices with their versions)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from accounts.health.machine import Health, State
from accounts.models import AccountTransition, ModelRoute, Pool, UpstreamAccount
from accounts.selectors import account_health_states
from accounts.services import (
    UNCHANGED,
    model_route_delete,
    model_route_set,
    pool_delete,
    pool_get_or_create,
    pool_set_strategy,
    upstream_account_create,
    upstream_account_probe,
    upstream_account_set_enabled,
    upstream_account_update,
)
from tenancy.console.common import confirm, done, only_post, operator_view, service_errors, table
from tenancy.console.forms import (
    AccountEditForm,
    AccountForm,
    DisableForm,
    PoolForm,
    PoolStrategyForm,
    PriceForm,
    RouteForm,
    joined,
)
from tenancy.models import PriceVersion
from tenancy.services.prices import price_set

_ACCOUNT_FIELDS = {"base url": "base_url", "models": "models", "weight": "weight", "priority": "priority"}


def with_health(accounts: Iterable[UpstreamAccount]) -> list[UpstreamAccount]:
    """``accounts`` with ``health`` (the effective state now, its reason and until), one read."""
    rows = list(accounts)
    states = account_health_states(a.pk for a in rows)
    now = time.time()
    for account in rows:
        health = states.get(account.pk) or Health(account.pk)
        state = State.DISABLED if not account.enabled else health.effective_state(now)
        until = health.until if health.until is not None and health.until > now else None
        account.health = {  # type: ignore[attr-defined]
            "state": state.value,
            "reason": account.disabled_reason if not account.enabled else health.reason,
            "until": datetime.fromtimestamp(until, tz=UTC) if until else None,
        }
    return rows


@operator_view
def pool_list(request: HttpRequest) -> HttpResponse:
    form = PoolForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic():
                pool = pool_get_or_create(name=form.cleaned_data["name"])
                pool_set_strategy(pool=pool, strategy=form.cleaned_data["strategy"])
        except ValidationError as error:
            service_errors(form, error, {"pool name": "name", "strategy": "strategy"})
        else:
            return done(request, f"Pool {pool.name} saved.", "console:pool", pool.name)
    pools = Pool.objects.annotate(
        account_count=Count("accounts"), enabled_count=Count("accounts", filter=Q(accounts__enabled=True))
    )
    pool_table = table(
        request,
        pools,
        [
            ("Pool", "name", "name"),
            ("Strategy", "strategy", "strategy"),
            ("Accounts", "accounts", "account_count"),
            ("Enabled", "enabled", "enabled_count"),
        ],
        default="name",
        numeric=("accounts", "enabled"),
    )
    accounts = with_health(UpstreamAccount.objects.select_related("pool").order_by("pool__name", "priority", "id"))
    context = {"table": pool_table, "form": form, "accounts": accounts}
    return render(request, "console/pools.html", context, status=400 if form.errors else 200)


@operator_view
def pool_detail(request: HttpRequest, name: str) -> HttpResponse:
    pool = get_object_or_404(Pool, name=name)
    form = PoolStrategyForm(request.POST or None, initial={"strategy": pool.strategy})
    if request.method == "POST" and form.is_valid():
        pool_set_strategy(pool=pool, strategy=form.cleaned_data["strategy"])
        return done(request, f"Strategy of {pool.name}: {pool.get_strategy_display()}.", "console:pool", pool.name)
    accounts = with_health(pool.accounts.order_by("priority", "id"))
    routes = sorted(set(pool.route_targets.values_list("route__model", flat=True)))
    return render(request, "console/pool.html", {"pool": pool, "form": form, "accounts": accounts, "routes": routes})


@operator_view
def pool_remove(request: HttpRequest, name: str) -> HttpResponse:
    pool = get_object_or_404(Pool, name=name)
    if request.method == "POST":
        try:
            pool_delete(pool=pool)
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
            return redirect("console:pool", pool.name)
        return done(request, f"Pool {name} deleted.", "console:pools")
    return confirm(
        request,
        title=f"Delete pool {pool.name}?",
        message="Only a pool without accounts and routes can be deleted.",
        button="Delete pool",
        cancel_url=f"/console/pools/{pool.name}/",
    )


@operator_view
def account_new(request: HttpRequest) -> HttpResponse:
    form = AccountForm(request.POST or None, initial={"pool": request.GET.get("pool", "")})
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic():
                account = upstream_account_create(
                    pool=pool_get_or_create(name=form.cleaned_data["pool"]),
                    api_key=form.cleaned_data["api_key"] or None,
                    **form.account(),
                )
        except ValidationError as error:
            service_errors(form, error, {"pool name": "pool", **_ACCOUNT_FIELDS})
        else:
            return done(request, f"Account {account} added to {account.pool.name}.", "console:account", account.pk)
    context = {
        "title": "Add an upstream account",
        "form": form,
        "submit": "Add account",
        "cancel_url": "/console/pools/",
    }
    context["lead"] = "The credential is stored encrypted and never shown again, here or in the API."
    return render(request, "console/form.html", context, status=400 if form.errors else 200)


def _account_initial(account: UpstreamAccount) -> dict[str, Any]:
    return {
        "name": account.name,
        "base_url": account.base_url,
        "models": joined(account.models),
        "weight": account.weight,
        "priority": account.priority,
        "max_concurrency": account.max_concurrency,
        "enabled": account.enabled,
    }


def _account_page(
    request: HttpRequest, account: UpstreamAccount, form: AccountEditForm, probe: Any = None
) -> HttpResponse:
    transitions = table(
        request,
        AccountTransition.objects.filter(account=account),
        [("When", "at", "at"), ("From", "", ""), ("To", "to", "to_state"), ("Reason", "", ""), ("Until", "", "")],
        default="-at",
    )
    context = {"account": with_health([account])[0], "form": form, "table": transitions, "probe": probe}
    return render(request, "console/account.html", context, status=400 if form.errors else 200)


@operator_view
def account_detail(request: HttpRequest, account_id: int) -> HttpResponse:
    account = get_object_or_404(UpstreamAccount.objects.select_related("pool"), pk=account_id)
    form = AccountEditForm(request.POST or None, initial=_account_initial(account))
    if request.method == "POST" and form.is_valid():
        data = form.account()
        secret: Any = UNCHANGED
        if form.cleaned_data["remove_credential"]:
            secret = None
        elif form.cleaned_data["api_key"]:
            secret = form.cleaned_data["api_key"]
        try:
            upstream_account_update(account=account, api_key=secret, **data)
        except ValidationError as error:
            account.refresh_from_db()
            service_errors(form, error, _ACCOUNT_FIELDS)
        else:
            return done(request, "Account saved.", "console:account", account.pk)
    return _account_page(request, account, form)


@operator_view
def account_enable(request: HttpRequest, account_id: int) -> HttpResponse:
    account = get_object_or_404(UpstreamAccount, pk=account_id)
    if (refused := only_post(request)) is not None:
        return refused
    upstream_account_set_enabled(account=account, enabled=True)
    return done(request, f"{account} enabled: it takes traffic again.", "console:account", account.pk)


@operator_view
def account_disable(request: HttpRequest, account_id: int) -> HttpResponse:
    account = get_object_or_404(UpstreamAccount, pk=account_id)
    form = DisableForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        upstream_account_set_enabled(account=account, enabled=False, reason=form.cleaned_data["reason"])
        return done(request, f"{account} disabled: it takes no traffic.", "console:account", account.pk)
    return confirm(
        request,
        title=f"Disable {account}?",
        message="The account takes no new request on any gateway until it is enabled again.",
        button="Disable account",
        cancel_url=f"/console/accounts/{account.pk}/",
        form=form,
    )


@operator_view
def account_test(request: HttpRequest, account_id: int) -> HttpResponse:
    """The same probe as POST /api/v1/accounts/{id}/test/; an htmx request gets the answer alone."""
    account = get_object_or_404(UpstreamAccount, pk=account_id)
    if (refused := only_post(request)) is not None:
        return refused
    try:
        answer: Any = upstream_account_probe(account=account)
    except ValidationError as error:
        answer = {"status": None, "verdict": "not probed", "latency_ms": 0, "error": " ".join(error.messages)}
    if getattr(request, "htmx", False):
        return render(request, "console/_probe.html", {"probe": answer})
    return _account_page(request, account, AccountEditForm(initial=_account_initial(account)), probe=answer)


@operator_view
def model_list(request: HttpRequest) -> HttpResponse:
    route_form = RouteForm(prefix="route")
    price_form = PriceForm(prefix="price")
    if request.method == "POST" and "route-model" in request.POST:
        route_form = RouteForm(request.POST, prefix="route")
        if route_form.is_valid() and (pairs := route_form.target_pairs()):
            try:
                route = model_route_set(model=route_form.cleaned_data["model"], targets=pairs)
            except ValidationError as error:
                service_errors(route_form, error, {"model name": "model", "target": "targets", "pool": "targets"})
            else:
                return done(request, f"Route of {route.model} saved.", "console:models")
    elif request.method == "POST":
        price_form = PriceForm(request.POST, prefix="price")
        if price_form.is_valid():
            try:
                price = price_set(**price_form.cleaned_data)
            except ValidationError as error:
                service_errors(price_form, error, {"effective_from": "effective_from"})
            else:
                return done(request, f"Price of {price.model} set.", "console:models")
    routes = ModelRoute.objects.prefetch_related("targets__pool").order_by("model")
    prices = list(PriceVersion.objects.order_by("model", "-effective_from", "-id"))
    current: set[int] = set()
    seen: set[str] = set()
    now = datetime.now(tz=UTC)
    for price in prices:  # newest first per model: the first one already effective is current
        if price.model not in seen and price.effective_from <= now:
            seen.add(price.model)
            current.add(price.pk)
    served = sorted(
        {m for models in UpstreamAccount.objects.filter(enabled=True).values_list("models", flat=True) for m in models}
    )
    context = {
        "routes": routes,
        "prices": prices,
        "current": current,
        "served": served,
        "route_form": route_form,
        "price_form": price_form,
        "now": now,
    }
    status = 400 if route_form.errors or price_form.errors else 200
    return render(request, "console/models.html", context, status=status)


@operator_view
def route_remove(request: HttpRequest, route_id: int) -> HttpResponse:
    route = get_object_or_404(ModelRoute, pk=route_id)
    if request.method == "POST":
        model_route_delete(model=route.model)
        return done(request, f"Route of {route.model} deleted: the model is served by name again.", "console:models")
    return confirm(
        request,
        title=f"Delete the route of {route.model}?",
        message="Requests for this model then go to any pool with an enabled account listing it by that name.",
        button="Delete route",
        cancel_url="/console/models/",
    )
