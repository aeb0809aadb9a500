"""ingest.config: TOML file, environment overrides, validation messages, secrets, immutability."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from ingest.config import Durability, Settings, env_name, load_settings, split_host_port
from ingest.errors import ConfigError
from ingest.preflight import Level, check_topic

APP_ID = "48aa1779-91c2-468e-97e9-ab112efd53b9"
API_SECRET = "api-secret-7f3a9c"
WEBHOOK_SECRET = "webhook-secret-d41e0b"


def write_config(directory: Path, text: str, name: str = "ingest.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_values_come_from_the_toml_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        f"""
[mqtt]
host = "broker.example"
port = 18883
app_id = "{APP_ID}"
protocol = "5"
keepalive_s = 12.5

[state]
durability = "write"

[logging]
format = "json"
""",
    )
    settings = load_settings(path, {})
    assert settings.mqtt.host == "broker.example"
    assert settings.mqtt.port == 18883
    assert settings.mqtt.protocol == "5"
    assert settings.mqtt.keepalive_s == 12.5
    assert settings.mqtt.resolved_topic == f"live/level13/{APP_ID}/#"
    assert settings.state.durability is Durability.WRITE
    assert settings.logging.format == "json"


def test_environment_overrides_the_file_and_is_coerced(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, f'[mqtt]\nport = 18883\nhost = "from-file"\napp_id = "{APP_ID}"\n'
    )
    settings = load_settings(
        path,
        {
            "HM_INGEST_MQTT_PORT": "1234",
            "HM_INGEST_MQTT_VERIFY_HOSTNAME": "false",
            "HM_INGEST_OUTPUT_FLUSH_AGE_S": "2.5",
            # Variables outside the prefix are none of our business.
            "PATH": "/usr/bin",
        },
    )
    assert settings.mqtt.port == 1234
    assert isinstance(settings.mqtt.port, int)
    assert settings.mqtt.verify_hostname is False
    assert settings.output.flush_age_s == 2.5
    # Keys the environment does not set keep the file's value.
    assert settings.mqtt.host == "from-file"


def test_environment_alone_is_enough_without_a_file() -> None:
    settings = load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    assert settings.mqtt.app_id == APP_ID
    assert settings.mqtt.port == 8883


def test_env_name_is_prefix_section_key_upper_case() -> None:
    assert env_name("mqtt", "ca_file") == "HM_INGEST_MQTT_CA_FILE"


def test_unknown_environment_variable_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID, "HM_INGEST_MQTT_PROT": "8883"})
    assert "HM_INGEST_MQTT_PROT" in str(caught.value)
    assert caught.value.key == "HM_INGEST_MQTT_PROT"


def test_unknown_toml_key_is_rejected_by_name(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'[mqtt]\napp_id = "{APP_ID}"\nhots = "typo"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert "mqtt.hots" in str(caught.value)
    assert "unknown setting" in str(caught.value)
    assert caught.value.key == "mqtt.hots"


def test_unknown_toml_section_is_rejected_by_name(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'[mqtt]\napp_id = "{APP_ID}"\n\n[mqqt]\nport = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert "mqqt: unknown setting" in str(caught.value)


def test_wrong_type_in_environment_names_key_and_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID, "HM_INGEST_MQTT_PORT": "eighty"})
    message = str(caught.value)
    assert "mqtt.port" in message
    assert "HM_INGEST_MQTT_PORT" in message
    assert "'eighty'" in message
    assert caught.value.key == "mqtt.port"


def test_wrong_type_in_file_names_key_and_variable(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, f'[mqtt]\napp_id = "{APP_ID}"\n\n[state]\nlog_max_bytes = "lots"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert "state.log_max_bytes" in str(caught.value)
    assert "HM_INGEST_STATE_LOG_MAX_BYTES" in str(caught.value)


def test_out_of_range_value_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID, "HM_INGEST_MQTT_PORT": "70000"})
    assert "mqtt.port" in str(caught.value)
    assert "65535" in str(caught.value)


def test_every_problem_is_listed_not_only_the_first(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[mqtt]\nport = "x"\n[logging]\nlevel = "LOUD"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    message = str(caught.value)
    assert "mqtt.port" in message
    assert "logging.level" in message


def test_empty_app_id_with_default_topic_is_refused_before_subscribing() -> None:
    # Loading succeeds (the fleet CLI needs only [api]); the pre-flight of run/check refuses.
    settings = load_settings(None, {})
    finding = check_topic(settings)
    assert finding.level == Level.ERROR
    assert finding.key == "mqtt.app_id"
    assert "HM_INGEST_MQTT_APP_ID" in finding.message


def test_empty_app_id_is_fine_when_the_topic_does_not_use_it() -> None:
    settings = load_settings(None, {"HM_INGEST_MQTT_TOPIC": "sandbox/level13/fixed-app/#"})
    assert settings.mqtt.app_id == ""
    assert settings.mqtt.resolved_topic == "sandbox/level13/fixed-app/#"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc" / "hm"
    config_dir.mkdir(parents=True)
    path = write_config(
        config_dir,
        f"""
