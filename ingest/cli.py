"""Command line: argv → settings → logging → asyncio.run → exit code.

Exit codes: 0 success; 1 runtime failure (or a drain cut short by the shutdown deadline);
2 invalid configuration or credentials (fix the settings; restarting will not help).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from ingest import __version__, compact, fleet_cli, gc_tuning
from ingest.app import run_daemon
from ingest.broker_probe import broker_findings
from ingest.config import Settings, load_settings
from ingest.demo import cli as demo_cli
from ingest.emulator import cli as emulator_cli
from ingest.errors import ConfigError, CredentialError, IngestError
from ingest.logs import configure
from ingest.preflight import Finding, Level, errors, run_checks

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger("ingest.cli")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML settings file; every key can also be set as HM_INGEST_<SECTION>_<KEY>",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hm-ingest",
        description="High Mobility fleet telemetry: mutual-TLS MQTT to Parquet, losing nothing.",
    )
    parser.add_argument("--version", action="version", version=f"hm-ingest {__version__}")
    parser.add_argument(
        "--log-format", choices=["human", "json"], default=None, help="log line format"
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground until SIGTERM/SIGINT")
    _add_config(run)
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser(
        "check", help="validate settings and credentials before a deploy (exit 0 ok, 1 not)"
    )
    _add_config(check)
    check.add_argument(
        "--broker",
        action="store_true",
        help="also connect to the broker (client id <client_id>-check, nothing left behind) and "
        "report what it offers: the topic's ACL, MQTT 5, subscription identifiers, shared "
        "subscriptions",
    )
    check.set_defaults(handler=_cmd_check)

    _add_emulator_command(commands)
    fleet_cli.add_commands(commands)
    compact.add_command(commands)
    demo = commands.add_parser(
        "demo", help="run Mosquitto, the HM emulator and the daemon here: see it all work"
    )
    demo_cli.add_arguments(demo)
    demo.set_defaults(handler=demo_cli.main)
    return parser


def _add_emulator_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The emulator module defines its own arguments."""
    emulator = commands.add_parser(
        "emulator", help="serve an emulator of HM's REST API (and vehicle stream) on loopback"
    )
    emulator_cli.add_arguments(emulator)
    emulator.set_defaults(handler=lambda args: asyncio.run(emulator_cli.main(args)))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, os.environ)


def _configure_logging(args: argparse.Namespace, settings: Settings | None) -> None:
    level = args.log_level or (settings.logging.level if settings else "INFO")
    fmt = args.log_format or (settings.logging.format if settings else "human")
    configure(level, fmt)


def _cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    findings = run_checks(settings)
    if args.broker:
        if any(f.level == Level.ERROR and f.key.startswith("mqtt.") for f in findings):
            findings.append(
                Finding(Level.ERROR, "mqtt.host", "not asked: fix the [mqtt] errors above first")
            )
        else:
            findings.extend(broker_findings(settings))
    for finding in findings:
        print(finding)
    failed = sum(1 for f in findings if f.level == Level.ERROR)
    warned = sum(1 for f in findings if f.level == Level.WARN)
    print(f"{failed} error(s), {warned} warning(s)")
    return EXIT_FAILURE if failed else EXIT_OK


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, trigger: Callable[[], None]) -> None:
    # Handlers only set the shutdown event; the daemon drains on its own schedule.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, trigger)


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(args, settings)
    findings = run_checks(settings)
    for finding in findings:
        if finding.level == Level.WARN:
            log.warning("%s", finding)
    problems = errors(findings)
    if problems:
        raise CredentialError(
            "refusing to start:\n  "
            + "\n  ".join(str(p) for p in problems)
            + "\nrun 'hm-ingest check' for the full report"
        )

    async def main() -> int:
        shutdown = asyncio.Event()
        _install_signal_handlers(asyncio.get_running_loop(), shutdown.set)
        return await run_daemon(settings, shutdown)

    # pyarrow's default allocator (mimalloc) keeps memory freed after each commit resident; the
    # C library's returns it, which took the 1M-message drain from 343 to 282 MB peak RSS at equal
    # throughput (bench/batch_memory.py, bench/drain_bench.py).
    pa.set_memory_pool(pa.system_memory_pool())
    gc_tuning.tune()  # after the imports and the checks: see ingest.gc_tuning
    return asyncio.run(main())


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _run_handler(args: argparse.Namespace) -> int:
    """The daemon's tasks fail inside a TaskGroup; surface the cause so main() reports it plainly.

    A known failure (an IngestError) then prints as one clear line with exit 1 instead of an
    ExceptionGroup traceback; anything else (a bug) still propagates with its traceback.
    """
    try:
        code: int = args.handler(args)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        for extra in leaves[1:]:
            log.error("also failed: %s", extra)
        raise leaves[0] from group
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        _configure_logging(args, None)
    try:
        code = _run_handler(args)
    except (ConfigError, CredentialError) as exc:
        print(f"hm-ingest: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except IngestError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    raise SystemExit(main())
