"""Checks that catch a broken deployment before it connects: ``hm-ingest check`` and start-up.

Each check yields a :class:`Finding` naming the setting it is about, what was found and, for a
problem, the fix. ``run`` refuses to start on any error; warnings (a certificate expiring within
30 days) are logged and ``check`` prints them.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ingest.config import MIN_CPUS_FOR_SINK_PROCESS, Settings, env_name
from ingest.cpus import usable_cpus
from ingest.errors import ConfigError, CredentialError, IngestError, SinkError
from ingest.fleet.apiclient import auth_settings
from ingest.fleet.desired import load_desired_fleet
from ingest.replica.coordination import DEFAULT_ROLE, Coordinator, Member, redact_url
from ingest.replica.envelopes import RULE_RECORD, rules_of, uncovered
from ingest.replica.shards import APP_TOPIC_KEY, owner
from ingest.storage import OutputStore

EXPIRY_WARNING = dt.timedelta(days=30)


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper():5} {self.key}: {self.message}"


def _file_finding(key: str, path: Path | None) -> Finding | None:
    section, name = key.split(".")
    if path is None:
        return Finding(
            Level.ERROR, key, f"not set; set [{section}] {name} or {env_name(section, name)}"
        )
    fix = f"fix [{section}] {name} or {env_name(section, name)}"
    if not path.is_file():
        return Finding(Level.ERROR, key, f"{path} does not exist or is not a file; {fix}")
    if not os.access(path, os.R_OK):
        return Finding(Level.ERROR, key, f"{path} is not readable by this user; {fix}")
    return None


def _load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _load_key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def check_mqtt_credentials(settings: Settings, now: dt.datetime | None = None) -> Iterator[Finding]:
    mqtt = settings.mqtt
    now = now or dt.datetime.now(dt.UTC)
    missing = [
        finding
        for finding in (
            _file_finding("mqtt.ca_file", mqtt.ca_file),
            _file_finding("mqtt.cert_file", mqtt.cert_file),
            _file_finding("mqtt.key_file", mqtt.key_file),
        )
        if finding is not None
    ]
    if missing:
        yield from missing
        return
    assert mqtt.ca_file is not None
    assert mqtt.cert_file is not None
    assert mqtt.key_file is not None
    try:
        authorities = _load_certs(mqtt.ca_file)
    except ValueError as exc:
        yield Finding(Level.ERROR, "mqtt.ca_file", f"{mqtt.ca_file} is not PEM certificates: {exc}")
        return
    try:
        certificate = _load_certs(mqtt.cert_file)[0]
    except (ValueError, IndexError) as exc:
        yield Finding(
            Level.ERROR, "mqtt.cert_file", f"{mqtt.cert_file} is not a PEM certificate: {exc}"
        )
        return
    try:
        key = _load_key(mqtt.key_file)
    except (ValueError, TypeError) as exc:
        yield Finding(
            Level.ERROR,
            "mqtt.key_file",
            f"{mqtt.key_file} is not an unencrypted PEM private key: {exc}",
        )
        return
    yield Finding(Level.OK, "mqtt.ca_file", f"{len(authorities)} certificate(s) in {mqtt.ca_file}")

    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        yield Finding(
            Level.ERROR,
            "mqtt.key_file",
            f"{mqtt.key_file} does not belong to {mqtt.cert_file}; use the key downloaded "
            "together with that certificate",
        )
    else:
        yield Finding(Level.OK, "mqtt.key_file", "private key matches the client certificate")

    yield from _expiry(certificate, now, "mqtt.cert_file")
    for authority in authorities:
        yield from (f for f in _expiry(authority, now, "mqtt.ca_file") if f.level != Level.OK)
    yield _chain(certificate, authorities)


def _expiry(certificate: x509.Certificate, now: dt.datetime, key: str) -> Iterator[Finding]:
    subject = certificate.subject.rfc4514_string()
    if certificate.not_valid_after_utc < now:
        yield Finding(
            Level.ERROR,
            key,
            f"certificate {subject!r} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; "
            "download a new one from HM's console",
        )
    elif certificate.not_valid_before_utc > now:
        yield Finding(
            Level.ERROR,
            key,
            f"certificate {subject!r} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d}; check the machine's clock",
        )
    elif certificate.not_valid_after_utc - now < EXPIRY_WARNING:
        days = (certificate.not_valid_after_utc - now).days
        yield Finding(
            Level.WARN,
            key,
            f"certificate {subject!r} expires in {days} day(s) "
            f"({certificate.not_valid_after_utc:%Y-%m-%d}); renew it in HM's console",
        )
    else:
        yield Finding(Level.OK, key, f"valid until {certificate.not_valid_after_utc:%Y-%m-%d}")


def _chain(certificate: x509.Certificate, authorities: list[x509.Certificate]) -> Finding:
    for authority in authorities:
        try:
            certificate.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return Finding(
            Level.OK, "mqtt.cert_file", f"issued by {authority.subject.rfc4514_string()!r}"
        )
    # A warning, not an error: some brokers verify clients with a CA other than the one that
    # signed their own server certificate, and ca_file only has to hold the latter.
    return Finding(
        Level.WARN,
        "mqtt.cert_file",
        "not issued by any certificate in mqtt.ca_file; the broker will refuse it unless it "
        "trusts another CA for clients",
    )


def check_writable(key: str, directory: Path) -> Finding:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".hm-ingest-check-"):
            pass
    except OSError as exc:
        return Finding(
            Level.ERROR,
            key,
            f"{directory} is not writable ({exc.strerror}); mount a writable volume there or "
            f"set {env_name(*key.split('.'))}",
        )
    return Finding(Level.OK, key, f"{directory} is writable")


def check_output(path: Path | str) -> Finding:
    """A local folder must be writable; an object store must take (and delete) an object."""
    if isinstance(path, Path):
        return check_writable("output.path", path)
    try:
        problem = OutputStore.open(path).probe()
    except SinkError as exc:  # the URI itself is unusable: no retry will help
        return Finding(Level.ERROR, "output.path", str(exc))
    if problem is not None:
        # Possibly an outage: `run` still starts, logs what arrives and pauses acks at the log
        # cap until the store is back (or its credentials are fixed).
        return Finding(Level.WARN, "output.path", problem)
    return Finding(Level.OK, "output.path", f"{path} accepts and deletes objects")


def check_topic(settings: Settings) -> Finding:
    mqtt = settings.mqtt
    if "{app_id}" in mqtt.topic and not mqtt.app_id:
        return Finding(
            Level.ERROR,
            "mqtt.app_id",
            "empty, but the topic uses {app_id}; set it (environment HM_INGEST_MQTT_APP_ID) to the "
            "application id from HM's console",
        )
    return Finding(Level.OK, "mqtt.topic", f"subscribing to {mqtt.resolved_topic}")


def check_sink(settings: Settings) -> Finding:
    """Where the sink will run, and why (``[ingest] sink``)."""
    ingest = settings.ingest
    mode = ingest.sink_mode
    if ingest.sink != "auto":
        return Finding(Level.OK, "ingest.sink", f"on a {mode} (set explicitly)")
    cpus = usable_cpus()
    return Finding(
        Level.OK,
        "ingest.sink",
        f"on a {mode}: auto, with {cpus:g} usable CPU(s) (a process from "
        f"{MIN_CPUS_FOR_SINK_PROCESS:g})",
    )


def check_fleet(settings: Settings) -> Iterator[Finding]:
    """The control loop's credentials and desired-fleet file, checked before any API call."""
    fleet = settings.fleet
    if not fleet.enabled:
        if fleet.file is not None:
            yield Finding(
                Level.WARN,
                "fleet.file",
                "set, but [fleet] enabled is false: the control loop is off and the file is not "
                "read; set enabled = true (HM_INGEST_FLEET_ENABLED) to keep the fleet in sync",
            )
        return
    try:
        auth = auth_settings(settings.api)
        if auth.auth != "client_credentials":
            auth.load_key()
    except ConfigError as exc:
        yield Finding(Level.ERROR, exc.key or "api", str(exc))
    except CredentialError as exc:
        yield Finding(Level.ERROR, "api.private_key_file", str(exc))
    else:
        yield Finding(Level.OK, "api.auth", f"{auth.auth} credentials present")
    if fleet.file is None:
        yield Finding(Level.OK, "fleet.file", "not set: observe-only (nothing is requested)")
    else:
        try:
            desired = load_desired_fleet(fleet.file)
        except ConfigError as exc:
            yield Finding(Level.ERROR, "fleet.file", str(exc))
        else:
            yield Finding(Level.OK, "fleet.file", f"{len(desired)} vehicle(s) in {fleet.file}")
    if not settings.webhook.secret.get_secret_value():
        yield Finding(
            Level.WARN,
            "webhook.secret",
            "empty: HM's fleet_clearance_changed webhooks will be refused (401) and clearance "
            "changes are seen only every fleet.interval_s; set it to the console's webhook secret",
        )


