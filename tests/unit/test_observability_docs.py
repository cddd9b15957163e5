"""The Grafana dashboard and the Prometheus alert rules under docs/observability/ parse and name
only metrics that exist; docs/operations.md lists every metric family the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from gateway.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# A metric name in PromQL: the gateway's and the GenAI families' prefixes.
NAME = re.compile(r"\b((?:gateway|gen_ai)_[a-z_]+)\b")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
# Label names that share the prefixes (they are not metrics).
LABELS = {
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_token_type",
}


def families() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, tenant_labels=True)
    return {family.name for family in registry.collect()}


def exported() -> set[str]:
    """Every sample name a scrape can show (families with their suffixes)."""
    names = set()
    for family in families():
        names.add(family)
        names.update(family + suffix for suffix in SUFFIXES)
    return names


def referenced(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in NAME.findall(expr)} - LABELS


def test_the_dashboard_parses_and_names_only_existing_metrics() -> None:
    dashboard = json.loads((DOCS / "observability/grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 15
    names = referenced(expressions)
    assert names - exported() == set()
    # Every family is on the dashboard except the per-tenant budget (tenant labels only).
    shown = {name.removesuffix(suffix) for name in names for suffix in SUFFIXES if name.endswith(suffix)} | names
    assert families() - shown == {"gateway_budget_remaining_usd"}


def test_the_alert_rules_parse_and_name_only_existing_metrics() -> None:
    rules = yaml.safe_load((DOCS / "observability/alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"GatewayHighErrorRate", "GatewayAllAccountsCooling", "GatewayUsageBacklog"} <= set(alerts)
    for rule in alerts.values():
        assert rule["expr"].strip()
        assert rule["annotations"]["summary"]
    assert referenced([rule["expr"] for rule in alerts.values()]) - exported() == set()


def test_operations_md_lists_every_metric() -> None:
    text = (DOCS / "operations.md").read_text()
    table = {
        match
        for line in text.splitlines()
        if line.startswith("| `gateway_") or line.startswith("| `gen_ai_")
        for match in re.findall(r"^\| `([a-z_]+)`", line)
    }
    expected = set()
    for family in families():
        # Counters are exposed (and listed) with their _total suffix.
        expected.add(family + "_total" if f"{family}_total" in table else family)
    assert table == expected
