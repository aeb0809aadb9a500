"""Operator commands for HM fleet clearance and per-VIN tokens: ``hm-ingest fleet|token ...``.

::

    hm-ingest fleet list [--status S] [--json]
    hm-ingest fleet show VIN [--json]
    hm-ingest fleet add VIN... --brand B [--tag k=v]... | fleet add --file F
    hm-ingest fleet remove VIN...
    hm-ingest fleet sync --file F [--prune] [--dry-run] [--json]
    hm-ingest token vin VIN | token refresh REFRESH_TOKEN | token revoke TOKEN [--hint H]

Settings come from ``--config`` and ``HM_INGEST_*`` like ``hm-ingest run``: ``[api]`` for HM,
``[state] path`` for the clearance store, where add/remove/sync record what HM answered (source
``cli``) so the daemon's history shows who changed what. Human tables by default, ``--json`` for
scripts. Exit codes: 0 ok; 1 HM failed or refused some items; 2 bad input or settings (VINs and
brands are checked here, before anything is sent).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import orjson

from ingest.config import Settings, load_settings
from ingest.errors import ApiError, ConfigError
from ingest.fleet import views
from ingest.fleet.apiclient import build_api_client
from ingest.fleet.desired import DesiredVehicle, load_desired_fleet
from ingest.fleet.plan import plan
from ingest.fleet.reconcile import Reconciler, Refusal
from ingest.fleet.render import ProgressLine, table
from ingest.fleet.store import STORE_FILE, ClearanceStateStore
from ingest.hmapi import (
    Clearance,
    ClearanceResult,
    HmApiClient,
    InvalidVehicleError,
    NotFoundError,
    Odometer,
    VehicleAccessToken,
    validate_vin,
)
from ingest.hmapi.validation import validate_vehicles

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2

# A string: argparse's class is only generic for type checkers, not at runtime.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Command = Callable[[argparse.Namespace, Settings, HmApiClient], Awaitable[int]]


# -- registration -------------------------------------------------------------------------------


def add_commands(commands: Subparsers) -> None:
    """Add ``fleet`` and ``token`` to ``hm-ingest``'s sub-commands."""
    _add_fleet(commands)
    _add_token(commands)


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML settings file ([api] and [state]); every key can also be set as "
        "HM_INGEST_<SECTION>_<KEY>",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _add_fleet(commands: Subparsers) -> None:
    fleet = commands.add_parser(
        "fleet",
        help="HM fleet clearance: list, show, add, remove, sync",
        description="Manage which vehicles are cleared to send data. Exit codes: 0 ok, 1 HM "
        "failed or refused some items, 2 bad input or settings.",
    )
    actions = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="every clearance HM holds for this app")
    listing.add_argument("--status", action="append", help="only this status (repeatable)")
    _common(listing)
    listing.set_defaults(handler=_handler(_list))

    show = actions.add_parser("show", help="one VIN's clearance and its changelog")
    show.add_argument("vin", metavar="VIN")
    _common(show)
    show.set_defaults(handler=_handler(_show))

    add = actions.add_parser(
        "add",
        help="request clearance for VINs (or every vehicle in a fleet file)",
        description="Request clearance: VIN... --brand B [--tag k=v]..., or --file F (CSV or "
        "YAML, as for fleet sync). Everything is checked before anything is sent.",
    )
    add.add_argument("vins", metavar="VIN", nargs="*")
    add.add_argument("--brand", help="HM brand string for the VINs given, e.g. bmw")
    add.add_argument("--tag", action="append", default=[], metavar="K=V", help="repeatable")
    add.add_argument("--odometer", type=int, help="odometer reading HM may ask for")
    add.add_argument("--odometer-unit", choices=["kilometers", "miles"], default="kilometers")
    add.add_argument("--file", type=Path, help="fleet file (CSV or YAML) instead of VINs")
    _common(add)
    add.set_defaults(handler=_handler(_add))

    remove = actions.add_parser(
        "remove", help="revoke approved / cancel pending clearances of VINs"
    )
    remove.add_argument("vins", metavar="VIN", nargs="+")
    _common(remove)
    remove.set_defaults(handler=_handler(_remove))

    sync = actions.add_parser(
        "sync",
        help="make HM's fleet match a fleet file (one reconcile cycle)",
        description="Register the file's vehicles HM does not hold (or revoked/canceled ones); "
        "with --prune also remove clearances not in the file. Rejected vehicles are reported, "
        "not requested again.",
    )
    sync.add_argument("--file", type=Path, required=True, help="fleet file (CSV or YAML)")
    sync.add_argument("--prune", action="store_true", help="remove clearances not in the file")
    sync.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    _common(sync)
    sync.set_defaults(handler=_handler(_sync))


