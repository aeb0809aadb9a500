"""Settings: one frozen tree, read from a TOML file and overridden by the environment.

Every key ``[section] key`` can be set as ``HM_INGEST_<SECTION>_<KEY>`` (upper case), which is how
containers configure the daemon. The environment is *passed in* (``load_settings(path, environ)``)
rather than read globally, so tests hand it a dict.

Invalid settings stop start-up with a :class:`~ingest.errors.ConfigError` whose message names each
bad key, the environment variable that sets it, what is wrong and how to fix it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ingest.cpus import usable_cpus
from ingest.errors import ConfigError
from ingest.storage.location import is_uri, parse_output_path

ENV_PREFIX = "HM_INGEST_"
MIB = 1024 * 1024
# [ingest] sink = "auto" runs the sink in a process of its own from this many usable CPUs on.
MIN_CPUS_FOR_SINK_PROCESS = 2.0


class _Section(BaseModel):
    # Frozen: settings are a value object handed around, never mutated after start-up.
    # extra="forbid": a typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8883, ge=1, le=65535)
    client_id: str = Field(
        "hm-fleet-ingest",
        min_length=1,
        description="stable across restarts: the broker keys the persistent session by it",
    )
    topic: str = "live/level13/{app_id}/#"
    # Empty is only wrong when the topic needs it, and only for the commands that subscribe
    # (`run`, `check`: see preflight), so `fleet` and `token` work from an [api]-only config.
    app_id: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    # auto: the native client for MQTT 3.1.1 (twice paho's throughput for a third of its CPU,
    # bench/drain_bench.py), paho for MQTT 5, which the native client does not speak.
    client: Literal["auto", "paho", "native"] = "auto"
    keepalive_s: float = Field(30.0, gt=0)
    session_expiry_s: int = Field(7 * 86400, gt=0)
    receive_maximum: int = Field(100, ge=1, le=65535)
    # MQTT 3.1.1: the broker's window of unacknowledged messages to the daemon (Mosquitto's
    # max_inflight_messages); intake closes a group of messages once it holds this many.
    inflight_window: int = Field(20, ge=1, le=65535)
    verify_hostname: bool = True
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(30.0, gt=0)

    @property
    def receive_client(self) -> Literal["paho", "native"]:
        """The client ``client`` selects for ``protocol``."""
        if self.client == "auto":
            return "native" if self.protocol == "3.1.1" else "paho"
        return self.client

    @property
    def resolved_topic(self) -> str:
        return self.topic.format(app_id=self.app_id)

    @property
    def window(self) -> int:
        """Unacknowledged messages the broker sends before it waits for PUBACKs: the Receive
        Maximum the daemon asks for under MQTT 5, the broker's own setting under 3.1.1."""
        return self.receive_maximum if self.protocol == "5" else self.inflight_window

    @model_validator(mode="after")
    def _native_client_speaks_3_1_1(self) -> MqttSettings:
        if self.client == "native" and self.protocol != "3.1.1":
            raise ValueError(
                "client = 'native' speaks MQTT 3.1.1 only; "
                "set protocol = '3.1.1' or client = 'paho'"
            )
        return self


class Durability(StrEnum):
    FSYNC = "fsync"
    WRITE = "write"


class OutputSettings(_Section):
    # A local folder (a Path) or an object-store URI kept as a string: s3://bucket/prefix, gs://,
    # abfs:// (ingest.storage). Credentials come from the provider's standard environment/files.
    path: Annotated[Path | str, BeforeValidator(parse_output_path)] = Path("./data")
    # 100,000 keeps peak RSS under 300 MB while draining a large backlog (README, Performance).
    flush_rows: int = Field(100_000, ge=1)
    flush_bytes: int = Field(64 * MIB, ge=1024)
    flush_age_s: float = Field(60.0, gt=0)
    compression_level: int = Field(3, ge=1, le=22)