[mqtt]
app_id = "{APP_ID}"
ca_file = "certs/ca.pem"
cert_file = "../client.crt"
key_file = "/absolute/client.key"

[output]
path = "out"

[state]
path = "state"

[api]
private_key_file = "keys/api.pem"

[fleet]
file = "fleet.yaml"
""",
    )
    settings = load_settings(path, {})
    base = config_dir.resolve()
    assert settings.mqtt.ca_file == base / "certs" / "ca.pem"
    assert settings.mqtt.cert_file == base / ".." / "client.crt"
    assert settings.mqtt.key_file == Path("/absolute/client.key")
    assert settings.output.path == base / "out"
    assert settings.state.path == base / "state"
    assert settings.api.private_key_file == base / "keys" / "api.pem"
    assert settings.fleet.file == base / "fleet.yaml"


def test_home_relative_path_in_file_is_expanded(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'[mqtt]\napp_id = "{APP_ID}"\nca_file = "~/ca.pem"\n')
    settings = load_settings(path, {})
    assert settings.mqtt.ca_file == Path("~/ca.pem").expanduser()
    assert "~" not in str(settings.mqtt.ca_file)


def test_relative_path_from_environment_is_not_rebased_on_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'[mqtt]\napp_id = "{APP_ID}"\n')
    settings = load_settings(path, {"HM_INGEST_MQTT_CA_FILE": "certs/ca.pem"})
    assert settings.mqtt.ca_file == Path("certs/ca.pem")


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    assert str(missing) in str(caught.value)
    assert "does not exist" in str(caught.value)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[mqtt\nport = = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    assert "not valid TOML" in str(caught.value)
    assert str(path) in str(caught.value)


def test_section_that_is_not_a_table_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, "mqtt = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    assert "[mqtt]" in str(caught.value)
    assert caught.value.key == "mqtt"


def test_secrets_never_appear_in_repr_or_str(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        f"""
[mqtt]
app_id = "{APP_ID}"