def check_replica(settings: Settings) -> Iterator[Finding]:
    """The coordination database opens, and no live member already uses this replica's id.

    Reads only: no membership row is written, so running ``check`` next to a live group (or
    before ``run`` starts) changes nobody's view of who is alive. Opening it creates the tables
    if missing, as the first replica would.
    """
    replica = settings.replica
    if not replica.enabled:
        return
    url = replica.coordination.get_secret_value()
    try:
        coordinator = Coordinator.open(url, replica=replica.id, lease_s=replica.lease_s)
    except ConfigError as exc:
        yield Finding(Level.ERROR, exc.key or "replica.coordination", str(exc))
        return
    try:
        with coordinator:
            members = coordinator.members()
            leader = coordinator.leader(DEFAULT_ROLE)
            held = coordinator.subscriptions() if replica.vin_sharded else {}
            lists = coordinator.member_lists() if replica.vin_sharded else {}
    except IngestError as exc:  # opened, then the reads failed (a dropped connection)
        yield Finding(Level.ERROR, "replica.coordination", str(exc))
        return
    yield Finding(
        Level.OK, "replica.coordination", f"{redact_url(url)}: {_group_summary(members, leader)}"
    )
    if replica.vin_sharded:
        published = lists[max(lists)] if lists else None
        yield from _vin_mode_findings(replica.members, published, members, held)
        yield _envelope_finding(settings, lists, held)
    same = [m for m in members if m.alive and m.replica == replica.id]
    if same:
        # Two pods with one id share one MQTT client id: the broker disconnects each in turn
        # ("session taken over") and they fight over one persistent session. It is also what a
        # restart within lease_s of the previous run looks like, hence a warning, not an error.
        left_s = max(0.0, same[0].expires_at - time.time())
        yield Finding(
            Level.WARN,
            "replica.id",
            f"{replica.id!r} is already a live member (its lease has {left_s:.0f} s left): "
            "another running replica uses this id, or this replica restarted less than "
            f"replica.lease_s ({replica.lease_s:g} s) ago; two replicas with one id fight over "
            "one MQTT session, so give each its own [replica] id (HM_INGEST_REPLICA_ID; on "
            "Kubernetes the StatefulSet pod name)",
        )


