"""deploy/grafana: the dashboard's queries parse, name exposed metrics, and show them all."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from ingest.metrics import Metrics
from tests.deploy.support import (
    DEPLOY,
    GRAFANA,
    PROMETHEUS,
    exposed_series,
    hm_metric_names,
    promtool,
    unknown_metric_problems,
)

DASHBOARD = GRAFANA / "dashboard.json"
# What an operator must find on the dashboard (issue 5): each is named by the metric it shows.
REQUIRED = {
    "throughput": "hm_ingest_messages_received_total",
    "lag": "hm_ingest_log_oldest_uncommitted_age_seconds",
    "log size": "hm_ingest_log_bytes",
    "quarantine by reason": "hm_ingest_messages_rejected_total",
    "clearance states": "hm_ingest_clearance_vehicles",
    "API requests by status": "hm_ingest_api_requests_total",
    "API latency": "hm_ingest_api_request_duration_seconds_bucket",
    "back-pressure": "hm_ingest_backpressure_active",
    "free space": "hm_ingest_volume_available_bytes",
    "replica leader": "hm_ingest_replica_leader",
    "adoptions": "hm_ingest_replica_adoptions_total",
    "adopted messages": "hm_ingest_replica_adopted_messages_total",
    "hosted sessions": "hm_ingest_replica_hosted_sessions",
    "topic filters held": "hm_ingest_replica_topic_filters",
}
# Metric families the daemon exposes that the dashboard leaves out on purpose: family → why.
NOT_ON_DASHBOARD: dict[str, str] = {}
# Sample suffixes a family's series may carry (counters' _total, histograms' _bucket, ...).
_FAMILY_SUFFIXES = ("", "_total", "_created", "_bucket", "_count", "_sum", "_info")
_SELECTOR = re.compile(r"\b(hm_ingest_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
# Grafana's own variables, replaced by plausible values so promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _rows() -> dict[str, list[dict[str, Any]]]:
    """Row title → the panels laid out under it (rows are expanded: panels sit below their row)."""
    rows = sorted(
        (panel for panel in _dashboard()["panels"] if panel["type"] == "row"),
        key=lambda row: row["gridPos"]["y"],
    )
    grouped: dict[str, list[dict[str, Any]]] = {row["title"]: [] for row in rows}
    for panel in _panels():
        above = [row for row in rows if row["gridPos"]["y"] < panel["gridPos"]["y"]]
        assert above, f"{panel['title']} sits above the first row"
        grouped[above[-1]["title"]].append(panel)
    return grouped


def _queries() -> dict[str, str]:
    """'panel title / refId' → PromQL, panels and template variables alike."""
    queries = {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in _panels()
        for target in panel["targets"]
    }
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries[f"variable {variable['name']}"] = variable["definition"]
    return queries


def test_every_panel_has_a_query() -> None:
    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_every_query_names_only_exposed_metrics_and_labels() -> None:
    series = exposed_series()
    problems = {
        where: unknown_metric_problems(expr, series)
        for where, expr in _queries().items()
        if unknown_metric_problems(expr, series)
    }
    assert not problems
    assert all(hm_metric_names(expr) for expr in _queries().values())


def test_the_dashboard_covers_what_operators_need() -> None:
    named = set().union(*(hm_metric_names(expr) for expr in _queries().values()))
    missing = {topic: metric for topic, metric in REQUIRED.items() if metric not in named}
    assert not missing


def test_every_exposed_metric_is_on_the_dashboard() -> None:
    # A metric added to the daemon fails here until a panel shows it or NOT_ON_DASHBOARD says why.
    named = set().union(*(hm_metric_names(expr) for expr in _queries().values()))
    families = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    missing = {
        family
        for family in families - set(NOT_ON_DASHBOARD)
        if not named & {family + suffix for suffix in _FAMILY_SUFFIXES}
    }
    assert not missing, f"add a panel for {sorted(missing)} or list them in NOT_ON_DASHBOARD"
    assert set(NOT_ON_DASHBOARD) <= families, "NOT_ON_DASHBOARD names a metric that is gone"


def test_every_panel_query_follows_the_instance_variable() -> None:
    for where, expr in _queries().items():
        if where.startswith("variable"):
            continue  # the instance variable's own query lists every instance
        for name, matchers in _SELECTOR.findall(expr):
            assert 'instance=~"$instance"' in matchers, f"{where}: {name} ignores $instance"


def _alert(name: str) -> dict[str, Any]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))["groups"]
    rules: list[dict[str, Any]] = [
        rule for group in groups for rule in group["rules"] if rule.get("alert") == name
    ]
    assert len(rules) == 1, f"alerts.yml has {len(rules)} rules named {name}"
    return rules[0]


def test_free_space_panel_shows_each_volume_with_the_volume_low_threshold() -> None:
    match = re.fullmatch(
        r"hm_ingest_volume_available_bytes\s*<\s*(\d+)", _alert("HmIngestVolumeLow")["expr"].strip()
    )
    assert match, "HmIngestVolumeLow is no longer 'available bytes < N': update this test"
    limit = int(match.group(1))
    panels = [
        panel
        for panel in _panels()
        if any("hm_ingest_volume_available_bytes" in t["expr"] for t in panel["targets"])
    ]
    assert panels
    for panel in panels:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "bytes", panel["title"]
        steps = defaults["thresholds"]["steps"]
        values = [step["value"] for step in steps]
        assert limit in values, f"{panel['title']}: no threshold at {limit} (HmIngestVolumeLow)"
        # Below the alert's limit is the bad side: the step in force there must be red.
        assert steps[values.index(limit) - 1]["color"] == "red", panel["title"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", panel["title"]
        for target in panel["targets"]:
            assert "{{volume}}" in target["legendFormat"], panel["title"]
            assert "{{instance}}" in target["legendFormat"], panel["title"]


def test_replicas_row_shows_each_instance() -> None:
    panels = _rows()["Replicas"]
    shown = set().union(*(hm_metric_names(t["expr"]) for p in panels for t in p["targets"]))
    assert {
        "hm_ingest_replica_leader",
        "hm_ingest_replica_adoptions_total",
        "hm_ingest_replica_adopted_messages_total",
    } <= shown
    for panel in panels:
        for target in panel["targets"]:
            assert "{{instance}}" in target["legendFormat"], panel["title"]
            # An aggregation must keep the instance apart, or the row cannot say who did what.
            if re.search(r"\b(?:sum|max|min|avg|count)\b", target["expr"]):
                assert re.search(r"\bby\s*\([^)]*\binstance\b", target["expr"]), panel["title"]
    (leader,) = [
        p for p in panels if any("hm_ingest_replica_leader" in t["expr"] for t in p["targets"])
    ]
    (mapping,) = leader["fieldConfig"]["defaults"]["mappings"]
    assert {key: value["text"] for key, value in mapping["options"].items()} == {
        "0": "follower",
        "1": "leader",
    }


def _as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".+", expr)  # dashboard variables ($instance) in regex matchers


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    # promtool has no "check expression"; a recording rule per query gets the same parser.
    exprs = [expr for where, expr in _queries().items() if not where.startswith("variable")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _as_promql(expr)}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_promql_check_can_fail(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (le (x)"}]}]}
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, timeout=60, check=False
    )
    assert result.returncode != 0


def test_queries_use_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    (datasource,) = provisioned["datasources"]
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    for panel in _panels():
        refs = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(ref == {"type": "prometheus", "uid": "${datasource}"} for ref in refs), panel
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    service = compose["services"]["prometheus"]
    assert datasource["url"] == f"http://prometheus:{service['ports'][0].rsplit(':', 1)[1]}"


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_compose_provisions_the_dashboard_where_the_provider_looks() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "hm-ingest.yml").read_text(encoding="utf-8")
    )["providers"][0]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    target = mounts[f"./grafana/{DASHBOARD.name}"]
    assert Path(target).parent == Path(provider["options"]["path"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


@pytest.mark.parametrize("path", sorted(GRAFANA.rglob("*.yml")), ids=lambda p: p.name)
def test_provisioning_files_are_grafana_v1(path: Path) -> None:
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["apiVersion"] == 1
