"""deploy/compose.yaml: valid Compose, and wired to what the code and the other files expect.

Docker does not run on the test machines, so the file is checked against the Compose
specification's JSON schema (check-jsonschema ships it) and cross-checked here; `docker compose
config` runs too where a Docker CLI with the compose plugin exists.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from ingest.cli import build_parser
from ingest.config import Settings, load_settings
from ingest.emulator.cli import stream_config_from_args
from ingest.emulator.stream.runner import extra_vin
from ingest.testing.certs import make_certs
from ingest.topics import v1_topic, v2_topic
from tests.deploy.support import DEPLOY, REPO, assert_env_is_valid, dockerfile, final_stage

COMPOSE = DEPLOY / "compose.yaml"
SERVICES = {"certs", "mosquitto", "emulator", "hm-ingest", "prometheus", "grafana"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target → source of a service's short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def _check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (a dev dependency) is needed")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip


def test_compose_file_matches_the_compose_specification() -> None:
    result = _check_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        COMPOSE.read_text(encoding="utf-8").replace("stop_grace_period:", "stop_grace_periode:"),
        encoding="utf-8",
    )
    assert _check_schema(broken).returncode != 0


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    probe = (
        subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30, check=False)
        if docker
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("no Docker CLI with the compose plugin here; the schema test covers the file")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_stack_has_every_service_and_pinned_images() -> None:
    services = _services()
    assert set(services) == SERVICES
    for name, service in services.items():
        image = service["image"]
        assert ":" in image, f"{name}: pin the image tag"
        assert not image.endswith(":latest"), f"{name}: pin the image tag"
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == REPO
            assert (context / service["build"]["dockerfile"]).is_file()


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(_compose()["volumes"])
    used = set()
    for name, service in _services().items():
        for target, source in _mounts(service).items():
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            assert target.startswith("/"), f"{name}: {target}"
    assert declared == used, f"declared but unused: {declared - used}"


def test_every_hm_ingest_variable_is_a_real_setting_with_a_valid_value() -> None:
    for name, service in _services().items():
        assert_env_is_valid(service.get("environment", {}), f"compose service {name}")


def test_the_env_check_rejects_a_misspelt_setting() -> None:
    with pytest.raises(AssertionError, match="no such setting"):
        assert_env_is_valid({"HM_INGEST_SHUTDOWN_DEADLINE": "20"}, "test")


def _daemon_settings() -> Settings:
    env = _services()["hm-ingest"]["environment"]
    # Interpolated values (${VAR:-default}) as their defaults.
    resolved = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
    return load_settings(None, resolved)


def test_daemon_drains_within_the_stop_grace_period() -> None:
    daemon = _services()["hm-ingest"]
    assert daemon["stop_signal"] == "SIGTERM"
    grace_s = float(daemon["stop_grace_period"].removesuffix("s"))
    assert grace_s >= _daemon_settings().shutdown.deadline_s + 5


def test_daemon_runs_read_only_with_its_state_and_output_on_volumes() -> None:
    workdir = [args for keyword, args in final_stage(dockerfile()) if keyword == "WORKDIR"][-1]
    settings = _daemon_settings()
    for name in ("hm-ingest", "emulator"):
        service = _services()[name]
        assert service["read_only"] is True, name
        assert "/tmp" in service["tmpfs"], name
    mounts = _mounts(_services()["hm-ingest"])
    # Defaults ./state and ./data resolve against the image's WORKDIR.
    for path in (settings.state.path, settings.output.path):
        assert str(Path(workdir) / path) in mounts, f"{path} is not on a volume"


def test_daemon_certificates_are_the_files_the_certs_job_writes(tmp_path: Path) -> None:
    written = {p.name for p in make_certs(tmp_path).directory.iterdir()}
    settings = _daemon_settings()
    mounts = _mounts(_services()["hm-ingest"])
    for path in (settings.mqtt.ca_file, settings.mqtt.cert_file, settings.mqtt.key_file):
        assert path is not None
        assert mounts[str(path.parent)] == "certs"
        assert path.name in written
    assert _mounts(_services()["certs"]) == {"/certs": "certs"}
    # The certs job names the same client key it hands to the daemon's uid.
    command = " ".join(_services()["certs"]["command"])
    assert f"/certs/{settings.mqtt.key_file.name}" in command  # type: ignore[union-attr]


def test_mosquitto_config_matches_the_mounts_and_the_daemon_port(tmp_path: Path) -> None:
    written = {p.name for p in make_certs(tmp_path).directory.iterdir()}
    conf = _mosquitto_directives()
    mosquitto = _services()["mosquitto"]
    mounts = _mounts(mosquitto)
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./mosquitto.conf"
    for key in ("cafile", "certfile", "keyfile"):
        path = Path(conf[key])
        assert mounts[str(path.parent)] == "certs", key
        assert path.name in written, key
    assert conf["listener"] == str(_daemon_settings().mqtt.port)
    assert mounts[conf["persistence_location"].rstrip("/")] == "mosquitto-data"
    assert conf["require_certificate"] == "true"
    assert int(conf["max_queued_messages"]) >= 1_000_000


def _mosquitto_directives() -> dict[str, str]:
    directives = {}
    for line in (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            directives.setdefault(key, value.strip())
    return directives


def test_ports_and_healthchecks_line_up_with_the_daemon() -> None:
    settings = _daemon_settings()
    port = settings.metrics.host_port[1]
    daemon = _services()["hm-ingest"]
    assert daemon["ports"] == [f"127.0.0.1:{port}:{port}"]
    test = daemon["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(test)
    for name in ("emulator", "prometheus", "grafana"):
        assert _services()[name]["healthcheck"]["test"][0] == "CMD", name
    # The emulator runs the daemon's image: it must not inherit a probe of a port it lacks.
    assert "9464" not in " ".join(_services()["emulator"]["healthcheck"]["test"])
    emulator_port = _services()["emulator"]["ports"][0].rsplit(":", 1)[1]
    assert settings.api.base_url == f"http://emulator:{emulator_port}/v1"
    assert f"http://hm-ingest:{port}/webhook" in _services()["emulator"]["command"]


def _emulator_args() -> argparse.Namespace:
    """The emulator service's command as ``hm-ingest`` (the image's ENTRYPOINT) parses it."""
    entrypoint = [args for keyword, args in final_stage(dockerfile()) if keyword == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoint][-1:] == [["hm-ingest"]]
    command = _services()["emulator"]["command"]
    assert all(isinstance(arg, str) for arg in command), "quote numbers: argv items are strings"
    args = build_parser().parse_args(command)
    assert args.command == "emulator"
    return args


def test_emulator_streams_into_the_daemons_broker_under_its_app_id() -> None:
    settings = _daemon_settings().mqtt
    args = _emulator_args()
    assert args.mqtt_broker == f"{settings.host}:{settings.port}", (
        "the emulator must publish to the broker the daemon subscribes on"
    )
    assert args.app_id == settings.app_id
    # The broker keys sessions by client id: the same id would make them cut each other off.
    assert args.mqtt_client_id
    assert args.mqtt_client_id != settings.client_id
    # The throwaway server certificate names localhost, not `mosquitto`, for both clients.
    assert bool(args.mqtt_no_verify_hostname) is not settings.verify_hostname
    # Something streams without the clearance loop (off until credentials are set).
    assert int(args.stream_vehicles or 0) > 0
    depends = _services()["emulator"]["depends_on"]
    assert depends["certs"]["condition"] == "service_completed_successfully"
    assert "mosquitto" in depends


def test_emulator_uses_the_daemons_certificates_from_the_certs_volume() -> None:
    settings = _daemon_settings().mqtt
    args = _emulator_args()
    assert (args.mqtt_ca, args.mqtt_cert, args.mqtt_key) == (
        settings.ca_file,
        settings.cert_file,
        settings.key_file,
    )
    mounts = _mounts(_services()["emulator"])
    for path in (args.mqtt_ca, args.mqtt_cert, args.mqtt_key):
        assert mounts[str(path.parent)] == "certs", f"{path} is not on the certs volume"
    assert "certs:/certs:ro" in _services()["emulator"]["volumes"]


def test_emulator_stream_flags_pass_its_own_checks_and_hit_the_daemons_topic(
    tmp_path: Path,
) -> None:
    """What the emulator checks at start (files exist, rates, app id), with the certificate paths
    mapped to a real set; then its topics against the daemon's subscription."""
    bundle = make_certs(tmp_path)
    args = _emulator_args()
    for name in ("mqtt_ca", "mqtt_cert", "mqtt_key"):
        local = bundle.directory / getattr(args, name).name
        assert local.is_file(), f"the certs job writes no {local.name}"
        setattr(args, name, local)
    config = stream_config_from_args(args)
    assert config is not None
    subscription = _daemon_settings().mqtt.resolved_topic
    stream = config.settings
    v1 = v1_topic(stream.environment, stream.app_id, extra_vin(0), "diagnostics", "speed")
    for topic in (v1, v2_topic(stream.environment, stream.app_id)):
        assert topic_matches_sub(subscription, topic), f"{topic} is not under {subscription}"
