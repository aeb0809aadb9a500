"""HM MQTT payloads → telemetry rows, or one rejection naming what is wrong.

A message decodes completely or not at all: any malformed part rejects the whole message, so the
Parquet sink never holds half a message and the quarantine keeps the raw bytes to replay.

Reason codes (``Rejection.reason``; the ``rejected`` table's ``reason`` column):

=======================  ===========================================================================
``payload_too_large``    payload longer than ``max_payload_bytes`` (checked before parsing)
``invalid_utf8``         payload is not UTF-8
``invalid_json``         not JSON (also NaN/Infinity literals, which JSON does not have)
``not_an_object``        the top level is not a JSON object
``unsupported_version``  ``version`` missing, or not 1 or 2
``missing_field``        ``message_id``/``vin`` missing, empty or not a string; ``data`` missing or
                         not an object; V1 ``capability``/``property`` present but not a string
``bad_topic``            the topic is neither HM's V1 nor V2 shape (see :mod:`ingest.topics`)
``topic_mismatch``       topic and payload disagree on version, capability or property
``vin_mismatch``         V1 topic VIN differs from the payload's ``vin``
``app_mismatch``         topic app id differs from the configured one, or from a V2 payload's
                         ``application_id``
``invalid_vin``          a V2 payload's ``vin`` is not 17 upper-case letters and digits
``malformed_item``       ``data`` does not have the capability → property → item(s) shape, an item
                         is not an object, its ``timestamp`` is not ISO 8601, its ``failure`` /
                         ``availability`` is not an object, or its ``data`` / ``availability`` is
                         nested more than 254 levels deep (too deep to store as JSON text)
``decoder_error``        a bug in this module: the message is quarantined rather than crashing
                         the daemon into a restart loop on the same logged message
=======================  ===========================================================================

Speed: this runs once per MQTT message on the consumer's thread, so it avoids per-message
allocation beyond the rows: orjson, exact ``type() is`` checks (orjson never returns subclasses),
a cached topic parser, a timestamp parser that remembers the last timestamp and takes HM's own
layout through the C ``fromisoformat``, and a precomputed set of known properties.
``bench/decode_bench.py`` measures it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, NamedTuple

import orjson

from ingest import catalogue
from ingest.topics import Topic, TopicError, parse_topic

REASON_PAYLOAD_TOO_LARGE: Final = "payload_too_large"
REASON_INVALID_UTF8: Final = "invalid_utf8"
REASON_INVALID_JSON: Final = "invalid_json"
REASON_NOT_AN_OBJECT: Final = "not_an_object"
REASON_UNSUPPORTED_VERSION: Final = "unsupported_version"
REASON_MISSING_FIELD: Final = "missing_field"
REASON_BAD_TOPIC: Final = "bad_topic"
REASON_TOPIC_MISMATCH: Final = "topic_mismatch"
REASON_VIN_MISMATCH: Final = "vin_mismatch"
REASON_APP_MISMATCH: Final = "app_mismatch"
REASON_INVALID_VIN: Final = "invalid_vin"
REASON_MALFORMED_ITEM: Final = "malformed_item"
REASON_DECODER_ERROR: Final = "decoder_error"

REASONS: Final = frozenset(
    {
        REASON_PAYLOAD_TOO_LARGE,
        REASON_INVALID_UTF8,
        REASON_INVALID_JSON,
        REASON_NOT_AN_OBJECT,
        REASON_UNSUPPORTED_VERSION,
        REASON_MISSING_FIELD,
        REASON_BAD_TOPIC,
        REASON_TOPIC_MISMATCH,
        REASON_VIN_MISMATCH,
        REASON_APP_MISMATCH,
        REASON_INVALID_VIN,
        REASON_MALFORMED_ITEM,
        REASON_DECODER_ERROR,
    }
)

# Row layout: exactly the field order of schemas/telemetry.v1.json (a test compares the two).
COLUMNS: Final = (
    "message_id",
    "item_index",
    "vin",
    "capability",
    "property",
    "timestamp",
    "received_at",
    "value_number",
    "value_unit",
    "value_string",
    "value_bool",
    "value_json",
    "failure_reason",
    "failure_description",
    "availability_json",
    "payload_version",
    "topic",
)

Row = tuple[
    str,  # message_id
    int,  # item_index
    str,  # vin
    str,  # capability
    str,  # property
    int | None,  # timestamp, ms since the Unix epoch (UTC)
    int,  # received_at, us since the Unix epoch (UTC)
    float | None,  # value_number
    str | None,  # value_unit
    str | None,  # value_string
    bool | None,  # value_bool
    str | None,  # value_json
    str | None,  # failure_reason
    str | None,  # failure_description
    str | None,  # availability_json
    int,  # payload_version
    str,  # topic
]

DEFAULT_MAX_PAYLOAD_BYTES: Final = 1_048_576  # 1 MiB: far above any HM message, bounds memory
# ISO 3779 excludes I, O and Q, but HM's own V2 example (json-schema/janus-0002 fixture,
# "EXVETESTVIN000001") and its test VINs use them, so only length and alphabet are checked here:
# quarantining HM's sandbox fleet would be worse than admitting a VIN with an I.
_VIN: Final = re.compile(r"[A-Z0-9]{17}")
# ISO 8601 / RFC 3339 date-time, extended format. Seconds are required (HM always sends them);
# fractions may have any length (HM sends 6 digits); no zone means UTC.
_TIMESTAMP: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:[.,]([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
# Timestamps in a stream cluster on a few days; the cache is cleared when full, never evicts
# per entry, so its cost is a dict lookup.
_DAY_CACHE_SIZE: Final = 4096
_SHOWN_CHARS: Final = 60  # how much of an offending value a rejection detail quotes
_SORTED: Final = orjson.OPT_SORT_KEYS
_ITEM_KEYS_HINT: Final = "an object with data/timestamp/failure/availability"
_NO_PROPERTIES: Final[frozenset[str]] = frozenset()


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was not decoded. ``reason`` is one of :data:`REASONS`."""

    reason: str
    detail: str
    message_id: str | None
    vin: str | None


