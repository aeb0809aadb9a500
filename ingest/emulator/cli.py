"""Command-line wiring for ``hm-ingest emulator``: :func:`add_arguments` and :func:`main`.

The CLI module registers a sub-command with ``add_arguments(subparser)`` and awaits
``main(args)``; SIGINT/SIGTERM only set the stop event, and the server shuts down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from ingest.emulator.app import parse_listen, run_emulator
from ingest.emulator.context import DEFAULT_TOKEN_TTL_S, EmulatorConfig
from ingest.emulator.rules import ONE_DAY_S, Behaviour, Delays, Outcome, OutcomeRule


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
    except ValueError as exc:
        print(f"hm-ingest emulator: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_emulator(
            args.api_listen, args.state_dir, config=config_from_args(args), stop=stop
        )
    except OSError as exc:  # port in use, unwritable state dir
        print(f"hm-ingest emulator: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
