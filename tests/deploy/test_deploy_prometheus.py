"""deploy/prometheus: alert rules pass promtool's checks and unit tests, and name real metrics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.deploy.support import (
    DEPLOY,
    PROMETHEUS,
    REPO,
    exposed_series,
    promtool,
    unknown_metric_problems,
)

ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
OPERATIONS = REPO / "docs" / "operations.md"


def _rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules_accepts_every_rule() -> None:
    result = _run(promtool(), "check", "rules", ALERTS.name, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found, result.stdout
    assert int(found.group(1)) == len(_rules())


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = _run(promtool(), "test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test_case() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in _rules():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"no test where {name} fires"
        assert any(not case.get("exp_alerts") for case in mine), f"no test where {name} is silent"


def test_alert_expressions_name_only_metrics_and_labels_the_daemon_exposes() -> None:
    series = exposed_series()
    problems = {
        rule["alert"]: unknown_metric_problems(rule["expr"], series)
        for rule in _rules()
        if unknown_metric_problems(rule["expr"], series)
    }
    assert not problems


def test_the_cross_check_catches_a_misspelt_metric_or_label() -> None:
    series = exposed_series()
    assert unknown_metric_problems("hm_ingest_mqtt_conected == 0", series)
    assert unknown_metric_problems('rate(hm_ingest_messages_rejected_total{reson="x"}[5m])', series)
    assert unknown_metric_problems(
        "sum by (vin) (rate(hm_ingest_messages_received_total[5m]))", series
    )
    latency = 'rate(hm_ingest_api_request_duration_seconds_bucket{instance=~".+"}[5m])'
    assert not unknown_metric_problems(
        f"histogram_quantile(0.99, sum by (le, endpoint) ({latency}))", series
    )


def _anchors(markdown: str) -> set[str]:
    # GitHub's heading anchors: lower case, punctuation dropped, spaces become hyphens.
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    anchors = _anchors(OPERATIONS.read_text(encoding="utf-8"))
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (REPO / path) == OPERATIONS, rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no #{anchor}"


def test_compose_prometheus_config_is_valid_and_loads_the_alert_rules() -> None:
    result = _run(promtool(), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == [ALERTS.name]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    # The alerts select job="hm-ingest"; the scrape job must carry that name.
    assert job["job_name"] == "hm-ingest"
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    daemon_env = compose["services"][host]["environment"]
    assert daemon_env["HM_INGEST_METRICS_LISTEN"].endswith(f":{port}")
