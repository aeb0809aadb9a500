"""deploy/grafana: the dashboard's queries parse and name metrics the daemon exposes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    DEPLOY,
    GRAFANA,
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
}
# Grafana's own variables, replaced by plausible values so promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


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
