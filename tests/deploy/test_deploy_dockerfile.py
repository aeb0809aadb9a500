"""deploy/Dockerfile and .dockerignore, checked by parsing (no Docker here), and its HEALTHCHECK
command run for real against the daemon's HTTP server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import yaml
from prometheus_client import CollectorRegistry

from ingest.config import Settings
from ingest.health import STALE_AFTER_S, HealthState
from ingest.http import build_app, serve
from ingest.metrics import Metrics
from ingest.testing.broker import free_port
from tests.deploy.support import K8S, REPO, assert_env_is_valid, dockerfile, final_stage

INSTRUCTIONS = dockerfile()
FINAL = final_stage(INSTRUCTIONS)


def _args(keyword: str, instructions: list[tuple[str, str]] = FINAL) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args("ENV"):
        for pair in args.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_multi_stage_build_on_slim_python_311() -> None:
    stages = _args("FROM", INSTRUCTIONS)
    assert len(stages) >= 2
    assert all(" AS " in stage for stage in stages)
    base = [args for kw, args in INSTRUCTIONS if kw == "ARG" and args.startswith("PYTHON_IMAGE=")]
    assert base == ["PYTHON_IMAGE=python:3.11-slim-bookworm"]
    # The runtime stage takes only the built virtual environment from the build stage.
    copies = _args("COPY")
    assert copies == ["--from=build /opt/hm-ingest /opt/hm-ingest"]


def test_runs_as_the_same_non_root_user_as_the_kubernetes_pod() -> None:
    (user,) = _args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    # The user the image creates and hands the volumes to is the one it runs as.
    run = " ".join(_args("RUN"))
    assert f"--uid {uid} --gid {gid}" in run
    assert f"chown {uid}:{gid} " in run
    statefulset = yaml.safe_load((K8S / "base" / "statefulset.yaml").read_text(encoding="utf-8"))
    pod = statefulset["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (int(uid), int(gid), int(gid))
    compose = (REPO / "deploy" / "compose.yaml").read_text(encoding="utf-8")
    assert f"chown {uid}:{gid} /certs/client.key" in compose


def test_read_only_root_needs_only_the_declared_volumes_and_tmp() -> None:
    env = _env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    (workdir,) = _args("WORKDIR")
    (volumes,) = _args("VOLUME")
    defaults = Settings.model_validate({"mqtt": {"app_id": "x"}})
    declared = json.loads(volumes)
    # The daemon's default ./state and ./data, resolved against WORKDIR, are the volumes.
    assert f"{workdir}/{defaults.state.path}" in declared
    assert f"{workdir}/{defaults.output.path}" in declared
    run = " ".join(_args("RUN"))
    for path in declared:
        assert path in run, f"{path} must exist in the image, owned by the daemon's user"


def test_environment_names_real_settings() -> None:
    assert_env_is_valid(_env(), "deploy/Dockerfile")


def test_stop_signal_port_and_entrypoint() -> None:
    assert _args("STOPSIGNAL") == ["SIGTERM"]
    default_port = Settings.model_validate({"mqtt": {"app_id": "x"}}).metrics.host_port[1]
    assert _args("EXPOSE") == [str(default_port)]
    assert json.loads(_args("ENTRYPOINT")[0]) == ["hm-ingest"]
    assert json.loads(_args("CMD")[0]) == ["run"]


def test_build_context_holds_exactly_what_the_build_copies() -> None:
    sources = [
        part
        for args in _args("COPY", INSTRUCTIONS)
        if not args.startswith("--from")
        for part in args.split()[:-1]
    ]
    assert set(sources) == {"pyproject.toml", "README.md", "schemas", "ingest"}
    for source in sources:
        assert (REPO / source).exists(), source
    # ingest/_schemas points into schemas/, which must be copied too.
    assert os.readlink(REPO / "ingest" / "_schemas") == "../schemas"
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[ignore.index("*") :].count("*") == 1, "everything is excluded first"
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = _args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[0] == "python", "the slim image has no curl or wget"
    return [sys.executable, *argv[1:]]


async def _probe(port: int) -> int:
    env = {**os.environ, "HM_INGEST_METRICS_LISTEN": f"127.0.0.1:{port}"}
    process = await asyncio.create_subprocess_exec(
        *_healthcheck_argv(),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_healthcheck_command_follows_the_liveness_probe() -> None:
    health = HealthState()
    app = build_app(Metrics(CollectorRegistry()), health)
    async with serve(app, "127.0.0.1", free_port()) as port:
        assert await _probe(port) == 0
        # An event loop that stopped beating: /healthz answers 503 and the check must fail.
        health.loop_beat = time.monotonic() - STALE_AFTER_S - 1
        assert await _probe(port) != 0
    # Nothing listening: fails too.
    assert await _probe(port) != 0
