from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.topics import Topic, TopicError, parse_topic, v1_topic, v2_topic

APP = "48aa1779-91c2-468e-97e9-ab112efd53b9"
VIN = "WVWZZZ1JZ3W386752"


def test_v1_topic_parses_every_segment() -> None:
    topic = parse_topic(f"live/level13/{APP}/{VIN}/diagnostics/get/odometer")
    assert topic == Topic("live", "level13", APP, VIN, "diagnostics", "odometer", 1)


def test_v2_topic_has_no_vin_capability_or_property() -> None:
    topic = parse_topic(f"sandbox/level13/{APP}")
    assert topic == Topic("sandbox", "level13", APP, None, None, None, 2)


def test_future_auto_api_level_is_accepted() -> None:
    assert parse_topic(f"live/level14/{APP}").level == "level14"


def test_builders_round_trip() -> None:
    assert parse_topic(v1_topic("live", APP, VIN, "doors", "locks_state")).property == "locks_state"
    assert parse_topic(v2_topic("sandbox", APP, level="level12")).level == "level12"


@pytest.mark.parametrize(
    ("topic", "names"),
    [
        (f"live/level13/{APP}/{VIN}/diagnostics/get", "6 segments"),
        (f"live/level13/{APP}/{VIN}", "4 segments"),
        ("", "1 segments"),
        (f"live/level13/{APP}/{VIN}/diagnostics/set/odometer", "action 'set'"),
        (f"live/level13/{APP}/{VIN}//get/odometer", "empty segment at position 4"),
        (f"live//{APP}", "empty segment at position 1"),
        (f"staging/level13/{APP}", "environment 'staging'"),
        (f"live/levelX/{APP}", "'levelX' is not an Auto API level"),
        (f"live/13/{APP}", "'13' is not an Auto API level"),
    ],
)
def test_rejected_topics_name_the_problem(topic: str, names: str) -> None:
    with pytest.raises(TopicError) as caught:
        parse_topic(topic)
    assert names in str(caught.value)
    assert caught.value.topic == topic


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_topic_error(text: str) -> None:
    try:
        topic = parse_topic(text)
    except TopicError:
        return
    assert topic.version in (1, 2)
    assert len(text.split("/")) == (7 if topic.version == 1 else 3)
