"""Which replica subscribes which topics in VIN-sharded mode: a pure function of names, no I/O.

The stream is split by subscription instead of by the broker (for brokers without shared
subscriptions). The unit is a VIN: V1 messages arrive on ``<prefix>/<vin>/...``, so one topic
filter ``<prefix>/<vin>/#`` carries all of one vehicle's data. V2 envelopes arrive on the exact
topic ``<prefix>`` with no VIN in it; that topic is one more unit (the empty key), so it belongs
to one replica, unless every replica takes it and keeps its VINs' share
(:mod:`ingest.replica.envelopes`, MQTT 5).

Owners come from rendezvous (highest random weight) hashing over the configured member list:
every replica computes the same owner from the same names, with no coordination, and adding or
removing one member moves only the VINs that member wins or held (about 1/N of them).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence

# The unit of the V2 topic, which carries no VIN.
APP_TOPIC_KEY = ""
# What cannot stand in one topic level of a filter: a separator, a wildcard, NUL.
_NOT_ONE_LEVEL = re.compile("[/+#\0]")


def owner(key: str, members: Sequence[str]) -> str:
    """The member that subscribes ``key``'s topic: the highest hash of (member, key)."""
    if not members:
        raise ValueError("no members to assign to")
    return _owner(key, tuple(members))


# Every replica asks again for every VIN each heartbeat (and once per session it hosts): cached,
# a step over 50,000 VINs costs lookups instead of 150,000 hashes (~300 ms).
@functools.lru_cache(maxsize=1 << 18)
def _owner(key: str, members: tuple[str, ...]) -> str:
    return max(members, key=lambda member: _weight(member, key))


def _weight(member: str, key: str) -> int:
    digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def topic_prefix(topic: str) -> str:
    """``live/level13/<app>`` from the configured ``live/level13/<app>/#``."""
    if not topic.endswith("/#"):
        raise ValueError(f"topic {topic!r} does not end in '/#'")
    return topic.removesuffix("/#")


def vin_filter(prefix: str, vin: str) -> str:
    return f"{prefix}/{vin}/#"


def filters_of(
    member: str,
    members: Sequence[str],
    prefix: str,
    vins: Iterable[str],
    *,
    app_topic: bool = True,
) -> set[str]:
    """The topic filters ``member`` subscribes for ``vins``, plus the V2 topic if it is its
    (``app_topic``; without, every session takes the V2 topic: ingest.replica.envelopes)."""
    group = tuple(members)
    owned = {
        vin_filter(prefix, vin) for vin in vins if usable_vin(vin) and owner(vin, group) == member
    }
    if app_topic and owner(APP_TOPIC_KEY, group) == member:
        owned.add(prefix)
    return owned


def usable_vin(vin: str) -> bool:
    # A VIN is one topic level; one with a wildcard or separator could not be subscribed alone
    # (the clearance API would not have accepted it: this is belt and braces).
    return bool(vin) and _NOT_ONE_LEVEL.search(vin) is None


def unit_of(prefix: str, topic_filter: str) -> str:
    """The key a filter was made from: its VIN, or APP_TOPIC_KEY for the V2 topic."""
    if topic_filter == prefix:
        return APP_TOPIC_KEY
    return topic_filter.removeprefix(prefix + "/").removesuffix("/#")