def _vin_mode_findings(
    configured: list[str],
    published: list[str] | None,
    members: list[Member],
    held: dict[str, set[str]],
) -> Iterator[Finding]:
    group = configured if published is None else published
    filters = {f: holders for f, holders in held.items() if not f.startswith(RULE_RECORD)}
    sessions = {replica for holders in filters.values() for replica in holders}
    yield Finding(
        Level.OK,
        "replica.members",
        f"VIN-sharded over {len(group)} member(s) ({','.join(group)}, "
        f"{'this replica' if published is None else 'the leader'}'s list); {len(filters)} topic "
        f"filter(s) held by {len(sessions)} session(s)",
    )
    if published is not None and published != configured:
        # Every replica follows the leader's list, so this is a rolling change in progress or
        # a forgotten replica: its own list takes effect only once it leads.
        yield Finding(
            Level.WARN,
            "replica.members",
            f"replica.members {','.join(configured)} differs from the group's list "
            f"{','.join(published)} (the leader's): finish the change on every replica "
            "(HM_INGEST_REPLICA_MEMBERS); VINs that change owner reach two replicas meanwhile "
            "and each of their messages costs a claim in the coordination database",
        )
    strangers = sorted({m.replica for m in members if m.alive} - set(group))
    if strangers:
        yield Finding(
            Level.WARN,
            "replica.members",
            f"live member(s) {', '.join(strangers)} are not in the member list {group}: they "
            "own no VIN until a leader publishes a list with them",
        )