class StateSettings(_Section):
    path: Path = Path("./state")
    durability: Durability = Durability.FSYNC
    log_max_bytes: int = Field(
        512 * MIB,
        ge=MIB,
        description="uncommitted log size at which acks pause until the sink catches up",
    )
    log_segment_bytes: int = Field(16 * MIB, ge=64 * 1024)
    dedupe_retention_s: float = Field(7 * 86400.0, gt=0)


class IngestSettings(_Section):
    max_payload_bytes: int = Field(1 * MIB, ge=1024)
    # Where decode, dedupe and Parquet run: a thread of the daemon, or a process of its own
    # (ingest.sink_process), which takes that work off the daemon's GIL and onto another core.
    # auto: the process where this process may use 2 CPUs or more (see sink_mode).
    sink: Literal["auto", "thread", "process"] = "auto"

    @property
    def sink_mode(self) -> Literal["thread", "process"]:
        """Where the sink runs. ``auto``: a process when at least two CPUs are usable (affinity
        and container quota): with one, a second process only adds its memory and the pipe."""
        if self.sink == "auto":
            return "process" if usable_cpus() >= MIN_CPUS_FOR_SINK_PROCESS else "thread"
        return self.sink


class MetricsSettings(_Section):
    listen: str = "0.0.0.0:9464"

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.listen, "metrics.listen")


