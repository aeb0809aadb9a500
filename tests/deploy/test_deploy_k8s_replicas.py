"""deploy/k8s/replicas: the overlay that runs N pods as replicas of one group.

The overlay is built with tests/deploy/kustomize.py (kustomize is no dependency); where kubectl
is installed, the build is compared with ``kubectl kustomize``. The built StatefulSet is then
validated against the Kubernetes schemas and its configuration loaded as a pod would: the base
ConfigMap's file plus the environment the pod gets (downward API, the overlay's ConfigMap, the
example Secrets' values).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.config import REPLICA_ID_PATTERN, Settings, load_settings
from ingest.session_options import replica_client_id, subscription_topic
from ingest.storage import OBJECT_STORE_SCHEMES, is_uri
from tests.deploy.kustomize import PatchFailed, apply_json_patch, build
from tests.deploy.support import K8S, assert_env_is_valid, load_yaml_documents

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (a dev dependency) is needed"
)

OVERLAY = K8S / "replicas"
VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
REPLICAS = 3


def _built() -> list[dict[str, Any]]:
    return build(OVERLAY)


def _resource(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in _built() if doc["kind"] == kind]
    return found


def _configmaps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in _built() if d["kind"] == "ConfigMap"}


def _container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = _resource("StatefulSet")["spec"]["template"]["spec"][
        "containers"
    ]
    (container,) = containers
    return container


def _env() -> dict[str, dict[str, Any]]:
    entries = _container()["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    return {entry["name"]: entry for entry in entries}


def _example_secrets() -> dict[str, dict[str, str]]:
    return {
        doc["metadata"]["name"]: doc["stringData"]
        for path in (K8S / "secret.example.yaml", OVERLAY / "secret.example.yaml")
        for doc in load_yaml_documents(path)
    }


def _pod_environment(pod: str) -> dict[str, str]:
    """What pod ``pod`` gets as its environment, with the example Secrets' values."""
    configmaps = _configmaps()
    secrets = _example_secrets()
    env: dict[str, str] = {}
    for name, entry in _env().items():
        if "value" in entry:
            env[name] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", name
            env[name] = pod
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secrets[ref["name"]][ref["key"]]
        else:
            ref = source["configMapKeyRef"]
            env[name] = configmaps[ref["name"]][ref["key"]]
    return env


def _pod_settings(tmp_path: Path, pod: str) -> Settings:
    # The base's file, mounted unchanged: the overlay only adds environment variables.
    path = tmp_path / "hm-ingest.toml"
    path.write_text(_configmaps()["hm-ingest-config"]["hm-ingest.toml"], encoding="utf-8")
    return load_settings(path, _pod_environment(pod))


def _pods() -> list[str]:
    statefulset = _resource("StatefulSet")
    name, count = statefulset["metadata"]["name"], statefulset["spec"]["replicas"]
    return [f"{name}-{n}" for n in range(count)]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _sorted(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(documents, key=lambda d: (d["kind"], d["metadata"]["name"]))


def _kustomize_command() -> list[str] | None:
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    return None


# -- the build --------------------------------------------------------------------------------


@pytest.mark.parametrize("root", [K8S, OVERLAY], ids=["base", "replicas"])
def test_python_build_equals_kubectl_kustomize(root: Path) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is installed: only the Python build is checked")
    out = subprocess.run([*command, str(root)], capture_output=True, text=True, check=True)
    assert _sorted(list(yaml.safe_load_all(out.stdout))) == _sorted(build(root))


def test_the_overlay_refuses_a_base_whose_patched_entries_moved(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    statefulset = copy / "base" / "statefulset.yaml"
    text = statefulset.read_text(encoding="utf-8")
    # Swap the state and data mounts: removing "the data mount" by index would now remove state.
    mounts = re.search(r"( +- name: state\n.*\n)( +- name: data\n.*\n)", text)
    assert mounts is not None
    statefulset.write_text(
        text.replace(mounts.group(0), mounts.group(2) + mounts.group(1)), encoding="utf-8"
    )
    with pytest.raises(PatchFailed, match="volumeMounts/1/name"):
        build(copy / "replicas")
    if (command := _kustomize_command()) is not None:
        failed = subprocess.run(
            [*command, str(copy / "replicas")], check=False, capture_output=True
        )
        assert failed.returncode != 0


def test_json_patch_operations() -> None:
    doc = {"a": [1, 2], "b": {"c/d": 0}}
    patched = apply_json_patch(
        doc,
        [
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "remove", "path": "/a/1"},
            {"op": "replace", "path": "/b/c~1d", "value": 9},
            {"op": "test", "path": "/a", "value": [0, 2, 3]},
        ],
    )
    assert patched == {"a": [0, 2, 3], "b": {"c/d": 9}}
    assert doc == {"a": [1, 2], "b": {"c/d": 0}}
    with pytest.raises(PatchFailed):
        apply_json_patch(doc, [{"op": "test", "path": "/a/0", "value": 2}])
    with pytest.raises(PatchFailed):
        apply_json_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])
    with pytest.raises(PatchFailed):
        apply_json_patch(doc, [{"op": "remove", "path": "/a/2"}])