def _envelope_finding(
    settings: Settings, lists: dict[int, list[str]], held: dict[str, set[str]]
) -> Finding:
    """Who takes the V2 envelopes, and whether a member-list change is still settling."""
    if not settings.spreads_envelopes:
        group = lists[max(lists)] if lists else settings.replica.members
        return Finding(
            Level.OK,
            "mqtt.protocol",
            f"V2 envelopes (if the application streams V2) all go to one replica, "
            f"{owner(APP_TOPIC_KEY, group)}, the V2 topic's owner: under MQTT 3.1.1 their topic "
            "cannot be split; set [mqtt] protocol = '5' to spread them by VIN",
        )
    rules = rules_of(held)
    if not lists:
        return Finding(
            Level.OK, "mqtt.protocol", "V2 envelopes spread by VIN once a leader publishes a list"
        )
    epoch = max(lists)
    waiting = uncovered(epoch, lists[epoch], rules)
    if not waiting:
        return Finding(
            Level.OK,
            "mqtt.protocol",
            f"V2 envelopes spread by VIN: every member of list {epoch} takes its VINs' share",
        )
    return Finding(
        Level.WARN,
        "mqtt.protocol",
        f"the member list changed (list {epoch}) and {', '.join(waiting)} do not take V2 "
        "envelopes by it yet: until they do, every session also keeps the envelopes the older "
        "list gives it, and moved VINs' envelopes are claimed in the coordination database "
        "before they are written (start the replicas listed, or finish the rolling change)",
    )


def _group_summary(members: list[Member], leader: str | None) -> str:
    live = [m.replica for m in members if m.alive]
    lost = [m.replica for m in members if not m.alive]
    parts = [
        f"leader {leader}" if leader else "no leader yet",
        f"{len(live)} live member(s)" + (f": {', '.join(live)}" if live else ""),
    ]
    if lost:
        # Expired rows are replicas presumed lost whose sessions the leader has not adopted yet.
        parts.append(f"{len(lost)} lost, awaiting adoption: {', '.join(lost)}")
    return "; ".join(parts)


def run_checks(settings: Settings) -> list[Finding]:
    findings = [check_topic(settings), *check_mqtt_credentials(settings), *check_fleet(settings)]
    findings.extend(check_replica(settings))
    findings.append(check_output(settings.output.path))
    findings.append(check_sink(settings))
    findings.append(check_writable("state.path", settings.state.path))
    if settings.state.log_max_bytes < 2 * settings.state.log_segment_bytes:
        findings.append(
            Finding(
                Level.ERROR,
                "state.log_max_bytes",
                "must be at least twice state.log_segment_bytes: the active segment is never "
                "released, so a smaller cap would pause acknowledgements forever",
            )
        )
    return findings


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == Level.ERROR]
