"""No secret reaches a log line, even at DEBUG in JSON (what containers run with).

Real processes, real settings: `hm-ingest run` against a real Mosquitto, with the fleet control
loop on and the HM API pointed at the emulator (so the client secret is used and tokens are
issued), a signed webhook ping from the emulator, and `hm-ingest check` plus a rejected
configuration; the secrets are set through HM_INGEST_* variables as deploy/ sets them.
tests/test_logs.py covers the redaction filter itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx

from ingest.emulator.app import EmulatorServer
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import APP_ID, daemon_config, wait_ready, write_toml
from ingest.testing.traffic import stream

# Recognisable and not token-shaped: only SecretStr, not the redacting filter, can hide them.
API_SECRET_SUFFIX = "-api-secret-7c1f"
WEBHOOK_SECRET_SUFFIX = "-webhook-secret-a93e"
# What an access token the emulator issues looks like (a JWT): none may reach the log.
JWT_SHAPE = re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}")


def _pem_body(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("-----")]


def _base_env(secrets: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HM_INGEST_")}
    return {**env, **secrets}


async def _cli(*argv: str, env: dict[str, str], timeout_s: float = 60) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.cli", "--log-level", "DEBUG", "--log-format", "json", *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def _assert_clean(output: str, secrets: list[str]) -> None:
    assert output.strip(), "the process logged nothing: the test would prove nothing"
    for secret in secrets:
        assert secret not in output


async def test_daemon_at_debug_logs_no_secret(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    tree = daemon_config(broker, certs, tmp_path)
    port = int(tree["metrics"]["listen"].rpartition(":")[2])
    async with EmulatorServer(tmp_path / "emulator") as emulator:
        # The emulator's own secrets, so that they are used for real: tokens, signatures.
        creds = emulator.emulator.creds
        secrets = [creds.client_secret, creds.webhook_secret]
        env = _base_env(
            {
                "HM_INGEST_FLEET_ENABLED": "true",
                "HM_INGEST_API_BASE_URL": emulator.base_url,
                "HM_INGEST_API_CLIENT_ID": creds.client_id,
                "HM_INGEST_API_CLIENT_SECRET": creds.client_secret,
                "HM_INGEST_WEBHOOK_SECRET": creds.webhook_secret,
            }
        )
        config = write_toml(tree, tmp_path / "hm-ingest.toml")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingest.cli", "--log-level", "DEBUG", "--log-format", "json",
            "run", "--config", str(config),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            await asyncio.to_thread(wait_ready, tree)

            def traffic() -> None:
                with Publisher(broker, certs) as publisher:
                    publisher.publish_many(
                        (m.topic, m.payload) for m in stream(APP_ID, 50, invalid_fraction=0.1)
                    )

            await asyncio.to_thread(traffic)
            # A signed webhook ping to the daemon, answered before the daemon stops.
            async with httpx.AsyncClient(timeout=10) as client:
                await client.put(
                    f"{emulator.admin_url}/webhook",
                    json={"url": f"http://127.0.0.1:{port}/webhook"},
                )
                answers: list[str] = []
                for _ in range(200):
                    deliveries = await client.get(f"{emulator.admin_url}/webhook/deliveries")
                    answers = [a for d in deliveries.json() for a in d["attempts"]]
                    if answers:
                        break
                    await asyncio.sleep(0.05)
            # 200: the daemon checked the signature with the webhook secret and accepted it.
            assert answers == ["200"]
            process.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    output = out.decode(errors="replace")
    assert process.returncode == 0, output
    assert '"level":"debug"' in output.replace(" ", "")
    _assert_clean(output, [*secrets, *_pem_body(certs.client_key)])
    assert not JWT_SHAPE.search(output)


async def test_check_and_a_rejected_configuration_log_no_secret(
    certs: CertBundle, tmp_path: Path
) -> None:
    secrets = {
        "HM_INGEST_API_CLIENT_SECRET": "plain" + API_SECRET_SUFFIX,
        "HM_INGEST_WEBHOOK_SECRET": "plain" + WEBHOOK_SECRET_SUFFIX,
    }
    settings = {
        "HM_INGEST_MQTT_APP_ID": APP_ID,
        "HM_INGEST_MQTT_CA_FILE": str(certs.ca_file),
        "HM_INGEST_MQTT_CERT_FILE": str(certs.client_cert),
        "HM_INGEST_MQTT_KEY_FILE": str(certs.client_key),
        "HM_INGEST_STATE_PATH": str(tmp_path / "state"),
        "HM_INGEST_OUTPUT_PATH": str(tmp_path / "data"),
    }
    code, output = await _cli("check", env=_base_env({**settings, **secrets}))
    assert code == 0, output
    _assert_clean(output, [*secrets.values(), *_pem_body(certs.client_key)])

    # An invalid value elsewhere: the error lists problems but echoes no secret.
    broken = {**settings, **secrets, "HM_INGEST_API_TIMEOUT_S": "-1"}
    code, output = await _cli("run", env=_base_env(broken))
    assert code == 2, output
    assert "HM_INGEST_API_TIMEOUT_S" in output
    _assert_clean(output, list(secrets.values()))