def _add_token(commands: Subparsers) -> None:
    token = commands.add_parser(
        "token",
        help="per-VIN access tokens (PRINTS CREDENTIALS)",
        description="Per-VIN access tokens for HM's pull APIs. 'vin' and 'refresh' print live "
        "access and refresh tokens to stdout: keep the output out of logs and shared terminals.",
    )
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    vin = actions.add_parser(
        "vin", help="obtain an access/refresh token pair for an approved VIN (prints them)"
    )
    vin.add_argument("vin", metavar="VIN")
    _common(vin)
    vin.set_defaults(handler=_handler(_token_vin))
    refresh = actions.add_parser(
        "refresh", help="exchange a refresh token for new tokens (prints them)"
    )
    refresh.add_argument(
        "refresh_token",
        metavar="REFRESH_TOKEN",
        help="the token, or - to read it from stdin (put -- before a token that starts with -)",
    )
    _common(refresh)
    refresh.set_defaults(handler=_handler(_token_refresh))
    revoke = actions.add_parser("revoke", help="revoke an access or refresh token")
    revoke.add_argument(
        "token",
        metavar="TOKEN",
        help="the token, or - to read it from stdin (put -- before a token that starts with -)",
    )
    revoke.add_argument(
        "--hint", choices=["access_token", "refresh_token"], default="refresh_token"
    )
    _common(revoke)
    revoke.set_defaults(handler=_handler(_token_revoke))


def _handler(command: Command) -> Callable[[argparse.Namespace], int]:
    """Settings → client → the command on a fresh event loop; input errors exit 2, HM's 1."""

    def run(args: argparse.Namespace) -> int:
        settings = load_settings(args.config, os.environ)
        # httpx logs every request URL at INFO, VINs included; the tables already say it all.
        logging.getLogger("httpx").setLevel(logging.WARNING)

        async def main() -> int:
            async with build_api_client(settings.api) as client:
                return await command(args, settings, client)

        try:
            return asyncio.run(main())
        except InvalidVehicleError as exc:
            _error(f"refused before sending anything to HM: {exc}")
            return EXIT_INPUT
        except ApiError as exc:
            _error(str(exc))
            return EXIT_FAILURE

    return run


# -- fleet --------------------------------------------------------------------------------------


async def _list(args: argparse.Namespace, _: Settings, client: HmApiClient) -> int:
    clearances = await client.list_clearances(args.status)
    if args.json:
        _print_json([views.clearance_json(c) for c in clearances])
        return EXIT_OK
    rows = [
        (c.vin, c.brand, c.status, views.since(c), views.reason(c), views.tags(c.tags))
        for c in sorted(clearances, key=lambda c: c.vin)
    ]
    print(table(("VIN", "BRAND", "STATUS", "SINCE", "REASON", "TAGS"), rows))
    print(f"{len(clearances)} clearance(s)")
    return EXIT_OK


async def _show(args: argparse.Namespace, _: Settings, client: HmApiClient) -> int:
    validate_vin(args.vin)
    try:
        clearance = await client.get_clearance(args.vin)
    except NotFoundError:
        _error(f"HM holds no clearance for {args.vin}; request one with 'hm-ingest fleet add'")
        return EXIT_FAILURE
    if args.json:
        _print_json(views.clearance_json(clearance))
        return EXIT_OK
    print(f"VIN     {clearance.vin}\nbrand   {clearance.brand or '-'}")
    print(f"status  {clearance.status}\ntags    {views.tags(clearance.tags) or '-'}\n")
    entries = [(views.iso(e.timestamp), e.status, e.reason) for e in clearance.changelog]
    print(table(("TIMESTAMP", "STATUS", "REASON"), entries))
    return EXIT_OK


async def _add(args: argparse.Namespace, settings: Settings, client: HmApiClient) -> int:
    vehicles = _vehicles_to_add(args)
    results = await client.create_clearances([v.to_request() for v in vehicles])
    brands = {v.vin: v.brand for v in vehicles}
    _record(settings, [r for r in results if not r.is_error], brands)
    refused = [r for r in results if r.is_error]
    if args.json:
        _print_json({"results": [views.result_json(r) for r in results], "refused": len(refused)})
    else:
        print(
            table(("VIN", "STATUS", "DETAIL"), [(r.vin, r.status, r.description) for r in results])
        )
        print(f"{len(results) - len(refused)} requested, {len(refused)} refused by HM")
    return EXIT_FAILURE if refused else EXIT_OK


def _vehicles_to_add(args: argparse.Namespace) -> list[DesiredVehicle]:
    if args.file is not None:
        if args.vins or args.brand or args.tag or args.odometer is not None:
            raise ConfigError("give either --file or VINs with --brand/--tag/--odometer, not both")
        return load_desired_fleet(args.file)
    if not args.vins or not args.brand:
        raise ConfigError("fleet add needs VINs and --brand B (or --file F)")
    validate_vehicles((vin, args.brand) for vin in args.vins)
    tags = _parse_tags(args.tag)
    odometer = None
    if args.odometer is not None:
        if args.odometer < 0:
            raise ConfigError(f"--odometer {args.odometer} must not be negative")
        odometer = Odometer(args.odometer, args.odometer_unit)
    duplicates = sorted({vin for vin in args.vins if args.vins.count(vin) > 1})
    if duplicates:
        raise ConfigError(f"VIN(s) given twice: {', '.join(duplicates)}; list each once")
    return [DesiredVehicle(vin, args.brand, tags, odometer) for vin in args.vins]