class Decoded(NamedTuple):
    """The outcome of one message: ``rows`` (in :data:`COLUMNS` order) or a ``rejection``.

    A NamedTuple: one is built per message, at about half the cost of a frozen dataclass.
    """

    message_id: str | None
    vin: str | None
    rows: list[Row]
    rejection: Rejection | None
    unknown_properties: int


class _Reject(Exception):
    """Control flow inside this module; :meth:`Decoder.decode` turns it into a Rejection."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _show(value: Any) -> str:
    """A short rendering of an offending value for a rejection detail."""
    try:
        text = repr(value) if isinstance(value, str) else orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson encodes
        text = f"a {_kind(value)} nested too deeply to show"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _kind(value: Any) -> str:
    """JSON type name of a decoded value, for details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_days: dict[str, int] = {}
# The last timestamp parsed and its value. The items of one message (a V2 envelope's properties,
# a V1 list) usually share a timestamp, so most lookups after the first are one string compare.
# One tuple, swapped whole, so threads sharing a Decoder never see a text with another's value.
_last_timestamp: list[tuple[str, int | None]] = [("", None)]
_UTC_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


def parse_timestamp_ms(text: str) -> int | None:
    """Milliseconds since the Unix epoch for an ISO 8601 date-time, or ``None`` if invalid.

    Sub-millisecond digits are truncated (floor), matching Arrow's ``timestamp[ms]`` column.
    """
    last_text, last_ms = _last_timestamp[0]
    if text == last_text:
        return last_ms
    millis = _parse_utc_z(text) if _is_utc_z_shape(text) else _parse_iso8601(text)
    _last_timestamp[0] = (text, millis)
    return millis


def _is_utc_z_shape(text: str) -> bool:
    """Whether ``text`` is laid out as HM sends it: ``YYYY-MM-DDTHH:MM:SS[.digits]Z``, in ASCII.

    Only the layout: the digits' values are :func:`_parse_utc_z`'s to check.
    """
    return (
        text[-1:] == "Z"
        and text.isascii()
        and text[10:11] == "T"
        and text[4] == "-"
        and text[7] == "-"
        and text[13] == ":"
        and text[16] == ":"
        and (len(text) == 20 or (text[19] == "." and text[20:-1].isdigit()))
    )