class ShutdownSettings(_Section):
    # Kubernetes' default terminationGracePeriodSeconds is 30 s and Docker's stop timeout 10 s;
    # deploy/ raises both above this deadline so the drain always finishes before SIGKILL.
    deadline_s: float = Field(20.0, gt=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["human", "json"] = "human"


class ApiSettings(_Section):
    environment: Literal["production", "sandbox"] = "production"
    base_url: str | None = None
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    private_key_file: Path | None = None
    auth: Literal["client_credentials", "private_key", "service_account"] = "client_credentials"
    timeout_s: float = Field(30.0, gt=0)


class FleetSettings(_Section):
    file: Path | None = None
    prune: bool = False
    interval_s: float = Field(300.0, gt=0)
    enabled: bool = False


class WebhookSettings(_Section):
    secret: SecretStr = SecretStr("")
    max_body_bytes: int = Field(64 * 1024, ge=1024)


REPLICA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class ReplicaSettings(_Section):
    # Empty: one daemon owns the whole stream. Set (in Kubernetes: the pod name, which a
    # StatefulSet keeps stable) to run as one of several replicas sharing the application's stream.
    id: str = Field("", pattern=r"^$|" + REPLICA_ID_PATTERN)
    # shared: MQTT shared subscription ($share/<group>/<topic>), the broker spreads the messages.
    # vin: each replica subscribes the per-VIN topics of the VINs a stable hash over `members`
    # gives it (for brokers without shared subscriptions; needs [fleet] enabled).
    mode: Literal["shared", "vin"] = "shared"
    group: str = Field("hm-ingest", pattern=REPLICA_ID_PATTERN)
    # vin mode: every replica id of the group, the same list on every replica (the environment
    # takes it comma-separated). Changing it moves VINs between replicas.
    members: list[Annotated[str, Field(pattern=REPLICA_ID_PATTERN)]] = Field(default_factory=list)
    # Where replicas find each other: sqlite:///abs/path (replicas on one host) or
    # postgresql://user@host/db (replicas anywhere). Required when id is set.
    coordination: SecretStr = SecretStr("")
    lease_s: float = Field(15.0, gt=0)
    heartbeat_s: float = Field(3.0, gt=0)
    # vin mode: how long after a member-list change has settled the replicas still claim the
    # moved VINs' messages before logging them, so a copy a replica reads late (a backlog) is
    # still written once. A replica further behind than this may write a moved VIN's message twice.
    handover_window_s: float = Field(900.0, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.id)

    @property
    def vin_sharded(self) -> bool:
        return self.enabled and self.mode == "vin"

    @field_validator("members", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # HM_INGEST_REPLICA_MEMBERS=r0,r1,r2 (an environment value is one string).
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _replicas_need_coordination(self) -> ReplicaSettings:
        if self.id and not self.coordination.get_secret_value():
            raise ValueError(
                "replica.id is set but replica.coordination is empty: replicas need a shared "
                "database to elect the fleet-control leader and adopt a lost replica's session; "
                "set it to sqlite:////shared/coordination.sqlite3 (one host) or "
                "postgresql://user@host/db"
            )
        if self.mode == "vin" and self.id and self.id not in self.members:
            raise ValueError(
                f"replica.mode is 'vin' but replica.members {self.members} does not list this "
                f"replica's id {self.id!r}: list every replica id of the group, the same list "
                "on every replica (on Kubernetes: the StatefulSet's pod names)"
            )
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"replica.members {self.members} lists an id twice")
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(
                f"replica.heartbeat_s ({self.heartbeat_s}) must be at most half of "
                f"replica.lease_s ({self.lease_s}), or one late heartbeat loses the lease"
            )
        return self


class IcebergSettings(_Section):
    # Also register every committed batch in Apache Iceberg tables (ingest.iceberg).
    enabled: bool = False
    catalog: Literal["sql", "rest", "glue"] = "sql"
    # sql: a SQLAlchemy URL (default: sqlite file under [state] path); rest: the catalog URL.
    uri: str = ""
    # Where table metadata lives; default: <[output] path>/iceberg.
    warehouse: str = ""
    namespace: str = Field("hm_ingest", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Extra catalog properties passed through to pyiceberg (credentials, regions, ...).
    properties: dict[str, str] = Field(default_factory=dict)
    # Snapshots kept per table (one per batch); older ones are expired (metadata only, no file
    # is deleted). pyiceberg's commit time grows with the snapshot count (~4 ms per snapshot).
    keep_snapshots: int = Field(50, ge=1)


class Settings(_Section):
    # validate_default: the mqtt section has required keys even when the file omits the section.
    mqtt: MqttSettings = Field(default_factory=dict, validate_default=True)
    output: OutputSettings = Field(default_factory=OutputSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings)
    iceberg: IcebergSettings = Field(default_factory=IcebergSettings)

    @property
    def receive_client(self) -> Literal["paho", "native"]:
        """The client that receives: VIN-sharded replicas change subscriptions at run time,
        which only the paho session does (the native one subscribes one topic at connect)."""
        return "paho" if self.replica.vin_sharded else self.mqtt.receive_client

    @property
    def spreads_envelopes(self) -> bool:
        """VIN-sharded replicas spread V2 envelopes by VIN too: each session takes the V2 topic
        under an MQTT 5 subscription identifier naming its rule (ingest.replica.envelopes).
        Under MQTT 3.1.1 the V2 topic has one owner, which takes every envelope."""
        return self.replica.vin_sharded and self.mqtt.protocol == "5"

    @model_validator(mode="after")
    def _vin_mode_needs_fleet_and_paho(self) -> Settings:
        if not self.replica.vin_sharded:
            return self
        if not self.fleet.enabled:
            raise ValueError(
                "replica.mode = 'vin' subscribes the VINs of the clearance state, so it needs "
                "fleet.enabled = true (and [api] credentials); or use replica.mode = 'shared'"
            )
        if self.mqtt.client == "native":
            raise ValueError(
                "replica.mode = 'vin' changes subscriptions at run time, which the native "
                "client does not do: set mqtt.client = 'auto' or 'paho'"
            )
        if not self.mqtt.resolved_topic.endswith("/#"):
            raise ValueError(
                f"replica.mode = 'vin' splits mqtt.topic {self.mqtt.topic!r} into per-VIN "
                "topics, so it must end in '/#' (the default live/level13/{app_id}/# does)"
            )
        return self


def split_host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    # isascii: str.isdigit() accepts other scripts' digits ("٣"), which int() then silently reads.
    # An unbracketed host with a colon is an IPv6 address missing its brackets ("::1" would
    # otherwise read as host ":" port 1).
    if (
        not sep
        or not (port.isascii() and port.isdigit())
        or not 0 <= int(port) <= 65535
        or (":" in host and not (host.startswith("[") and host.endswith("]")))
    ):
        raise ConfigError(
            f"{key} = {value!r} is not HOST:PORT; write it like '0.0.0.0:9464'", key=key
        )
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (metrics must be scrapable)


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    overrides: dict[str, dict[str, str]] = {}
    for section, field in Settings.model_fields.items():
        section_model = field.annotation
        assert isinstance(section_model, type)
        assert issubclass(section_model, BaseModel)
        for key in section_model.model_fields:
            value = environ.get(env_name(section, key))
            if value is not None:
                overrides.setdefault(section, {})[key] = value
    unknown = sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX)
        and not any(
            name == env_name(section, key)
            for section, field in Settings.model_fields.items()
            for key in field.annotation.model_fields  # type: ignore[union-attr]
        )
    )
    if unknown:
        raise ConfigError(
            f"unknown environment variable {unknown[0]}: no such setting; see the README's "
            "configuration table for the valid HM_INGEST_<SECTION>_<KEY> names",
            key=unknown[0],
        )
    return overrides


