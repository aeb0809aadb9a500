"""Command-line wiring for ``hm-ingest emulator``: :func:`add_arguments` and :func:`main`.

The CLI module registers a sub-command with ``add_arguments(subparser)`` and awaits
``main(args)``; SIGINT/SIGTERM only set the stop event, and the server shuts down cleanly.
``--mqtt-broker`` adds the vehicle stream (:mod:`ingest.emulator.stream`). Exit codes: 0 stopped
cleanly; 1 a port in use, an unwritable state dir or an unreachable broker; 2 invalid flags.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import uuid
from pathlib import Path

from ingest.argtypes import positive, probability
from ingest.emulator.app import parse_listen, run_emulator
from ingest.emulator.context import DEFAULT_TOKEN_TTL_S, EmulatorConfig
from ingest.emulator.rules import ONE_DAY_S, Behaviour, Delays, Outcome, OutcomeRule
from ingest.emulator.stream import BrokerTarget, StreamConfig, StreamConnectError, StreamSettings
from ingest.emulator.stream.config import (
    DEFAULT_BAD_RATE,
    DEFAULT_DUPLICATE_RATE,
    DEFAULT_FAILURE_RATE,
    DEFAULT_MALFORMED_RATE,
    DEFAULT_RATE,
    ENVIRONMENTS,
    FORMATS,
)

EXIT_FAILURE = 1
EXIT_USAGE = 2
# Flags that only mean something with --mqtt-broker (a typo'd broker flag must not be ignored).
STREAM_ONLY = (
    "mqtt_ca", "mqtt_cert", "mqtt_key", "mqtt_client_id", "mqtt_no_verify_hostname", "app_id",
    "stream_environment", "stream_format", "stream_rate", "stream_vehicle_rate",
    "duplicate_rate", "bad_rate", "malformed_rate", "failure_rate", "stream_seed",
    "stream_vehicles", "stream_paused",
)  # fmt: skip


_MESSAGES_PER_S = positive("a number of messages/s")


def _rule(text: str) -> OutcomeRule:
    """``GLOB=approved|rejected[:REASON]|pending``, e.g. ``*R=rejected:vehicle_not_supported``."""
    glob, sep, outcome = text.partition("=")
    status, _, reason = outcome.partition(":")
    if not sep or status not in ("approved", "rejected", "pending"):
        raise argparse.ArgumentTypeError(
            f"expected GLOB=approved|rejected[:REASON]|pending: {text}"
        )
    return OutcomeRule(glob, Outcome(status, reason or None))  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--state-dir", type=Path, required=True, help="keys, secrets, clearances")
    parser.add_argument("--webhook-url", help="deliver fleet_clearance_changed events here")
    parser.add_argument("--decision-delay-s", type=float, default=5.0, help="pending → outcome")
    parser.add_argument("--revoke-delay-s", type=float, default=5.0, help="revoking → revoked")
    parser.add_argument("--cancel-delay-s", type=float, default=5.0, help="canceling → canceled")
    parser.add_argument(
        "--cancel-min-age-s",
        type=float,
        default=ONE_DAY_S,
        help="refuse (422) cancelling a pending clearance younger than this; HM says 1 day",
    )
    parser.add_argument(
        "--outcome",
        type=_rule,
        action="append",
        metavar="GLOB=STATUS[:REASON]",
        help="outcome rule, first match wins; default: '*R=rejected:vehicle_not_supported'",
    )
    parser.add_argument("--token-ttl-s", type=int, default=DEFAULT_TOKEN_TTL_S)
    _add_stream_arguments(parser.add_argument_group("vehicle stream (needs --mqtt-broker)"))


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _add_stream_arguments(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--mqtt-broker",
        metavar="HOST:PORT",
        help="publish Auto API telemetry for every approved VIN to this broker (mutual TLS)",
    )
    add("--mqtt-ca", type=Path, metavar="FILE", help="CA that signed the broker's certificate")
    add("--mqtt-cert", type=Path, metavar="FILE", help="client certificate (PEM)")
    add("--mqtt-key", type=Path, metavar="FILE", help="its unencrypted private key (PEM)")
    add("--mqtt-client-id", metavar="ID", help="default: hm-emulator-stream-<random>")
    add(
        "--mqtt-no-verify-hostname",
        action="store_true",
        default=None,
        help="accept a broker certificate that does not name the --mqtt-broker host (the chain "
        "is still verified); for local stacks with throwaway certificates only",
    )
    add("--app-id", metavar="ID", help="HM application id in the topics (required)")
    add("--stream-environment", choices=ENVIRONMENTS, help="topic prefix (default live)")
    add(
        "--stream-format",
        choices=FORMATS,
        help="v1 per-property topics, v2 envelopes, or both at random (default both)",
    )
    rates = group.add_mutually_exclusive_group()
    rates.add_argument(
        "--stream-rate",
        type=_MESSAGES_PER_S,
        metavar="N",
        help=f"messages/s for the whole fleet (default {DEFAULT_RATE:g})",
    )
    rates.add_argument(
        "--stream-vehicle-rate", type=_MESSAGES_PER_S, metavar="N", help="messages/s per vehicle"
    )
    add(
        "--duplicate-rate",
        type=probability,
        metavar="P",
        help=f"share of publishes repeating a message_id (default {DEFAULT_DUPLICATE_RATE})",
    )
    add(
        "--bad-rate",
        type=probability,
        metavar="P",
        help=f"share of publishes damaged on purpose (default {DEFAULT_BAD_RATE})",
    )
    add(
        "--malformed-rate",
        type=probability,
        metavar="P",
        help="share of publishes that are not JSON (cut short, trailing garbage, NaN, bad UTF-8), "
        f"message id still readable (default {DEFAULT_MALFORMED_RATE})",
    )
    add(
        "--failure-rate",
        type=probability,
        metavar="P",
        help=f"share of property items sent as a failure (default {DEFAULT_FAILURE_RATE})",
    )
    add("--stream-seed", type=int, metavar="N", help="reproduce a stream (default: random)")
    add(
        "--stream-vehicles",
        type=_count,
        metavar="N",
        help="also clear N generated VINs (approved at once): a fleet for load tests",
    )
    add(
        "--stream-paused",
        action="store_true",
        default=None,
        help='start paused; resume with PUT /_emulator/stream {"paused": false}',
    )


def stream_config_from_args(args: argparse.Namespace) -> StreamConfig | None:
    """The stream to run, or None without ``--mqtt-broker``; ValueError names a bad flag."""
    if args.mqtt_broker is None:
        given = [
            f"--{name.replace('_', '-')}" for name in STREAM_ONLY if getattr(args, name) is not None
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise ValueError(f"{', '.join(given)} {verb} --mqtt-broker HOST:PORT")
        return None
    try:
        host, port = parse_listen(args.mqtt_broker)
    except ValueError:
        raise ValueError(f"--mqtt-broker must be HOST:PORT, got {args.mqtt_broker!r}") from None
    missing = [
        flag
        for flag, value in (("--mqtt-ca", args.mqtt_ca), ("--mqtt-cert", args.mqtt_cert),
                            ("--mqtt-key", args.mqtt_key), ("--app-id", args.app_id))
        if not value
    ]  # fmt: skip
    if missing:
        raise ValueError(f"--mqtt-broker needs {', '.join(missing)} as well")
    for flag, path in (("--mqtt-ca", args.mqtt_ca), ("--mqtt-cert", args.mqtt_cert),
                       ("--mqtt-key", args.mqtt_key)):  # fmt: skip
        if not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    vehicle_rate = args.stream_vehicle_rate
    settings = StreamSettings(
        app_id=args.app_id,
        format=args.stream_format or "both",
        rate=None if vehicle_rate else (args.stream_rate or DEFAULT_RATE),
        vehicle_rate=vehicle_rate,
        duplicate_rate=_or(args.duplicate_rate, DEFAULT_DUPLICATE_RATE),
        bad_rate=_or(args.bad_rate, DEFAULT_BAD_RATE),
        malformed_rate=_or(args.malformed_rate, DEFAULT_MALFORMED_RATE),
        failure_rate=_or(args.failure_rate, DEFAULT_FAILURE_RATE),
        # A random seed by default, reported in the JSON line so a run can be reproduced.
        seed=args.stream_seed if args.stream_seed is not None else secrets.randbelow(2**31),
        environment=args.stream_environment or "live",
        paused=bool(args.stream_paused),
        vehicles=args.stream_vehicles or 0,
    )
    broker = BrokerTarget(
        host,
        port,
        args.mqtt_ca,
        args.mqtt_cert,
        args.mqtt_key,
        args.mqtt_client_id or f"hm-emulator-stream-{uuid.uuid4().hex[:8]}",
        verify_hostname=not args.mqtt_no_verify_hostname,
    )
    return StreamConfig(settings, broker)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    delays = Delays(args.decision_delay_s, args.revoke_delay_s, args.cancel_delay_s)
    behaviour = Behaviour(delays=delays, cancel_min_age_s=args.cancel_min_age_s)
    if args.outcome:
        behaviour = Behaviour(delays, tuple(args.outcome), cancel_min_age_s=args.cancel_min_age_s)
    return EmulatorConfig(
        behaviour=behaviour, expires_in_s=args.token_ttl_s, webhook_url=args.webhook_url
    )


async def main(args: argparse.Namespace) -> int:
    try:
        parse_listen(args.api_listen)
        stream = stream_config_from_args(args)
    except ValueError as exc:
        print(f"hm-ingest emulator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_emulator(
            args.api_listen,
            args.state_dir,
            config=config_from_args(args),
            stop=stop,
            stream=stream,
        )
    except (OSError, StreamConnectError) as exc:  # port in use, unwritable state dir, no broker
        print(f"hm-ingest emulator: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