[api]
client_secret = "{API_SECRET}"
""",
    )
    settings = load_settings(path, {"HM_INGEST_WEBHOOK_SECRET": WEBHOOK_SECRET})
    # The values are really there: the test would be vacuous if they had not been loaded.
    assert settings.api.client_secret.get_secret_value() == API_SECRET
    assert settings.webhook.secret.get_secret_value() == WEBHOOK_SECRET
    for rendering in (
        repr(settings),
        str(settings),
        repr(settings.api),
        str(settings.webhook),
        f"{settings.api.client_secret}",
    ):
        assert API_SECRET not in rendering
        assert WEBHOOK_SECRET not in rendering
    assert API_SECRET not in settings.model_dump_json()


def test_secret_with_wrong_type_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        f'[mqtt]\napp_id = "{APP_ID}"\n\n[api]\nclient_secret = 918273645\n'
        '\n[webhook]\nsecret = ["hunter2-hook"]\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    message = str(caught.value)
    assert "api.client_secret" in message
    assert "webhook.secret" in message
    assert "918273645" not in message
    assert "hunter2-hook" not in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("metrics.internal:65535", ("metrics.internal", 65535)),
    ],
)
def test_split_host_port_accepts(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value, "metrics.listen") == expected


@pytest.mark.parametrize(
    "value",
    ["9464", "host:", "host:port", "host:65536", "host:-1", "::1", "host:\u0663", "host: 80"],
)
def test_split_host_port_rejects(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        split_host_port(value, "metrics.listen")
    assert caught.value.key == "metrics.listen"
    assert "metrics.listen" in str(caught.value)
    assert repr(value) in str(caught.value)


def test_metrics_listen_is_validated_where_it_is_read() -> None:
    settings = load_settings(
        None, {"HM_INGEST_MQTT_APP_ID": APP_ID, "HM_INGEST_METRICS_LISTEN": "nowhere"}
    )
    with pytest.raises(ConfigError):
        _ = settings.metrics.host_port


def test_settings_are_frozen() -> None:
    settings = load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    with pytest.raises(ValidationError):
        settings.mqtt.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.api = settings.api  # type: ignore[misc]
    assert settings.mqtt.port == 8883


def test_settings_are_hashable_values() -> None:
    one = load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    two = load_settings(None, {"HM_INGEST_MQTT_APP_ID": APP_ID})
    other = load_settings(None, {"HM_INGEST_MQTT_APP_ID": "another-app"})
    assert one == two
    assert one != other
    assert isinstance(one, Settings)
    assert isinstance(one.api.client_secret, SecretStr)


@pytest.mark.parametrize(
    ("client", "protocol", "chosen"),
    [
        ("auto", "3.1.1", "native"),
        ("auto", "5", "paho"),
        ("paho", "3.1.1", "paho"),
        ("native", "3.1.1", "native"),
    ],
)
def test_receive_client_auto_picks_native_for_3_1_1_and_paho_for_5(
    client: str, protocol: str, chosen: str
) -> None:
    settings = load_settings(
        None, {"HM_INGEST_MQTT_CLIENT": client, "HM_INGEST_MQTT_PROTOCOL": protocol}
    )
    assert settings.mqtt.receive_client == chosen


def test_native_client_refuses_mqtt_5_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"native' speaks MQTT 3.1.1 only.*client = 'paho'"):
        load_settings(None, {"HM_INGEST_MQTT_CLIENT": "native", "HM_INGEST_MQTT_PROTOCOL": "5"})


def test_replica_id_needs_a_coordination_database_and_a_sane_heartbeat() -> None:
    with pytest.raises(ConfigError, match=r"replica\.coordination is empty"):
        load_settings(None, {"HM_INGEST_REPLICA_ID": "r0"})
    with pytest.raises(ConfigError, match="at most half of"):
        load_settings(
            None,
            {
                "HM_INGEST_REPLICA_ID": "r0",
                "HM_INGEST_REPLICA_COORDINATION": "sqlite:////tmp/c.sqlite3",
                "HM_INGEST_REPLICA_HEARTBEAT_S": "10",
            },
        )
    with pytest.raises(ConfigError, match=r"replica\.id"):
        load_settings(None, {"HM_INGEST_REPLICA_ID": "has spaces"})


VIN_MODE = {
    "HM_INGEST_REPLICA_ID": "r1",
    "HM_INGEST_REPLICA_COORDINATION": "sqlite:////tmp/c.sqlite3",
    "HM_INGEST_REPLICA_MODE": "vin",
    "HM_INGEST_REPLICA_MEMBERS": "r0, r1,r2",
    "HM_INGEST_FLEET_ENABLED": "true",
}


def test_vin_mode_takes_the_member_list_from_the_environment_and_receives_with_paho() -> None:
    settings = load_settings(None, VIN_MODE)
    assert settings.replica.members == ["r0", "r1", "r2"]
    assert settings.replica.vin_sharded
    assert settings.receive_client == "paho", "auto picks paho: subscriptions change at run time"
    shared = load_settings(None, {**VIN_MODE, "HM_INGEST_REPLICA_MODE": "shared"})
    assert not shared.replica.vin_sharded
    assert shared.receive_client == "native"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"HM_INGEST_REPLICA_MEMBERS": "r0,r2"}, r"does not list this replica's id 'r1'"),
        ({"HM_INGEST_REPLICA_MEMBERS": "r0,r1,r1"}, "lists an id twice"),
        ({"HM_INGEST_FLEET_ENABLED": "false"}, r"needs fleet\.enabled = true"),
        ({"HM_INGEST_MQTT_CLIENT": "native"}, r"set mqtt\.client = 'auto' or 'paho'"),
        ({"HM_INGEST_MQTT_TOPIC": "live/level13/{app_id}"}, "must end in '/#'"),
        ({"HM_INGEST_REPLICA_MEMBERS": "r0,r1,bad id"}, r"replica\.members"),
    ],
)
def test_vin_mode_refuses_what_it_cannot_run_naming_the_fix(
    change: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(None, {**VIN_MODE, **change})