def _describe(error: Mapping[str, Any]) -> str:
    location = [str(part) for part in error["loc"]]
    key = ".".join(location)
    if len(location) >= 2:
        variable = env_name(location[0], location[1])
        where = f"{key} (environment {variable})"
    else:
        where = key or "settings"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown setting; remove it or check its spelling against the README"
    if _is_secret(location):
        # Echoing the input would print the secret (e.g. a numeric client_secret) to stderr.
        return f"{where}: {message} (value hidden)"
    return f"{where}: {message} (got {error.get('input')!r})"


def _is_secret(location: list[str]) -> bool:
    section = Settings.model_fields.get(location[0]) if location else None
    model = section.annotation if section is not None else None
    if len(location) < 2 or not (isinstance(model, type) and issubclass(model, BaseModel)):
        return False
    field = model.model_fields.get(location[1])
    return field is not None and field.annotation is SecretStr


def _path_keys() -> frozenset[tuple[str, str]]:
    # Chosen by type, not by name: a name rule ("*_file" or "path") missed fleet.file.
    keys: set[tuple[str, str]] = set()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        for key, setting in model.model_fields.items():
            if setting.annotation is Path or Path in get_args(setting.annotation):
                keys.add((section, key))
    return frozenset(keys)


_PATH_KEYS = _path_keys()


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to that file, as users expect."""
    for name, section in data.items():
        if not isinstance(section, dict):
            continue
        for key, value in section.items():
            # An object-store URI is not relative to anything (and Path() would mangle "//").
            if (name, key) in _PATH_KEYS and isinstance(value, str) and value and not is_uri(value):
                candidate = Path(value).expanduser()
                # Store the expanded path too: pydantic does not expand "~" itself.
                section[key] = str(candidate if candidate.is_absolute() else base / candidate)


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Read ``path`` (TOML, optional) and apply ``HM_INGEST_*`` overrides from ``environ``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"config file {path} does not exist; pass an existing --config"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        _resolve_paths(data, path.resolve().parent)
    for section, values in _environment_overrides(environ).items():
        existing = data.setdefault(section, {})
        if not isinstance(existing, dict):
            raise ConfigError(f"[{section}] in {path} must be a table", key=section)
        existing.update(values)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        first = exc.errors()[0]["loc"]
        raise ConfigError(
            "invalid configuration:\n  " + "\n  ".join(problems),
            key=".".join(str(part) for part in first),
        ) from exc
