"""Print the README's configuration table: every setting of ``ingest.config.Settings``.

Usage (from the repository root, with the project installed)::

    python tools/gen_config_table.py > /tmp/config-table.md

Sections, keys, environment variables, defaults and allowed values come from the settings models
themselves; the meaning of each key comes from :data:`MEANINGS` below, else from the field's
``description``. The script fails (exit 1) when a setting has no meaning or a meaning
names a setting that no longer exists, so the table cannot silently fall behind the code.
"""

from __future__ import annotations

import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ingest.config import Settings, env_name

MIB = 1024 * 1024
KIB = 1024
DAY_S = 86400

# Meanings of keys whose Field has no description. Keep them to what the code does.
MEANINGS: dict[str, str] = {
    "mqtt.host": "MQTT broker host name or address.",
    "mqtt.port": "MQTT broker port (mutual TLS).",
    "mqtt.client_id": (
        "MQTT client id (the `<client-id>` of HM's console files). Keep it stable across "
        "restarts: the broker keys the persistent session by it."
    ),
    "mqtt.topic": (
        "Topic filter subscribed with QoS 1; `{app_id}` is replaced by `mqtt.app_id`. "
        "The default covers HM's V1 per-property topics; V2 messages arrive on "
        "`live/level13/<app_id>`, which `#` also matches."
    ),
    "mqtt.app_id": (
        "HM application id. Required while `mqtt.topic` contains `{app_id}`; when set, messages "
        "on another application's topics are rejected (`app_mismatch`)."
    ),
    "mqtt.ca_file": (
        "CA certificate(s) that signed the broker's certificate (PEM). Required to start."
    ),
    "mqtt.cert_file": "Client certificate (PEM) presented to the broker. Required to start.",
    "mqtt.key_file": ("Unencrypted PEM private key of `mqtt.cert_file`. Required to start."),
    "mqtt.protocol": (
        "MQTT protocol version. 3.1.1 keeps the session with clean session off; 5 uses "
        "clean start off plus `session_expiry_s` and `receive_maximum`; VIN-sharded replicas "
        "spread V2 envelopes by VIN only under 5 ([docs/scaling.md](docs/scaling.md))."
    ),
    "mqtt.client": (
        "MQTT receive client. `auto` (default): `native` for MQTT 3.1.1, `paho` for 5. "
        "`native` is the project's MQTT 3.1.1 reader, which reads TLS in large chunks and "
        "parses every complete packet per read: about twice the daemon's throughput on paho "
        '(see Performance). `native` requires `protocol = "3.1.1"`.'
    ),
    "mqtt.keepalive_s": "MQTT keep-alive interval, rounded up to whole seconds.",
    "mqtt.session_expiry_s": (
        "MQTT 5 only: how long the broker keeps the session (and queues messages) while the "
        "daemon is disconnected."
    ),
    "mqtt.receive_maximum": (
        "MQTT 5 only: Receive Maximum sent in CONNECT, the number of unacknowledged QoS 1 "
        "messages the broker may have in flight to the daemon (overrides the broker's "
        "`max_inflight_messages`)."
    ),
    "mqtt.verify_hostname": (
        "Check that the broker's certificate names `mqtt.host`. Turn off only for test brokers."
    ),
    "mqtt.reconnect_min_s": (
        "Reconnect backoff base: after the n-th consecutive failure (n from 0) the daemon waits a "
        "random 0 to min(`reconnect_max_s`, `reconnect_min_s * 2^n`) seconds."
    ),
    "mqtt.reconnect_max_s": "Cap of the reconnect backoff.",
    "mqtt.connect_timeout_s": (
        "At start-up, how long to wait for the first connection and subscription before "
        "giving up (exit 1)."
    ),
    "output.path": (
        "Root of the Parquet output: `telemetry/` and `rejected/` are created under it. A local "
        "folder, or an object-store URI: `s3://bucket/prefix` (also `gs://`, `abfs://`), "
        "credentials from the provider's standard environment and files, an S3-compatible "
        "endpoint from `AWS_ENDPOINT_URL`. See docs/storage.md."
    ),
    "output.flush_rows": "Commit the pending batch once it holds this many telemetry rows.",
    "output.flush_bytes": (
        "Commit the pending batch once its raw MQTT payloads add up to this many bytes."
    ),
    "output.flush_age_s": "Commit the pending batch once it has been open this long.",
    "output.compression_level": "Compression level of the Parquet files (zstd).",
    "state.path": (
        "Folder of the daemon's state: write-ahead log (`log/`), `checkpoint.json`, "
        "`dedupe.sqlite3`. Must survive restarts."
    ),
    "state.durability": (
        "`fsync`: every logged group is fsynced before its PUBACKs; `write`: written to the "
        "page cache only (survives a process crash, not a power loss). See Durability modes."
    ),
    "state.log_segment_bytes": (
        "Size at which the write-ahead log starts a new segment file. Segments are deleted once "
        "all their records are committed; `state.log_max_bytes` must be at least twice this."
    ),
    "state.dedupe_retention_s": (
        "How long message ids stay in the dedupe index; older ones are pruned (at most hourly, "
        "after a commit), and a message redelivered later than that is written again."
    ),
    "ingest.max_payload_bytes": (
        "Payloads longer than this are not parsed but quarantined (`payload_too_large`)."
    ),
    "ingest.sink": (
        "Where decode, dedupe and Parquet commits run: `thread` (in the daemon's process) or "
        "`process` (a second process, on another core; see Performance); `auto` picks the "
        "process where at least 2 CPUs are usable (affinity and container CPU limit). Same "
        "commit protocol and state either way."
    ),
    "metrics.listen": "HOST:PORT of the HTTP server for `/metrics`, `/healthz` and `/readyz`.",
    "shutdown.deadline_s": (
        "On SIGTERM/SIGINT, the time allowed to log, acknowledge and commit what is held; "
        "past it the process exits with code 1 and the rest is replayed at the next start."
    ),
    "logging.level": "Log level (`--log-level` overrides it).",
    "logging.format": (
        "`human` for terminals, `json` for one JSON object per line (`--log-format` overrides it)."
    ),
    "api.environment": (
        "HM REST environment: sets both the base URL and the JWT `aud` of the two JWT flows."
    ),
    "api.base_url": (
        "HM REST base URL including `/v1`; overrides `api.environment` (e.g. the emulator's "
        "`base_url`). The JWT `aud` follows it."
    ),
    "api.client_id": (
        "OAuth client id from HM's console; needed by `client_credentials` and `private_key`."
    ),
    "api.client_secret": (
        "OAuth client secret (kept as a secret, never logged); needed by `client_credentials`."
    ),
    "api.private_key_file": (
        "EC P-256 key for the `private_key` / `service_account` flows: the JSON file HM's "
        "console downloads (as it is), or a PKCS#8/SEC1 PEM."
    ),
    "api.auth": (
        "How to obtain HM API tokens: OAuth2 client credentials, client credentials with a "
        "signed private-key assertion, or the service-account `auth_tokens` JWT flow."
    ),
    "api.timeout_s": "Timeout of one HM REST request (retries come on top).",
    "fleet.file": (
        "Desired fleet, CSV or YAML (`vin, brand, tags…`, optional odometer). Unset: "
        "observe-only, the loop follows HM's clearance list and requests nothing. Re-read "
        "every cycle; a bad file is logged and the last good one kept."
    ),
    "fleet.prune": (
        "Revoke (approved) or cancel (pending) clearances of VINs no longer in `fleet.file`. "
        "Never in observe-only mode, never against an empty file."
    ),
    "fleet.interval_s": (
        "Seconds between reconcile cycles; a verified webhook starts one at once."
    ),
    "fleet.enabled": (
        "Run the fleet clearance control loop inside `hm-ingest run` (needs `[api]` "
        "credentials). Off: no clearance state is kept and no VIN is gated."
    ),
    "webhook.secret": (
        "Secret of HM's webhook (console); `POST /webhook` verifies `X-HM-Signature-256` "
        "with it. Empty: every delivery is refused (401)."
    ),
    "webhook.max_body_bytes": "Largest webhook body accepted; a longer one gets 413 unread.",
    "replica.id": (
        "This daemon's id as one of several replicas sharing the stream (on Kubernetes the pod "
        "name). Empty: a single daemon. Set: client id `<client_id>-<id>`, a shared "
        "subscription, file names `part-<id>-…`; see docs/scaling.md."
    ),
    "replica.mode": (
        "How replicas split the stream: `shared`, an MQTT shared subscription "
        "(`$share/<group>/<topic>`), the broker must support it; `vin`, per-VIN topic filters "
        "assigned by a hash over `replica.members` (needs `fleet.enabled`)."
    ),
    "replica.members": (
        "`vin` mode: every replica id of the group, the same list on every replica "
        "(comma-separated in the environment). Changing it moves VINs between replicas."
    ),
    "replica.group": "Shared subscription group name; the same for every replica of one group.",
    "replica.coordination": (
        "Database the replicas share for membership, leader election and session adoption: "
        "`sqlite:////path` (replicas on one host) or `postgresql://…` (anywhere). Required "
        "with `replica.id`."
    ),
    "replica.lease_s": (
        "A replica silent this long is declared lost: the leader adopts its MQTT session and "
        "the leader lease passes on."
    ),
    "iceberg.enabled": (
        "Also append every committed batch to Apache Iceberg tables `telemetry` and `rejected` "
        "(one snapshot per batch, the plain files registered in place; docs/iceberg.md). Needs "
        "the `iceberg` extra."
    ),
    "iceberg.catalog": "Iceberg catalog: `sql` (embedded SQLite by default), `rest` or `glue`.",
    "iceberg.uri": (
        "`sql`: a SQLAlchemy URL (empty: a SQLite file under `state.path`); `rest`: the "
        "catalog's URL."
    ),
    "iceberg.warehouse": "Where table metadata lives (empty: `<output.path>/iceberg`).",
    "iceberg.namespace": "Namespace of the two tables.",
    "iceberg.properties": (
        "Extra catalog properties passed to pyiceberg (credentials, region, …); TOML only."
    ),
    "iceberg.keep_snapshots": (
        "Snapshots kept per table; older ones expire (metadata only, no file is deleted). "
        "pyiceberg's commit time grows with the count."
    ),
    "replica.heartbeat_s": (
        "How often a replica renews its leases and the leader looks for lost replicas; at most "
        "half of `lease_s`."
    ),
    "replica.handover_window_s": (
        "`vin` mode: how long after a member-list change has settled replicas still claim the "
        "moved VINs' messages before logging them, so a copy read that late is still written "
        "once ([docs/scaling.md](docs/scaling.md))."
    ),
}