def _parse_tags(items: Iterable[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--tag {item!r} is not key=value; write e.g. --tag fleet=north")
        tags[key.strip()] = value.strip()
    return tags


async def _remove(args: argparse.Namespace, settings: Settings, client: HmApiClient) -> int:
    for vin in args.vins:
        validate_vin(vin)
    results: list[ClearanceResult] = []
    refused: list[Refusal] = []
    try:
        for vin in dict.fromkeys(args.vins):  # each VIN once, in the order given
            try:
                results.append(await client.delete_clearance(vin))
            except ApiError as exc:
                # HM refusing this VIN (404/409/422) is reported; HM failing stops the command.
                if exc.retriable or exc.status in (0, 401, 403):
                    raise
                detail = exc.detail or exc.title or str(exc)
                refused.append(Refusal(vin, "remove", exc.status, detail))
    finally:
        _record(settings, results, {})  # what HM did accept, even if a later VIN failed
    if args.json:
        _print_json(
            {
                "results": [views.result_json(r) for r in results],
                "refused": [views.refusal_json(r) for r in refused],
            }
        )
    else:
        rows: list[tuple[str, str, str | None]] = [(r.vin, r.status, None) for r in results]
        rows += [(r.vin, f"refused ({r.http_status})", r.detail) for r in refused]
        print(table(("VIN", "STATUS", "DETAIL"), rows))
        print(f"{len(results)} removal(s) started, {len(refused)} refused by HM")
    return EXIT_FAILURE if refused else EXIT_OK


async def _sync(args: argparse.Namespace, settings: Settings, client: HmApiClient) -> int:
    desired = load_desired_fleet(args.file)  # bad file: ConfigError, exit 2, nothing sent
    if args.dry_run:
        current = {c.vin: c for c in await client.list_clearances()}
        proposal = plan(desired, current, prune=args.prune)
        if args.json:
            _print_json({"dry_run": True, "plan": views.plan_json(proposal)})
        else:
            views.print_plan(proposal)
        return EXIT_OK
    progress = ProgressLine()
    with _open_store(settings) as store:
        reconciler = Reconciler(
            client,
            store,
            None,  # the daemon owns the Parquet output; it exports these transitions
            desired_file=args.file,
            prune=args.prune,
            request_source="cli",
        )
        try:
            report = await reconciler.reconcile_once(progress=progress)
        finally:
            progress.close()
    if args.json:
        _print_json(views.report_json(report))
    else:
        views.print_report(report)
    return EXIT_FAILURE if report.failed or report.refused else EXIT_OK


# -- token --------------------------------------------------------------------------------------


async def _token_vin(args: argparse.Namespace, _: Settings, client: HmApiClient) -> int:
    validate_vin(args.vin)
    _print_token(args, await client.fleet_access_token(args.vin))
    return EXIT_OK


async def _token_refresh(args: argparse.Namespace, _: Settings, client: HmApiClient) -> int:
    _print_token(args, await client.refresh_access_token(_argument_secret(args.refresh_token)))
    return EXIT_OK


async def _token_revoke(args: argparse.Namespace, _: Settings, client: HmApiClient) -> int:
    await client.revoke_token(_argument_secret(args.token), args.hint)
    if args.json:
        _print_json({"revoked": True, "token_type_hint": args.hint})
    else:
        print(f"revoked ({args.hint})")
    return EXIT_OK


def _argument_secret(value: str) -> str:
    # "-" keeps the token out of the process list and shell history.
    token = sys.stdin.readline().strip() if value == "-" else value
    if not token:
        raise ConfigError("the token is empty; pass it as an argument or on stdin with -")
    return token


def _print_token(args: argparse.Namespace, token: VehicleAccessToken) -> None:
    # The one place the CLI prints credentials: it is what these commands are for.
    fields = {
        "access_token": token.access_token.reveal(),
        "refresh_token": token.refresh_token.reveal() if token.refresh_token else None,
        "expires_in": token.expires_in,
        "scope": token.scope,
        "token_type": token.token_type,
    }
    if args.json:
        _print_json(fields)
    else:
        for name, value in fields.items():
            print(f"{name:<14} {'-' if value is None else value}")


# -- shared -------------------------------------------------------------------------------------


def _open_store(settings: Settings) -> ClearanceStateStore:
    return ClearanceStateStore(settings.state.path / STORE_FILE)


def _record(settings: Settings, results: Sequence[ClearanceResult], brands: dict[str, str]) -> None:
    """HM's answers into the clearance store, so the daemon's history shows the CLI asked."""
    if not results:
        return
    answers = [Clearance(r.vin, r.status, brands.get(r.vin), r.tags) for r in results]
    with _open_store(settings) as store:
        store.observe(answers, source="cli", at=datetime.now(UTC), complete=False)


def _error(message: str) -> None:
    print(f"hm-ingest: {message}", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


__all__ = ["add_commands"]
