"""ingest.preflight: every check against real certificate files and real directories."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingest.config import MIB, Settings, load_settings
from ingest.preflight import (
    EXPIRY_WARNING,
    Finding,
    Level,
    check_fleet,
    check_mqtt_credentials,
    check_replica,
    errors,
    run_checks,
)
from ingest.replica.coordination import Coordinator
from ingest.testing.certs import CertBundle

APP_ID = "preflight-test-app"
# Whole seconds: X.509 validity times have no fractions, so exact boundaries need none either.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
LONG = dt.timedelta(days=365)


# --- a small PKI of our own, for validity windows make_certs does not produce ----------------


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def make_authority(
    directory: Path, *, not_before: dt.datetime, not_after: dt.datetime, name: str = "ca"
) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"preflight {name}"))
        .issuer_name(_name(f"preflight {name}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(cert, key, path)


def make_client(
    directory: Path,
    authority: Authority,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    stem: str = "client",
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(authority.key, hashes.SHA256())
    )
    cert_file = directory / f"{stem}.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, _write_key(directory / f"{stem}.key", key)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return make_authority(tmp_path, not_before=NOW - dt.timedelta(days=1), not_after=NOW + LONG)


# --- helpers -------------------------------------------------------------------------------------


def settings_for(
    tmp_path: Path,
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    **extra: str,
) -> Settings:
    """Settings as a container would set them: through HM_INGEST_* variables."""
    environ = {
        "HM_INGEST_MQTT_APP_ID": APP_ID,
        "HM_INGEST_OUTPUT_PATH": str(tmp_path / "out"),
        "HM_INGEST_STATE_PATH": str(tmp_path / "state"),
    }
    for name, value in (("CA_FILE", ca_file), ("CERT_FILE", cert_file), ("KEY_FILE", key_file)):
        if value is not None:
            environ[f"HM_INGEST_MQTT_{name}"] = str(value)
    environ.update(extra)
    return load_settings(None, environ)


def bundle_settings(tmp_path: Path, certs: CertBundle, **extra: str) -> Settings:
    return settings_for(
        tmp_path,
        ca_file=certs.ca_file,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        **extra,
    )


def at(findings: list[Finding], level: Level, key: str) -> list[Finding]:
    return [f for f in findings if f.level == level and f.key == key]


# --- good credentials ----------------------------------------------------------------------------


def test_make_certs_bundle_has_no_errors(tmp_path: Path, certs: CertBundle) -> None:
    findings = run_checks(bundle_settings(tmp_path, certs))
    assert errors(findings) == []
    assert at(findings, Level.OK, "mqtt.key_file")
    chain = [f for f in findings if f.key == "mqtt.cert_file" and "issued by" in f.message]
    assert [f.level for f in chain] == [Level.OK]
    assert at(findings, Level.OK, "output.path")
    assert at(findings, Level.OK, "state.path")


def test_long_lived_credentials_have_no_warnings(tmp_path: Path, authority: Authority) -> None:
    cert_file, key_file = make_client(
        tmp_path, authority, not_before=NOW - dt.timedelta(days=1), not_after=NOW + LONG
    )
    findings = run_checks(
        settings_for(tmp_path, ca_file=authority.file, cert_file=cert_file, key_file=key_file)
    )
    assert [f for f in findings if f.level != Level.OK] == []
    assert {f.key for f in findings} >= {
        "mqtt.ca_file",
        "mqtt.cert_file",
        "mqtt.key_file",
        "output.path",
        "state.path",
    }


def test_output_and_state_directories_are_created(tmp_path: Path, certs: CertBundle) -> None:
    settings = bundle_settings(tmp_path, certs)
    assert isinstance(settings.output.path, Path)  # a local folder, not an object-store URI
    assert not settings.output.path.exists()
    run_checks(settings)
    assert settings.output.path.is_dir()
    assert settings.state.path.is_dir()
    # The probe file is cleaned up: check leaves nothing behind in the data folders.
    assert list(settings.output.path.iterdir()) == []


# --- missing and unreadable files ----------------------------------------------------------------


def test_unset_files_name_key_and_environment_variable(tmp_path: Path) -> None:
    findings = run_checks(settings_for(tmp_path, ca_file=None, cert_file=None, key_file=None))
    problems = {f.key: f.message for f in errors(findings)}
    assert problems.keys() >= {"mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"}
    assert "HM_INGEST_MQTT_CA_FILE" in problems["mqtt.ca_file"]
    assert "HM_INGEST_MQTT_CERT_FILE" in problems["mqtt.cert_file"]
    assert "HM_INGEST_MQTT_KEY_FILE" in problems["mqtt.key_file"]
    assert "mqtt.ca_file" in str(errors(findings)[0])


def test_nonexistent_files_name_path_key_and_environment_variable(
    tmp_path: Path, certs: CertBundle
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    findings = run_checks(
        settings_for(tmp_path, ca_file=missing, cert_file=certs.client_cert, key_file=None)
    )
    problems = {f.key: f for f in errors(findings)}
    assert set(problems) == {"mqtt.ca_file", "mqtt.key_file"}
    ca_problem = str(problems["mqtt.ca_file"])
    assert str(missing) in ca_problem
    assert "mqtt.ca_file" in ca_problem
    assert "HM_INGEST_MQTT_CA_FILE" in ca_problem


def test_directory_in_place_of_a_file_is_an_error(tmp_path: Path, certs: CertBundle) -> None:
    findings = run_checks(
        settings_for(tmp_path, ca_file=certs.ca_file, cert_file=tmp_path, key_file=certs.client_key)
    )
    assert [f.key for f in errors(findings)] == ["mqtt.cert_file"]


# --- mismatched, expired, not yet valid, foreign -------------------------------------------------


def test_key_not_matching_certificate_is_an_error(tmp_path: Path, certs: CertBundle) -> None:
    findings = run_checks(
        settings_for(
            tmp_path,
            ca_file=certs.ca_file,
            cert_file=certs.client_cert,
            key_file=certs.other_client_key,
        )
    )
    problems = errors(findings)
    assert [f.key for f in problems] == ["mqtt.key_file"]
    assert "does not belong" in problems[0].message
    assert str(certs.client_cert) in problems[0].message


def test_expired_client_certificate_is_an_error(tmp_path: Path, certs: CertBundle) -> None:
    findings = run_checks(
        settings_for(
            tmp_path,
            ca_file=certs.ca_file,
            cert_file=certs.expired_client_cert,
            key_file=certs.expired_client_key,
        )
    )
    problems = errors(findings)
    assert [f.key for f in problems] == ["mqtt.cert_file"]
    assert "expired" in problems[0].message


def test_certificate_expiring_in_ten_days_is_a_warning(
    tmp_path: Path, authority: Authority
) -> None:
    # An hour past ten days so the whole-day count is 10 however long the check takes to run.
    expiry = NOW + dt.timedelta(days=10, hours=1)
    cert_file, key_file = make_client(
        tmp_path, authority, not_before=NOW - dt.timedelta(days=1), not_after=expiry
    )
    findings = run_checks(
        settings_for(tmp_path, ca_file=authority.file, cert_file=cert_file, key_file=key_file)
    )
    assert errors(findings) == []
    warnings = [f for f in findings if f.level == Level.WARN]
    assert [f.key for f in warnings] == ["mqtt.cert_file"]
    assert "expires in 10 day(s)" in warnings[0].message
    assert f"{expiry:%Y-%m-%d}" in warnings[0].message


def test_expiry_warning_threshold_is_exclusive(tmp_path: Path, authority: Authority) -> None:
    expiry = NOW + LONG
    cert_file, key_file = make_client(
        tmp_path, authority, not_before=NOW - dt.timedelta(days=1), not_after=expiry
    )
    settings = settings_for(
        tmp_path, ca_file=authority.file, cert_file=cert_file, key_file=key_file
    )

    def cert_levels(now: dt.datetime) -> list[Level]:
        return [
            f.level
            for f in check_mqtt_credentials(settings, now=now)
            if f.key == "mqtt.cert_file" and "issued by" not in f.message
        ]

    assert cert_levels(expiry - EXPIRY_WARNING) == [Level.OK]
    assert cert_levels(expiry - EXPIRY_WARNING + dt.timedelta(seconds=1)) == [Level.WARN]
    assert cert_levels(expiry + dt.timedelta(seconds=1)) == [Level.ERROR]


def test_certificate_not_yet_valid_is_an_error(tmp_path: Path, authority: Authority) -> None:
    start = NOW + dt.timedelta(days=3)
    cert_file, key_file = make_client(tmp_path, authority, not_before=start, not_after=NOW + LONG)
    findings = run_checks(
        settings_for(tmp_path, ca_file=authority.file, cert_file=cert_file, key_file=key_file)
    )
    problems = errors(findings)
    assert [f.key for f in problems] == ["mqtt.cert_file"]
    assert "not valid before" in problems[0].message
    assert f"{start:%Y-%m-%d}" in problems[0].message


def test_expired_authority_is_an_error_on_ca_file(tmp_path: Path) -> None:
    old_ca = make_authority(
        tmp_path, not_before=NOW - 2 * LONG, not_after=NOW - dt.timedelta(days=1)
    )
    cert_file, key_file = make_client(
        tmp_path, old_ca, not_before=NOW - dt.timedelta(days=1), not_after=NOW + LONG
    )
    findings = run_checks(
        settings_for(tmp_path, ca_file=old_ca.file, cert_file=cert_file, key_file=key_file)
    )
    problems = errors(findings)
    assert [f.key for f in problems] == ["mqtt.ca_file"]
    assert "expired" in problems[0].message


def test_certificate_from_another_ca_is_a_warning(tmp_path: Path, certs: CertBundle) -> None:
    findings = run_checks(
        settings_for(
            tmp_path,
            ca_file=certs.ca_file,
            cert_file=certs.other_client_cert,
            key_file=certs.other_client_key,
        )
    )
    assert errors(findings) == []
    chain = [f for f in at(findings, Level.WARN, "mqtt.cert_file") if "not issued" in f.message]
    assert len(chain) == 1
    assert "mqtt.ca_file" in chain[0].message


def test_other_ca_in_a_multi_certificate_ca_file_is_found(
    tmp_path: Path, certs: CertBundle
) -> None:
    combined = tmp_path / "both-cas.pem"
    combined.write_bytes(certs.ca_file.read_bytes() + certs.other_ca_file.read_bytes())
    findings = run_checks(
        settings_for(
            tmp_path,
            ca_file=combined,
            cert_file=certs.other_client_cert,
            key_file=certs.other_client_key,
        )
    )
    assert errors(findings) == []
    assert [f for f in findings if "not issued" in f.message] == []
    assert any("2 certificate(s)" in f.message for f in at(findings, Level.OK, "mqtt.ca_file"))


# --- unparseable files ---------------------------------------------------------------------------

GARBAGE = b"this is not PEM at all\n"


@pytest.mark.parametrize("which", ["ca_file", "cert_file", "key_file"])
def test_garbage_pem_is_an_error_on_that_key(tmp_path: Path, certs: CertBundle, which: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(GARBAGE)
    files = {"ca_file": certs.ca_file, "cert_file": certs.client_cert, "key_file": certs.client_key}
    files[which] = garbage
    findings = run_checks(
        settings_for(
            tmp_path,
            ca_file=files["ca_file"],
            cert_file=files["cert_file"],
            key_file=files["key_file"],
        )
    )
    problems = errors(findings)
    assert [f.key for f in problems] == [f"mqtt.{which}"]
    assert str(garbage) in problems[0].message


def test_certificate_given_as_the_key_is_an_error(tmp_path: Path, certs: CertBundle) -> None:
    findings = run_checks(
        settings_for(
            tmp_path, ca_file=certs.ca_file, cert_file=certs.client_cert, key_file=certs.client_cert
        )
    )
    problems = errors(findings)
    assert [f.key for f in problems] == ["mqtt.key_file"]
    assert "private key" in problems[0].message


def test_encrypted_key_is_an_error(tmp_path: Path, certs: CertBundle) -> None:
    key = serialization.load_pem_private_key(certs.client_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    findings = run_checks(
        settings_for(
            tmp_path, ca_file=certs.ca_file, cert_file=certs.client_cert, key_file=encrypted
        )
    )
    problems = errors(findings)
    assert [f.key for f in problems] == ["mqtt.key_file"]
    assert "unencrypted" in problems[0].message


# --- directories and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "variable"), [("output.path", "OUTPUT_PATH"), ("state.path", "STATE_PATH")]
)
def test_unwritable_directory_is_an_error(
    tmp_path: Path, certs: CertBundle, key: str, variable: str
) -> None:
    # Tests run as root, where chmod does not stop writes; a path under a regular file cannot
    # be created by anyone (ENOTDIR).
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a directory")
    target = blocker / "sub"
    settings = bundle_settings(tmp_path, certs, **{f"HM_INGEST_{variable}": str(target)})
    problems = errors(run_checks(settings))
    assert [f.key for f in problems] == [key]
    assert str(target) in problems[0].message
    assert "not writable" in problems[0].message
    assert f"HM_INGEST_{variable}" in problems[0].message


@pytest.mark.parametrize(
    ("max_bytes", "segment_bytes", "fails"),
    [
        (MIB, MIB, True),
        (2 * MIB - 1, MIB, True),
        (2 * MIB, MIB, False),
        (512 * MIB, 16 * MIB, False),
    ],
)
def test_log_cap_must_hold_two_segments(
    tmp_path: Path, certs: CertBundle, max_bytes: int, segment_bytes: int, fails: bool
) -> None:
    settings = bundle_settings(
        tmp_path,
        certs,
        HM_INGEST_STATE_LOG_MAX_BYTES=str(max_bytes),
        HM_INGEST_STATE_LOG_SEGMENT_BYTES=str(segment_bytes),
    )
    problems = errors(run_checks(settings))
    assert [f.key for f in problems] == (["state.log_max_bytes"] if fails else [])


def test_finding_renders_level_key_and_message() -> None:
    finding = Finding(Level.ERROR, "mqtt.ca_file", "something is wrong")
    assert str(finding) == "ERROR mqtt.ca_file: something is wrong"
    assert str(Finding(Level.OK, "k.k", "fine")).startswith("OK    k.k: ")


def _fleet_settings(
    tmp_path: Path, fleet: dict[str, object], **sections: dict[str, object]
) -> Settings:
    tree: dict[str, dict[str, object]] = {"mqtt": {"app_id": "app"}, "fleet": fleet, **sections}
    return Settings.model_validate(tree)


def test_fleet_checks_are_silent_when_the_loop_is_off(tmp_path: Path) -> None:
    assert list(check_fleet(_fleet_settings(tmp_path, {}))) == []


def test_a_fleet_file_without_the_loop_is_a_warning(tmp_path: Path) -> None:
    [finding] = check_fleet(_fleet_settings(tmp_path, {"file": str(tmp_path / "f.csv")}))
    assert (finding.level, finding.key) == (Level.WARN, "fleet.file")
    assert "HM_INGEST_FLEET_ENABLED" in finding.message


def test_the_loop_without_credentials_or_with_a_bad_fleet_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.csv"
    bad.write_text("vin,brand\nNOTAVIN,sandbox\n")
    findings = list(check_fleet(_fleet_settings(tmp_path, {"enabled": True, "file": str(bad)})))
    by_key = {f.key: f for f in findings}
    assert by_key["api.client_id"].level == Level.ERROR
    assert by_key["fleet.file"].level == Level.ERROR
    assert "NOTAVIN" in by_key["fleet.file"].message
    assert by_key["webhook.secret"].level == Level.WARN


def test_a_complete_fleet_configuration_passes(tmp_path: Path) -> None:
    good = tmp_path / "fleet.csv"
    good.write_text("vin,brand\nSBXGATE0000000010,sandbox\n")
    settings = _fleet_settings(
        tmp_path,
        {"enabled": True, "file": str(good)},
        api={"client_id": "id", "client_secret": "secret"},
        webhook={"secret": "whsec"},
    )
    findings = list(check_fleet(settings))
    assert [f.level for f in findings] == [Level.OK, Level.OK]
    assert "1 vehicle(s)" in findings[1].message


# --- [replica]: the coordination database --------------------------------------------------------

LEASE_S = 15.0


def _replica_settings(tmp_path: Path, coordination: str, replica: str = "r0") -> Settings:
    return Settings.model_validate(
        {
            "mqtt": {"app_id": "app"},
            # run_checks creates both folders: keep them out of the working directory.
            "output": {"path": str(tmp_path / "out")},
            "state": {"path": str(tmp_path / "state")},
            "replica": {"id": replica, "coordination": coordination, "lease_s": LEASE_S},
        }
    )


def _member(url: str, replica: str, *, lease_s: float = LEASE_S, ago_s: float = 0.0) -> None:
    """``replica`` joins (its clock ``ago_s`` in the past) and leaves its row behind."""
    with Coordinator.open(
        url, replica=replica, lease_s=lease_s, clock=lambda: time.time() - ago_s
    ) as member:
        assert member.try_join()


def _rows(url: str) -> dict[str, float]:
    with Coordinator.open(url, replica="reader", lease_s=LEASE_S) as reader:
        return {m.replica: m.expires_at for m in reader.members()}


def test_replica_checks_are_silent_for_a_single_daemon(tmp_path: Path) -> None:
    settings = _replica_settings(tmp_path, "", replica="")
    assert list(check_replica(settings)) == []
    assert not [f for f in run_checks(settings) if f.key.startswith("replica.")]


def test_coordination_reports_leader_live_and_lost_members_without_joining(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/c.sqlite3"
    _member(url, "r1")
    _member(url, "r2")
    _member(url, "r3", ago_s=2 * LEASE_S)  # its lease ran out: lost, not yet adopted
    with Coordinator.open(url, replica="r1", lease_s=LEASE_S) as r1:
        assert r1.try_lead()
    rows = _rows(url)

    findings = list(check_replica(_replica_settings(tmp_path, url)))

    [finding] = findings
    assert (finding.level, finding.key) == (Level.OK, "replica.coordination")
    assert "leader r1" in finding.message
    assert "2 live member(s): r1, r2" in finding.message
    assert "1 lost, awaiting adoption: r3" in finding.message
    assert _rows(url) == rows  # no membership row written or renewed for r0


def test_an_empty_coordination_database_has_no_leader_yet(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.sqlite3"
    [finding] = check_replica(_replica_settings(tmp_path, url))
    assert finding.level == Level.OK
    assert finding.message.endswith("no leader yet; 0 live member(s)")
    assert _rows(url) == {}


def test_another_live_member_with_this_id_is_a_warning(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.sqlite3"
    _member(url, "r0")
    _member(url, "r1")
    rows = _rows(url)

    findings = list(check_replica(_replica_settings(tmp_path, url, "r0")))

    assert [f.level for f in at(findings, Level.OK, "replica.coordination")] == [Level.OK]
    [warning] = at(findings, Level.WARN, "replica.id")
    assert "'r0' is already a live member" in warning.message
    assert "HM_INGEST_REPLICA_ID" in warning.message
    assert _rows(url) == rows  # the other r0's lease is left exactly as it was
    # A lost member with this id is the normal restart after a crash: no warning.
    _member(url, "r9", ago_s=2 * LEASE_S)
    restarted = list(check_replica(_replica_settings(tmp_path, url, "r9")))
    assert at(restarted, Level.WARN, "replica.id") == []


def _vin_settings(tmp_path: Path, url: str, protocol: str = "3.1.1") -> Settings:
    """Replica r0 of a VIN-sharded group r0, r1 coordinated through ``url``."""
    return Settings.model_validate(
        {
            "mqtt": {"app_id": "app", "protocol": protocol},
            "output": {"path": str(tmp_path / "out")},
            "state": {"path": str(tmp_path / "state")},
            "fleet": {"enabled": True},
            "replica": {
                "id": "r0",
                "coordination": url,
                "mode": "vin",
                "members": ["r0", "r1"],
            },
        }
    )


def test_vin_mode_reports_the_groups_list_held_filters_and_disagreements(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.sqlite3"
    settings = _vin_settings(tmp_path, url)
    _member(url, "r1")
    with Coordinator.open(url, replica="r1", lease_s=LEASE_S) as r1:
        r1.record_subscribed("r1", ["live/level13/app/V1/#", "live/level13/app/V2/#"])
    [ok] = at(list(check_replica(settings)), Level.OK, "replica.members")
    assert "VIN-sharded over 2 member(s) (r0,r1, this replica's list)" in ok.message
    assert "2 topic filter(s) held by 1 session(s)" in ok.message
    assert at(list(check_replica(settings)), Level.WARN, "replica.members") == []

    # The leader runs with a third member: the group follows its list.
    _member(url, "r7")
    with Coordinator.open(url, replica="r1", lease_s=LEASE_S) as r1:
        assert r1.try_lead()
        assert r1.publish_members(["r0", "r1", "r2"])
    findings = list(check_replica(settings))
    [ok] = at(findings, Level.OK, "replica.members")
    assert "(r0,r1,r2, the leader's list)" in ok.message
    differs, stranger = at(findings, Level.WARN, "replica.members")
    assert "replica.members r0,r1 differs from the group's list r0,r1,r2" in differs.message
    assert "live member(s) r7 are not in the member list" in stranger.message


def test_vin_mode_says_who_takes_the_v2_envelopes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.sqlite3"

    def settings(protocol: str) -> Settings:
        return _vin_settings(tmp_path, url, protocol)

    [one_owner] = at(list(check_replica(settings("3.1.1"))), Level.OK, "mqtt.protocol")
    assert "all go to one replica" in one_owner.message
    assert "set [mqtt] protocol = '5'" in one_owner.message

    with Coordinator.open(url, replica="r0", lease_s=LEASE_S) as r0:
        assert r0.try_lead()
        assert r0.publish_members(["r0", "r1"])
        r0.record_subscribed("r0", ["v2-envelopes:1-1", "live/level13/app/V1/#"])
        r0.record_subscribed("r1", ["v2-envelopes:1-1"])
    [spread] = at(list(check_replica(settings("5"))), Level.OK, "mqtt.protocol")
    assert "spread by VIN: every member of list 1" in spread.message
    [ok] = at(list(check_replica(settings("5"))), Level.OK, "replica.members")
    assert "1 topic filter(s) held by 1 session(s)" in ok.message, "rules are not filters"

    with Coordinator.open(url, replica="r0", lease_s=LEASE_S) as r0:
        assert r0.publish_members(["r0", "r1", "r2"])
        r0.replace_subscribed("r0", ["v2-envelopes:1-1"], ["v2-envelopes:1-2"])
    [settling] = at(list(check_replica(settings("5"))), Level.WARN, "mqtt.protocol")
    assert "(list 2) and r1, r2 do not take V2 envelopes by it yet" in settling.message


@pytest.mark.parametrize(
    ("coordination", "expected"),
    [
        ("sqlite:///{tmp}/missing/c.sqlite3", "does not exist"),
        ("sqlite://relative.sqlite3", "not an absolute SQLite path"),
        ("mysql://db.internal/hm", "unsupported database"),
        # Port 1: nothing listens, so the connection is refused at once.
        ("postgresql://hm:s3cret@127.0.0.1:1/hm", "cannot use the coordination database"),
    ],
)
def test_an_unusable_coordination_database_is_an_error(
    tmp_path: Path, coordination: str, expected: str
) -> None:
    if coordination.startswith("postgresql"):
        pytest.importorskip("psycopg", reason="psycopg 3 is not installed (extra 'postgres')")
    settings = _replica_settings(tmp_path, coordination.format(tmp=tmp_path))

    findings = run_checks(settings)

    [finding] = [f for f in findings if f.key.startswith("replica.")]
    assert (finding.level, finding.key) == (Level.ERROR, "replica.coordination")
    assert expected in finding.message
    assert "s3cret" not in finding.message  # the password is masked
    assert finding in errors(findings)