def _sections() -> list[tuple[str, type[BaseModel]]]:
    sections = []
    for name, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        sections.append((name, model))
    return sections


def _size(value: int) -> str:
    if value >= MIB and value % MIB == 0:
        return f"{value // MIB} MiB"
    if value >= KIB and value % KIB == 0:
        return f"{value // KIB} KiB"
    return f"{value} B"


def _default(key: str, field: FieldInfo) -> str:
    value: Any = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "(unset)"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{value.as_posix() if value.is_absolute() else './' + value.as_posix()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = f"`{value}`"
    if key.endswith("_bytes") and isinstance(value, int) and value >= KIB:
        text += f" ({_size(value)})"
    elif key.endswith("_s") and isinstance(value, int) and value >= DAY_S and value % DAY_S == 0:
        text += f" ({value // DAY_S} days)"
    return text


_BOUNDS: tuple[tuple[type[Any], str, str], ...] = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


def _allowed(key: str, field: FieldInfo) -> str:
    """Allowed values: the choices of a Literal or Enum, or the numeric bounds."""
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return "One of " + ", ".join(f"`{choice}`" for choice in typing.get_args(annotation)) + "."
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "One of " + ", ".join(f"`{member.value}`" for member in annotation) + "."
    bounds = []
    for item in field.metadata:
        for kind, attribute, symbol in _BOUNDS:
            if isinstance(item, kind):
                bound = getattr(item, attribute)
                big = key.endswith("_bytes") and bound >= KIB
                bounds.append(f"{symbol} {_size(bound) if big else f'{bound:g}'}")
        if isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            bounds.append("non-empty")
    return ("Must be " + ", ".join(bounds) + ".") if bounds else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table() -> str:
    """The Markdown table, or raise SystemExit naming keys whose meaning is missing or stale."""
    rows = [
        "| Section | Key | Environment variable | Default | Meaning |",
        "|---|---|---|---|---|",
    ]
    seen: set[str] = set()
    missing: list[str] = []
    for section, model in _sections():
        for key, field in model.model_fields.items():
            dotted = f"{section}.{key}"
            seen.add(dotted)
            meaning = MEANINGS.get(dotted) or field.description
            if meaning is None:
                missing.append(dotted)
                continue
            meaning = meaning[0].upper() + meaning[1:]
            if not meaning.endswith("."):
                meaning += "."
            allowed = _allowed(key, field)
            if allowed:
                meaning += " " + allowed
            rows.append(
                f"| `[{section}]` | `{key}` | `{env_name(section, key)}` | "
                f"{_cell(_default(key, field))} | {_cell(meaning)} |"
            )
    stale = sorted(set(MEANINGS) - seen)
    if missing or stale:
        problems = [f"no meaning for {key}: add it to MEANINGS" for key in missing]
        problems += [f"MEANINGS names {key}, which is not a setting: remove it" for key in stale]
        raise SystemExit("gen_config_table: " + "; ".join(problems))
    return "\n".join(rows)


def main() -> int:
    sys.stdout.write(table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