def _parse_utc_z(text: str) -> int | None:
    """The fast path, for the layout :func:`_is_utc_z_shape` checked: the C ``fromisoformat``
    (it checks every digit and range) at about half the regex's cost. It also accepts layouts
    this project rejects (no seconds, a bare date, any separator), hence the layout check first.
    """
    try:
        return (datetime.fromisoformat(text) - _UTC_EPOCH) // _ONE_MS
    except ValueError:
        return None


def _parse_iso8601(text: str) -> int | None:
    """Every other layout the grammar allows (offsets, lower case, no zone, a comma)."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    day_text, hh, mm, ss, fraction, sign, off_h, off_m = match.groups()
    days = _days.get(day_text)
    if days is None:
        try:
            days = date.fromisoformat(day_text).toordinal() - _EPOCH_ORDINAL
        except ValueError:
            return None
        if len(_days) >= _DAY_CACHE_SIZE:
            _days.clear()
        _days[day_text] = days
    hour, minute, second = int(hh), int(mm), int(ss)
    if hour > 23 or minute > 59 or second > 59:
        return None
    seconds = days * 86400 + hour * 3600 + minute * 60 + second
    if sign is not None:
        offset_h, offset_m = int(off_h), int(off_m) if off_m else 0
        if offset_h > 23 or offset_m > 59:
            return None
        offset = offset_h * 3600 + offset_m * 60
        seconds = seconds - offset if sign == "+" else seconds + offset
    millis = int(fraction[:3].ljust(3, "0")) if fraction else 0
    return seconds * 1000 + millis


# orjson parses documents up to 1024 levels deep but encodes only up to this many: a value that
# parsed can still be too deep to store as JSON text.
_MAX_ENCODE_DEPTH: Final = 254


def _item_json(value: Any, capability: str, prop: str, list_index: int, field: str) -> str:
    """``value`` as JSON text with sorted keys; too deeply nested is a malformed item."""
    try:
        return orjson.dumps(value, option=_SORTED).decode()
    except orjson.JSONEncodeError:
        raise _item_error(
            capability,
            prop,
            list_index,
            field,
            f"nested more than {_MAX_ENCODE_DEPTH} levels deep",
        ) from None


def _item_error(capability: str, prop: str, index: int, field: str | None, problem: str) -> _Reject:
    where = f"data.{capability}.{prop}" + (f"[{index}]" if index >= 0 else "")
    if field:
        where += f".{field}"
    return _Reject(REASON_MALFORMED_ITEM, f"{where}: {problem}")


_Values = tuple[
    int | None, float | None, str | None, str | None, bool | None, str | None,
    str | None, str | None, str | None,
]  # fmt: skip


def _item_values(item: Any, capability: str, prop: str, list_index: int) -> _Values:
    """Timestamp, value, failure and availability columns of one property item.

    ``list_index`` is the item's position in its property's list, or -1 for a V1 single item.
    """
    if type(item) is not dict:
        raise _item_error(
            capability, prop, list_index, None, f"expected {_ITEM_KEYS_HINT}, got {_kind(item)}"
        )
    get = item.get
    data = get("data")
    number: float | None = None
    unit: str | None = None
    string: str | None = None
    boolean: bool | None = None
    as_json: str | None = None
    kind: type[Any] = type(data)
    if data is None:
        pass
    elif kind is bool:
        boolean = data
    elif kind is float or kind is int:
        number = float(data)
    elif kind is str:
        string = data
    elif (
        kind is dict
        and len(data) == 2
        and type(data.get("unit")) is str
        and type(data.get("value")) in (int, float)
    ):
        number = float(data["value"])
        unit = data["unit"]
    else:
        as_json = _item_json(data, capability, prop, list_index, "data")

    timestamp: int | None = None
    raw_timestamp = get("timestamp")
    if raw_timestamp is not None:
        if type(raw_timestamp) is str:
            timestamp = parse_timestamp_ms(raw_timestamp)
        if timestamp is None:
            raise _item_error(
                capability, prop, list_index, "timestamp", f"{_show(raw_timestamp)} is not ISO 8601"
            )

    failure_reason: str | None = None
    failure_description: str | None = None
    failure = get("failure")
    if failure is not None:
        if type(failure) is not dict:
            raise _item_error(
                capability, prop, list_index, "failure", f"expected an object, got {_kind(failure)}"
            )
        failure_reason = failure.get("reason")
        failure_description = failure.get("description")
        for name, value in (("reason", failure_reason), ("description", failure_description)):
            if value is not None and type(value) is not str:
                raise _item_error(
                    capability,
                    prop,
                    list_index,
                    f"failure.{name}",
                    f"expected a string, got {_kind(value)}",
                )

    availability_json: str | None = None
    availability = get("availability")
    if availability is not None:
        if type(availability) is not dict:
            raise _item_error(
                capability,
                prop,
                list_index,
                "availability",
                f"expected an object, got {_kind(availability)}",
            )
        availability_json = _item_json(availability, capability, prop, list_index, "availability")

    return (
        timestamp,
        number,
        unit,
        string,
        boolean,
        as_json,
        failure_reason,
        failure_description,
        availability_json,
    )


def _check_v1_field(value: Any, field: str, expected: str | None) -> None:
    """A V1 payload's ``capability`` / ``property``, where present, must match its topic."""
    if value is None or value == expected:
        return
    if type(value) is not str:
        raise _Reject(REASON_MISSING_FIELD, f"{field} must be a string, got {_kind(value)}")
    raise _Reject(
        REASON_TOPIC_MISMATCH,
        f"payload {field} {value!r} differs from topic {field} {expected!r}",
    )


