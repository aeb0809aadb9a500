"""deploy/k8s: schema-valid manifests (kubernetes-validate ships the API schemas and works
offline), cross-checked against the daemon's settings, routes and drain deadline.

These check the single-pod deployment, ``kubectl apply -k deploy/k8s`` as built by
tests/deploy/kustomize.py; test_deploy_k8s_replicas.py checks the replicas overlay.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.config import Settings, load_settings
from tests.deploy.kustomize import build
from tests.deploy.support import K8S, assert_env_is_valid, http_routes, load_yaml_documents

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (a dev dependency) is needed"
)

# The oldest Kubernetes release the manifests claim to support, and the newest the package knows.
VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
# SIGTERM to exit: the drain deadline, then the process exit and the kubelet's own latency.
GRACE_MARGIN_S = 10


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _manifests() -> list[Path]:
    # Patches are fragments (RFC 6902 operations): the built overlay is validated instead.
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith("-patch.yaml")
    )


def _resource(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in build(K8S) if doc["kind"] == kind]
    return found


def _pod() -> dict[str, Any]:
    return _resource("StatefulSet")["spec"]["template"]


def _container() -> dict[str, Any]:
    (container,) = _pod()["spec"]["containers"]
    return container


def _settings(tmp_path: Path) -> Settings:
    """The ConfigMap's TOML, loaded exactly as the daemon loads it."""
    toml = _resource("ConfigMap")["data"]["hm-ingest.toml"]
    path = tmp_path / "hm-ingest.toml"
    path.write_text(toml, encoding="utf-8")
    return load_settings(path, {})


@pytest.mark.parametrize("kustomization", _kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_existing_files_and_leaves_the_optional_ones_out(
    kustomization: Path,
) -> None:
    tree = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
    for name in tree["resources"]:
        path = (kustomization.parent / name).resolve()
        assert path.is_file() or (path / "kustomization.yaml").is_file(), name
        assert not path.name.endswith(".example.yaml"), f"{name}: a template, never applied"
        assert "optional" not in path.relative_to(K8S).parts, name
    for patch in tree.get("patches", []):
        assert (kustomization.parent / patch["path"]).is_file(), patch["path"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_validate_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    for doc in load_yaml_documents(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked by test_servicemonitor_selects_the_service
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(_resource("StatefulSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_configmap_toml_is_a_valid_daemon_configuration(tmp_path: Path) -> None:
    toml = _resource("ConfigMap")["data"]["hm-ingest.toml"]
    tree = tomllib.loads(toml)
    settings = _settings(tmp_path)
    for section, key in (("state", "path"), ("output", "path"), ("mqtt", "ca_file")):
        assert Path(tree[section][key]).is_absolute(), f"[{section}] {key} must be absolute"
    assert settings.logging.format == "json"


def test_env_variables_name_real_settings() -> None:
    env = _container()["env"]
    assert_env_is_valid({e["name"]: e.get("value", "") for e in env}, "statefulset")
    for entry in env:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        assert ref is None or ref["optional"] is True, entry["name"]


def test_grace_period_exceeds_the_drain_deadline(tmp_path: Path) -> None:
    grace = _pod()["spec"]["terminationGracePeriodSeconds"]
    assert grace >= _settings(tmp_path).shutdown.deadline_s + GRACE_MARGIN_S


def test_probes_hit_routes_the_daemon_serves_on_its_metrics_port(tmp_path: Path) -> None:
    container = _container()
    port = _settings(tmp_path).metrics.host_port[1]
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port
    routes = http_routes()
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert path in routes
        assert get["port"] in (container_port["name"], port)
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] in routes


def test_state_and_output_live_on_claims_and_certificates_come_from_the_secret(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    statefulset = _resource("StatefulSet")
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    assert mounts[str(settings.state.path)]["name"] in claims
    assert mounts[str(settings.output.path)]["name"] in claims
    assert mounts[str(settings.state.path)]["name"] != mounts[str(settings.output.path)]["name"]
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    secret_names = set()
    for path in (settings.mqtt.ca_file, settings.mqtt.cert_file, settings.mqtt.key_file):
        assert path is not None
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        secret_names.add(secret["secretName"])
        example = {
            doc["metadata"]["name"]: doc for doc in load_yaml_documents(K8S / "secret.example.yaml")
        }
        assert path.name in example[secret["secretName"]]["stringData"], path.name
    assert len(secret_names) == 1
    config_mount = mounts["/etc/hm-ingest/config"]
    assert (
        volumes[config_mount["name"]]["configMap"]["name"]
        == _resource("ConfigMap")["metadata"]["name"]
    )
    assert "--config" in _container()["args"]
    assert _container()["args"][-1] == "/etc/hm-ingest/config/hm-ingest.toml"


def test_pod_is_locked_down_and_sized() -> None:
    spec = _pod()["spec"]
    container = _container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind


def test_exactly_one_replica_holds_the_mqtt_session(tmp_path: Path) -> None:
    statefulset = _resource("StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    # Without [replica] settings every pod would connect with the one client id: one pod only,
    # and the old one gone before its replacement starts. Several pods: deploy/k8s/replicas.
    assert not _settings(tmp_path).replica.enabled
    assert not any(e["name"].startswith("HM_INGEST_REPLICA_") for e in _container()["env"])
    assert statefulset["spec"]["podManagementPolicy"] == "OrderedReady"
    assert statefulset["spec"]["serviceName"] == _resource("Service")["metadata"]["name"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_service_selects_the_pod_and_exposes_the_metrics_port() -> None:
    service = _resource("Service")
    assert _selects(service["spec"]["selector"], _pod()["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    (container_port,) = _container()["ports"]
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert port["port"] == container_port["containerPort"]


def test_servicemonitor_selects_the_service() -> None:
    (monitor,) = load_yaml_documents(K8S / "optional" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = _resource("Service")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] in http_routes()
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
