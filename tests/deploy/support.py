"""Helpers for the deploy/ tests: what the code really exposes, to cross-check the files against.

Metric names come from a fresh :class:`~ingest.metrics.Metrics` registry, setting names from
:class:`~ingest.config.Settings`, HTTP routes from :func:`ingest.http.build_app`, so a rename in the
code fails these tests instead of silently breaking a dashboard, an alert or a probe.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from ingest.config import ENV_PREFIX, Settings, load_settings
from ingest.health import HealthState
from ingest.http import build_app
from ingest.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"

# Labels Prometheus attaches to every scraped series (target labels), not the daemon.
TARGET_LABELS = frozenset({"job", "instance"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
    "summary": ("", "_count", "_sum", "_created"),
}
_HM_METRIC = re.compile(r"\bhm_ingest_[a-zA-Z0-9_]+")
_SELECTOR = re.compile(r"\b(hm_ingest_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}")


def exposed_series() -> dict[str, frozenset[str]]:
    """Every sample name a daemon's /metrics can carry, with its label names.

    Built from the declared metrics, not from a scrape: a labelled metric has no samples until a
    label value is used, yet a dashboard may rightly query it already.
    """
    metrics = Metrics(CollectorRegistry())
    series: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, kind = value._name, value._type  # no public accessor for either
        labels = frozenset(value._labelnames)
        for suffix in _SUFFIXES[kind]:
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    # Samples present already (an Info's labels are its value, e.g. version) add their labels.
    for family in metrics.registry.collect():
        for sample in family.samples:
            series[sample.name] = series.get(sample.name, frozenset()) | set(sample.labels)
    return series


def hm_metric_names(expr: str) -> set[str]:
    return set(_HM_METRIC.findall(expr))


def unknown_metric_problems(expr: str, series: Mapping[str, frozenset[str]]) -> list[str]:
    """What in ``expr`` names a metric or label the daemon does not expose."""
    problems = [f"{name} is not exposed" for name in sorted(hm_metric_names(expr) - set(series))]
    used_labels: set[str] = set(TARGET_LABELS)
    for name in hm_metric_names(expr) & set(series):
        used_labels |= series[name]
    for name, matchers in _SELECTOR.findall(expr):
        allowed = series.get(name, frozenset()) | TARGET_LABELS
        unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', matchers)  # values may contain "=" too
        problems += [
            f"{name} has no label {label!r}"
            for label in _MATCHER.findall(unquoted)
            if label not in allowed
        ]
    if hm_metric_names(expr) and hm_metric_names(expr) <= set(series):
        for group in _GROUPING.findall(expr):
            for label in (part.strip() for part in group.split(",")):
                if label and label not in used_labels:
                    problems.append(f"grouping label {label!r} is on none of the metrics used")
    return problems


def setting_env_names() -> set[str]:
    """Every valid HM_INGEST_<SECTION>_<KEY> name, from the Settings model."""
    names = set()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        for key in model.model_fields:  # type: ignore[attr-defined]
            names.add(f"{ENV_PREFIX}{section.upper()}_{key.upper()}")
    return names


def assert_env_is_valid(env: Mapping[str, str], where: str) -> None:
    """Each HM_INGEST_* name must be a real setting and its value must validate."""
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    unknown = sorted(set(ours) - setting_env_names())
    assert not unknown, f"{where}: no such setting: {unknown}"
    # Compose interpolations (${VAR:-default}) are checked with their default. The app id is
    # required by the default topic; files that set it use theirs.
    resolved = {k: _INTERPOLATION.sub(lambda m: m.group(1) or "", v) for k, v in ours.items()}
    load_settings(None, {"HM_INGEST_MQTT_APP_ID": "placeholder", **resolved})


def http_routes() -> set[str]:
    """GET paths the daemon's HTTP server answers."""
    app = build_app(Metrics(CollectorRegistry()), HealthState())
    return {
        resource.canonical
        for resource in app.router.resources()
        for route in resource
        if route.method in ("GET", "*")
    }


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed: `apt-get install -y --no-install-recommends prometheus` "
            "(Debian) provides it, and .ci/run installs it"
        )
    return found


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]