@pytest.mark.parametrize("version", VERSIONS)
def test_built_overlay_validates_against_the_kubernetes_schemas(version: str) -> None:
    documents = _built()
    assert {d["kind"] for d in documents} == {
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
    }
    for doc in documents:
        kubernetes_validate.validate(doc, version, strict=True)


def test_example_secrets_are_not_applied() -> None:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "secret.example.yaml" not in kustomization["resources"]
    assert not any(doc["kind"] == "Secret" for doc in _built())
    text = (OVERLAY / "secret.example.yaml").read_text(encoding="utf-8")
    assert text.startswith("# EXAMPLE ONLY, NOT part of kustomization.yaml")


# -- the pods -----------------------------------------------------------------------------------


def test_several_pods_that_may_start_together() -> None:
    spec = _resource("StatefulSet")["spec"]
    assert spec["replicas"] == REPLICAS
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == _resource("Service")["metadata"]["name"]
    # Every pod's name is a valid replica id (the id is the pod name).
    for pod in _pods():
        assert re.fullmatch(REPLICA_ID_PATTERN, pod), pod


def test_env_variables_name_real_settings() -> None:
    assert_env_is_valid(_pod_environment("hm-ingest-0"), "replicas overlay")


def test_replica_id_is_the_pod_name() -> None:
    source = _env()["HM_INGEST_REPLICA_ID"]["valueFrom"]
    assert source == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_coordination_url_comes_from_a_required_secret() -> None:
    entry = _env()["HM_INGEST_REPLICA_COORDINATION"]
    assert "value" not in entry, "the URL may hold a password: a Secret, not a literal"
    ref = entry["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("hm-ingest-coordination", "url")
    assert ref.get("optional", False) is False, "a replica cannot start without it"
    # Pods on several nodes: PostgreSQL, never SQLite (one host's processes only).
    url = _example_secrets()["hm-ingest-coordination"]["url"]
    assert url.startswith("postgresql://"), url


def test_output_is_one_object_store_and_state_stays_per_pod(tmp_path: Path) -> None:
    settings = _pod_settings(tmp_path, "hm-ingest-0")
    output = settings.output.path
    assert isinstance(output, str)
    assert is_uri(output)
    assert output.partition("://")[0] in OBJECT_STORE_SCHEMES
    ref = _env()["HM_INGEST_OUTPUT_PATH"]["valueFrom"]["configMapKeyRef"]
    assert ref["name"] in _configmaps()
    statefulset = _resource("StatefulSet")
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert mounts[str(settings.state.path)] in claims
    assert claims == {"state"}, "no per-pod data volume: the output is in the object store"
    assert set(mounts.values()) - {"config", "mqtt-certs", "tmp"} == {"state"}


def test_object_store_credentials_secret_is_optional() -> None:
    (source,) = _container()["envFrom"]
    assert source["secretRef"]["optional"] is True
    example = _example_secrets()[source["secretRef"]["name"]]
    assert not any(key.startswith("HM_INGEST_") for key in example)


def test_each_pod_loads_as_a_replica_with_a_shared_subscription(tmp_path: Path) -> None:
    client_ids = set()
    for pod in _pods():
        settings = _pod_settings(tmp_path, pod)
        assert settings.replica.enabled
        assert settings.replica.id == pod
        coordination = settings.replica.coordination.get_secret_value()
        assert coordination == _example_secrets()["hm-ingest-coordination"]["url"]
        topic = subscription_topic(settings)
        assert topic == f"$share/{settings.replica.group}/{settings.mqtt.resolved_topic}"
        client_ids.add(replica_client_id(settings))
    assert len(client_ids) == REPLICAS, "each pod must hold its own MQTT session"


def test_vin_mode_members_are_the_statefulsets_pods(tmp_path: Path) -> None:
    assert _configmaps()["hm-ingest-replicas"]["mode"] == "shared", "the default mode"
    path = tmp_path / "hm-ingest.toml"
    path.write_text(_configmaps()["hm-ingest-config"]["hm-ingest.toml"], encoding="utf-8")
    for pod in _pods():
        environment = {
            **_pod_environment(pod),
            "HM_INGEST_REPLICA_MODE": "vin",
            "HM_INGEST_FLEET_ENABLED": "true",
        }
        settings = load_settings(path, environment)
        assert settings.replica.vin_sharded
        assert settings.replica.members == _pods(), "members must name every pod, no more"


def test_pod_disruption_budget_takes_one_replica_at_a_time() -> None:
    budget = _resource("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    pod_labels = _resource("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert _selects(budget["spec"]["selector"]["matchLabels"], pod_labels)


def test_pods_spread_over_nodes() -> None:
    pod = _resource("StatefulSet")["spec"]["template"]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert _selects(spread["labelSelector"]["matchLabels"], pod["metadata"]["labels"])


def test_startup_and_shutdown_cover_the_replica_timings(tmp_path: Path) -> None:
    settings = _pod_settings(tmp_path, "hm-ingest-0")
    pod = _resource("StatefulSet")["spec"]["template"]
    # A pod that waits for the adoption of its old session answers no probe until it joined:
    # the startup probe's window must leave room for many heartbeats.
    startup = pod["spec"]["containers"][0]["startupProbe"]
    window_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert window_s >= 10 * settings.replica.lease_s
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.shutdown.deadline_s
