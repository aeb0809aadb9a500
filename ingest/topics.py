"""MQTT topic names of High Mobility's two streaming APIs.

* V1, one message per property (AsyncAPI channel in HM's push API spec)::

      {environment}/{level}/{app_id}/{vin}/{capability}/get/{property}

* V2 ("enterprise"), one topic per application; the payload carries VIN and data::

      {environment}/{level}/{app_id}

``environment`` is ``live`` or ``sandbox``. ``level`` is the Auto API level, ``level13`` today; any
``level<digits>`` is accepted so that an Auto API upgrade does not quarantine a whole stream.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from ingest.errors import IngestError

ENVIRONMENTS = frozenset({"live", "sandbox"})
# The only action HM publishes on the streaming broker; set/other actions are requests, not data.
ACTION_GET = "get"
_LEVEL = re.compile(r"level[0-9]+")
_V1_SEGMENTS = 7
_V2_SEGMENTS = 3
# Distinct topics are bounded by VINs x properties; the cache only saves the split and checks on
# the hot path, so a miss costs ~1 us and an eviction never changes a result.
_TOPIC_CACHE_SIZE = 65_536


class TopicError(IngestError):
    """A topic is not one of HM's two shapes. ``topic`` holds the offending name."""

    def __init__(self, message: str, *, topic: str) -> None:
        super().__init__(message)
        self.topic = topic


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic. ``vin``, ``capability`` and ``property`` are ``None`` for V2 topics."""

    environment: str
    level: str
    app_id: str
    vin: str | None
    capability: str | None
    property: str | None
    version: Literal[1, 2]


@functools.lru_cache(maxsize=_TOPIC_CACHE_SIZE)
def parse_topic(topic: str) -> Topic:
    """Parse ``topic`` or raise :class:`TopicError` naming what is wrong."""
    parts = topic.split("/")
    if len(parts) not in (_V1_SEGMENTS, _V2_SEGMENTS):
        raise TopicError(
            f"topic {topic!r} has {len(parts)} segments; expected {_V1_SEGMENTS} "
            f"(env/level/app/vin/capability/get/property) or {_V2_SEGMENTS} (env/level/app)",
            topic=topic,
        )
    for position, segment in enumerate(parts):
        if not segment:
            raise TopicError(
                f"topic {topic!r} has an empty segment at position {position}", topic=topic
            )
    environment, level, app_id = parts[0], parts[1], parts[2]
    if environment not in ENVIRONMENTS:
        raise TopicError(
            f"topic {topic!r}: environment {environment!r} is not one of {sorted(ENVIRONMENTS)}",
            topic=topic,
        )
    if not _LEVEL.fullmatch(level):
        raise TopicError(
            f"topic {topic!r}: {level!r} is not an Auto API level (levelNN)", topic=topic
        )
    if len(parts) == _V2_SEGMENTS:
        return Topic(environment, level, app_id, None, None, None, 2)
    vin, capability, action, prop = parts[3], parts[4], parts[5], parts[6]
    if action != ACTION_GET:
        raise TopicError(f"topic {topic!r}: action {action!r} is not {ACTION_GET!r}", topic=topic)
    return Topic(environment, level, app_id, vin, capability, prop, 1)


def v1_topic(
    environment: str, app_id: str, vin: str, capability: str, prop: str, *, level: str = "level13"
) -> str:
    """The V1 topic HM publishes one property on (used by the emulator and tests)."""
    return f"{environment}/{level}/{app_id}/{vin}/{capability}/{ACTION_GET}/{prop}"


def v2_topic(environment: str, app_id: str, *, level: str = "level13") -> str:
    """The V2 topic HM publishes every envelope of one application on."""
    return f"{environment}/{level}/{app_id}"
