"""The hm-ingest command line, run as a real subprocess the way an operator or container runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest import __version__, cli
from ingest.errors import SinkError
from ingest.testing.certs import CertBundle

APP_ID = "cli-test-app"
TIMEOUT_S = 60.0


def hm_ingest(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # A clean HM_INGEST_* slate: the developer's own shell settings must not leak into the test.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HM_INGEST_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ingest.cli", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def write_config(
    directory: Path, *, ca_file: Path, cert_file: Path, key_file: Path, extra: str = ""
) -> Path:
    path = directory / "ingest.toml"
    path.write_text(
        f"""
[mqtt]
app_id = "{APP_ID}"
ca_file = "{ca_file}"
cert_file = "{cert_file}"
key_file = "{key_file}"

[output]
path = "out"

[state]
path = "state"
{extra}
""",
        encoding="utf-8",
    )
    return path


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    result = hm_ingest("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"hm-ingest {__version__}"


def test_check_on_a_good_config_exits_zero(tmp_path: Path, certs: CertBundle) -> None:
    config = write_config(
        tmp_path, ca_file=certs.ca_file, cert_file=certs.client_cert, key_file=certs.client_key
    )
    result = hm_ingest("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s)" in result.stdout
    assert "ERROR" not in result.stdout
    # Relative paths in the file were taken relative to it: the folders exist next to it.
    assert (tmp_path / "out").is_dir()
    assert (tmp_path / "state").is_dir()


def test_check_on_a_bad_config_exits_one_and_lists_the_error(
    tmp_path: Path, certs: CertBundle
) -> None:
    config = write_config(
        tmp_path,
        ca_file=certs.ca_file,
        cert_file=certs.expired_client_cert,
        key_file=certs.expired_client_key,
    )
    result = hm_ingest("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    error_lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(error_lines) == 1
    assert "mqtt.cert_file" in error_lines[0]
    assert "expired" in error_lines[0]
    assert "1 error(s)" in result.stdout


def test_check_with_an_invalid_setting_exits_two(tmp_path: Path, certs: CertBundle) -> None:
    config = write_config(
        tmp_path, ca_file=certs.ca_file, cert_file=certs.client_cert, key_file=certs.client_key
    )
    result = hm_ingest(
        "check", "--config", str(config), cwd=tmp_path, env={"HM_INGEST_MQTT_PORT": "x"}
    )
    assert result.returncode == 2
    assert "HM_INGEST_MQTT_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_an_invalid_setting_exits_two_with_one_clear_message(
    tmp_path: Path, certs: CertBundle
) -> None:
    config = write_config(
        tmp_path,
        ca_file=certs.ca_file,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        extra='\n[shutdown]\ndeadline_s = "soon"\n',
    )
    result = hm_ingest("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # One message, naming the key, the variable and the bad value.
    assert result.stderr.count("hm-ingest:") == 1
    assert result.stderr.startswith("hm-ingest: invalid configuration")
    assert "shutdown.deadline_s" in result.stderr
    assert "HM_INGEST_SHUTDOWN_DEADLINE_S" in result.stderr
    assert "'soon'" in result.stderr


def test_run_with_an_unknown_environment_variable_exits_two(tmp_path: Path) -> None:
    result = hm_ingest(
        "run",
        cwd=tmp_path,
        env={"HM_INGEST_MQTT_APP_ID": APP_ID, "HM_INGEST_MQTT_HOSTNAME": "typo"},
    )
    assert result.returncode == 2
    assert "HM_INGEST_MQTT_HOSTNAME" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_missing_certificate_files_exits_two_naming_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "certs"
    config = write_config(
        tmp_path,
        ca_file=missing / "ca.pem",
        cert_file=missing / "client.crt",
        key_file=missing / "client.key",
    )
    result = hm_ingest("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "refusing to start" in result.stderr
    assert "mqtt.ca_file" in result.stderr
    assert str(missing / "ca.pem") in result.stderr
    assert "hm-ingest check" in result.stderr


def test_run_with_no_mqtt_credentials_names_their_variables(tmp_path: Path) -> None:
    result = hm_ingest(
        "run",
        cwd=tmp_path,
        env={
            "HM_INGEST_MQTT_APP_ID": APP_ID,
            "HM_INGEST_OUTPUT_PATH": str(tmp_path / "out"),
            "HM_INGEST_STATE_PATH": str(tmp_path / "state"),
        },
    )
    assert result.returncode == 2
    for variable in (
        "HM_INGEST_MQTT_CA_FILE",
        "HM_INGEST_MQTT_CERT_FILE",
        "HM_INGEST_MQTT_KEY_FILE",
    ):
        assert variable in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_two(tmp_path: Path) -> None:
    result = hm_ingest("check", "--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "absent.toml" in result.stderr
    assert "does not exist" in result.stderr


def test_a_pipeline_failure_inside_the_task_group_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon's tasks fail inside an asyncio TaskGroup, which wraps the error in a group.
    def fail(_: object) -> int:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [SinkError("output disk gone")])

    monkeypatch.setattr(cli, "_cmd_check", fail)
    assert cli.main(["check"]) == cli.EXIT_FAILURE
    stderr = capsys.readouterr().err
    assert "output disk gone" in stderr
    assert "Traceback" not in stderr


def test_a_bug_inside_the_task_group_still_raises_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(_: object) -> int:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [ZeroDivisionError("bug")])

    monkeypatch.setattr(cli, "_cmd_check", fail)
    with pytest.raises(ZeroDivisionError):
        cli.main(["check"])
