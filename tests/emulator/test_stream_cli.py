"""``hm-ingest emulator`` with the vehicle stream: flag errors, the JSON line, a clean stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ingest import cli
from ingest.emulator import EmulatorServer
from ingest.emulator import cli as emulator_cli
from ingest.testing.broker import MosquittoBroker, free_port
from ingest.testing.certs import CertBundle
from ingest.testing.daemon import wait_for

APP_ID = "6a1f0c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"


def tls_flags(certs: CertBundle) -> list[str]:
    return [
        "--mqtt-ca", str(certs.ca_file),
        "--mqtt-cert", str(certs.client_cert),
        "--mqtt-key", str(certs.client_key),
    ]  # fmt: skip


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stream-rate", "5"], "--stream-rate needs --mqtt-broker"),
        (["--mqtt-broker", "127.0.0.1:1883"], "--mqtt-broker needs --mqtt-ca, --mqtt-cert"),
        (["--mqtt-broker", "nohost", "--app-id", "a"], "--mqtt-broker must be HOST:PORT"),
        (["--duplicate-rate", "1.5"], "expected a probability from 0 to 1, got '1.5'"),
        (["--bad-rate", "x"], "expected a probability from 0 to 1, got 'x'"),
        (["--stream-rate", "0"], "expected a number of messages/s > 0"),
        (["--stream-format", "v3"], "invalid choice: 'v3'"),
        (["--stream-rate", "5", "--stream-vehicle-rate", "1"], "not allowed with argument"),
        (["--stream-vehicles", "-2"], "expected a whole number >= 0"),
        (["--stream-seed", "0"], "--stream-seed needs --mqtt-broker"),
        (["--app-id", "a", "--stream-paused"], "--app-id, --stream-paused need --mqtt-broker"),
        (["--malformed-rate", "0.1"], "--malformed-rate needs --mqtt-broker"),
        (["--mqtt-no-verify-hostname"], "--mqtt-no-verify-hostname needs --mqtt-broker"),
        (["--malformed-rate", "-0.1"], "expected a probability from 0 to 1, got '-0.1'"),
    ],
)
def test_flag_errors_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, err = run(["emulator", "--state-dir", str(tmp_path), *extra], capsys)
    assert code == 2
    assert message in err


def test_missing_certificate_file_is_named(
    tmp_path: Path, certs: CertBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tls_flags(certs)
    flags[flags.index("--mqtt-key") + 1] = str(tmp_path / "nope.key")
    argv = ["emulator", "--state-dir", str(tmp_path), "--mqtt-broker", "127.0.0.1:1", *flags]
    code, err = run([*argv, "--app-id", APP_ID], capsys)
    assert code == 2
    assert f"--mqtt-key {tmp_path / 'nope.key'}: no such file" in err


def test_malformed_rate_and_hostname_flags_reach_the_stream(
    tmp_path: Path, certs: CertBundle
) -> None:
    base = ["emulator", "--state-dir", str(tmp_path), "--mqtt-broker", "mosquitto:8883"]
    base += [*tls_flags(certs), "--app-id", APP_ID]
    parser = cli.build_parser()
    default = emulator_cli.stream_config_from_args(parser.parse_args(base))
    assert default is not None
    assert (default.settings.malformed_rate, default.broker.verify_hostname) == (0.0, True)
    extra = ["--malformed-rate", "0.25", "--mqtt-no-verify-hostname"]
    changed = emulator_cli.stream_config_from_args(parser.parse_args([*base, *extra]))
    assert changed is not None
    assert (changed.settings.malformed_rate, changed.broker.verify_hostname) == (0.25, False)
    assert changed.settings.to_json()["malformed_rate"] == 0.25


def test_unreachable_broker_exits_1(
    tmp_path: Path, certs: CertBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = f"127.0.0.1:{free_port()}"  # nobody listens there
    argv = ["emulator", "--state-dir", str(tmp_path), "--mqtt-broker", broker, *tls_flags(certs)]
    code, err = run([*argv, "--app-id", APP_ID], capsys)
    assert code == 1
    assert f"cannot connect to the MQTT broker {broker}" in err


def test_json_line_reports_the_stream_and_sigterm_stops_cleanly(
    tmp_path: Path, broker: MosquittoBroker, certs: CertBundle
) -> None:
    argv = [
        sys.executable, "-m", "ingest.cli", "emulator",
        "--state-dir", str(tmp_path / "state"),
        "--mqtt-broker", f"{broker.host}:{broker.port}", *tls_flags(certs),
        "--app-id", APP_ID, "--stream-format", "v2", "--stream-vehicle-rate", "10",
        "--stream-seed", "42", "--stream-vehicles", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        stream = info["stream"]
        assert stream["broker"] == f"{broker.host}:{broker.port}"
        assert (stream["format"], stream["vehicle_rate"], stream["rate"]) == ("v2", 10.0, None)
        assert (stream["seed"], stream["app_id"], stream["paused"]) == (42, APP_ID, False)
        assert stream["url"] == f"{info['admin_url']}/stream"

        def published() -> bool:
            totals = httpx.get(stream["url"], timeout=2).json()["totals"]
            return bool(totals["acked"] >= 10)

        wait_for(published, 20, "the stream to publish")
        counters = httpx.get(stream["url"], timeout=2).json()
        assert sorted(counters["vehicles"]) == ["EMULATED000000000", "EMULATED000000001"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 0, stderr
    assert "Traceback" not in stderr


async def test_admin_stream_endpoint_is_404_without_a_stream(tmp_path: Path) -> None:
    async with EmulatorServer(tmp_path) as server, httpx.AsyncClient() as http:
        assert server.info()["stream"] is None
        response = await http.get(f"{server.admin_url}/stream")
        assert response.status_code == 404
        assert "--mqtt-broker" in response.text