def _required_string(payload: dict[str, Any], field: str) -> str:
    value = payload.get(field)
    if type(value) is not str or not value:
        problem = (
            "is missing" if value is None else f"must be a non-empty string, got {_show(value)}"
        )
        raise _Reject(REASON_MISSING_FIELD, f"{field} {problem}")
    return value


class Decoder:
    """Decodes HM V1 and V2 MQTT messages. One instance serves every topic; it keeps no
    per-message state, so it may be shared by threads.

    ``app_id``: when set, messages on another application's topics are rejected.
    """

    def __init__(
        self, *, app_id: str | None = None, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    ) -> None:
        self.app_id = app_id
        self.max_payload_bytes = max_payload_bytes
        # Properties by capability: one dict lookup per capability and a cached str hash per
        # property, instead of building and hashing a (capability, property) tuple each time.
        self._known = {
            capability: frozenset(props)
            for capability, props in catalogue.load().capabilities.items()
        }

    def decode(self, topic: str, payload: bytes, received_at_us: int) -> Decoded:
        """Decode one message. Never raises for any topic or payload bytes."""
        message_id: str | None = None
        vin: str | None = None
        try:
            if len(payload) > self.max_payload_bytes:
                raise _Reject(
                    REASON_PAYLOAD_TOO_LARGE,
                    f"payload is {len(payload)} bytes; the limit is {self.max_payload_bytes}",
                )
            try:
                body = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                try:
                    bytes(payload).decode("utf-8")
                except UnicodeDecodeError as utf_exc:
                    raise _Reject(
                        REASON_INVALID_UTF8,
                        f"payload is not UTF-8: {utf_exc.reason} at byte {utf_exc.start}",
                    ) from None
                raise _Reject(REASON_INVALID_JSON, f"payload is not JSON: {exc}") from None
            if type(body) is not dict:
                raise _Reject(
                    REASON_NOT_AN_OBJECT,
                    f"payload top level is a JSON {_kind(body)}, not an object",
                )
            # Read identity early (unvalidated) so even a rejection carries what could be read.
            raw_id = body.get("message_id")
            message_id = raw_id if type(raw_id) is str and raw_id else None
            raw_vin = body.get("vin")
            vin = raw_vin if type(raw_vin) is str and raw_vin else None

            try:
                parsed = parse_topic(topic)
            except TopicError as exc:
                raise _Reject(REASON_BAD_TOPIC, str(exc)) from None
            if vin is None:
                vin = parsed.vin
            return self._decode_body(body, parsed, topic, received_at_us)
        except _Reject as reject:
            if vin is None:
                vin = _topic_vin(topic)
            return Decoded(
                message_id, vin, [], Rejection(reject.reason, reject.detail, message_id, vin), 0
            )
        except Exception as exc:  # a decoder bug must quarantine one message, not crash-loop
            detail = f"{type(exc).__name__}: {exc}"[:500]
            return Decoded(
                message_id, vin, [], Rejection(REASON_DECODER_ERROR, detail, message_id, vin), 0
            )

    def _decode_body(
        self, body: dict[str, Any], parsed: Topic, topic: str, received_at_us: int
    ) -> Decoded:
        if self.app_id is not None and parsed.app_id != self.app_id:
            raise _Reject(
                REASON_APP_MISMATCH,
                f"topic app id {parsed.app_id!r} is not the configured {self.app_id!r}",
            )
        version = body.get("version")
        if type(version) not in (int, float) or version not in (1, 2):
            problem = "is missing" if version is None else f"is {_show(version)}"
            raise _Reject(REASON_UNSUPPORTED_VERSION, f"version {problem}; expected 1 or 2")
        version = int(version)
        if version != parsed.version:
            raise _Reject(
                REASON_TOPIC_MISMATCH,
                f"payload version {version} arrived on a V{parsed.version} topic {topic!r}",
            )
        message_id = body.get("message_id")
        if type(message_id) is not str or not message_id:
            message_id = _required_string(body, "message_id")
        vin = body.get("vin")
        if type(vin) is not str or not vin:
            vin = _required_string(body, "vin")
        data = body.get("data")
        if type(data) is not dict:
            problem = "is missing" if data is None else f"must be an object, got {_kind(data)}"
            raise _Reject(REASON_MISSING_FIELD, f"data {problem}")

        if version == 1:
            if vin != parsed.vin:
                raise _Reject(
                    REASON_VIN_MISMATCH,
                    f"payload vin {vin!r} differs from topic vin {parsed.vin!r}",
                )
            # Both optional in practice (the topic already names them); checked where present.
            _check_v1_field(body.get("capability"), "capability", parsed.capability)
            _check_v1_field(body.get("property"), "property", parsed.property)
        else:
            application_id = body.get("application_id")
            if application_id is not None and application_id != parsed.app_id:
                raise _Reject(
                    REASON_APP_MISMATCH,
                    f"payload application_id {_show(application_id)} differs from topic app id "
                    f"{parsed.app_id!r}",
                )
            if _VIN.fullmatch(vin) is None:
                raise _Reject(
                    REASON_INVALID_VIN, f"vin {_show(vin)} is not 17 upper-case letters/digits"
                )

        rows: list[Row] = []
        append = rows.append
        known = self._known
        unknown = 0
        index = 0
        for capability, props in data.items():
            if type(props) is not dict:
                raise _Reject(
                    REASON_MALFORMED_ITEM,
                    f"data.{capability}: expected an object of properties, got {_kind(props)}",
                )
            known_props = known.get(capability, _NO_PROPERTIES)
            if version == 1 and capability != parsed.capability:
                raise _Reject(
                    REASON_TOPIC_MISMATCH,
                    f"data.{capability} differs from topic capability {parsed.capability!r}",
                )
            for prop, value in props.items():
                if version == 1 and prop != parsed.property:
                    raise _Reject(
                        REASON_TOPIC_MISMATCH,
                        f"data.{capability}.{prop} differs from topic property {parsed.property!r}",
                    )
                if type(value) is list:
                    items: list[Any] = value
                    first_list_index = 0
                elif version == 1:
                    items = [value]
                    first_list_index = -1  # a single item: details name no [index]
                else:
                    raise _Reject(
                        REASON_MALFORMED_ITEM,
                        f"data.{capability}.{prop}: V2 properties are arrays of items, "
                        f"got {_kind(value)}",
                    )
                for list_index, item in enumerate(items, first_list_index):
                    ts, num, unit, text, flag, js, f_reason, f_desc, avail = _item_values(
                        item, capability, prop, list_index
                    )
                    append(
                        (
                            message_id, index, vin, capability, prop, ts, received_at_us,
                            num, unit, text, flag, js, f_reason, f_desc, avail, version, topic,
                        )
                    )  # fmt: skip
                    index += 1
                if prop not in known_props:
                    unknown += len(items)
        return Decoded(message_id, vin, rows, None, unknown)


def _topic_vin(topic: str) -> str | None:
    """The VIN segment of a V1-shaped topic, for rejections of unreadable payloads."""
    try:
        return parse_topic(topic).vin
    except TopicError:
        return None
