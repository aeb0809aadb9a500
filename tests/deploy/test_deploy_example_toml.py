"""deploy/hm-ingest.example.toml lists every setting, with its default, and loads."""

from __future__ import annotations

import re
import tomllib

from ingest.config import Settings, load_settings
from tests.deploy.support import DEPLOY

EXAMPLE = DEPLOY / "hm-ingest.example.toml"
# Keys without a default are shown commented out ("# ca_file = ...").
_COMMENTED_KEY = re.compile(r"^#\s*([a-z_]+)\s*=", re.M)


def test_example_loads_once_the_required_app_id_is_set() -> None:
    settings = load_settings(EXAMPLE, {"HM_INGEST_MQTT_APP_ID": "example"})
    assert settings.mqtt.app_id == "example"


def test_example_shows_every_setting_with_its_default() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    tree = tomllib.loads(text)
    defaults = Settings.model_validate({"mqtt": {"app_id": "example"}})
    sections = re.split(r"^\[([a-z_]+)\]\s*$", text, flags=re.M)
    commented = {
        name: set(_COMMENTED_KEY.findall(body))
        for name, body in zip(sections[1::2], sections[2::2], strict=True)
    }
    for section, field in Settings.model_fields.items():
        model = getattr(defaults, section)
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            default = getattr(model, key)
            if key in tree.get(section, {}):
                shown = tree[section][key]
                if section == "mqtt" and key == "app_id":
                    continue  # the example leaves it empty: it must be filled in
                expected = getattr(default, "get_secret_value", lambda d=default: d)()
                # Parse the shown value as the setting's own type (Path("./data") == "data").
                assert type(expected)(shown) == expected, f"[{section}] {key}"
            else:
                assert default is None, f"[{section}] {key} has a default but is not shown"
                assert key in commented.get(section, set()), f"[{section}] {key} is missing"
