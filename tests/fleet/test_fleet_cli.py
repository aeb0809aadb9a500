"""``hm-ingest fleet ...`` and ``hm-ingest token ...`` through ``ingest.cli.main`` against the
emulator. main() runs its own event loop, so it runs on a worker thread while the emulator keeps
serving on the test's loop."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ingest import cli
from ingest.fleet import ClearanceStateStore
from ingest.fleet.render import ProgressLine, table

from .conftest import STEP_S, Emulator, vin


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys
        self.out = ""
        self.err = ""

    async def __call__(self, *argv: str) -> int:
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*argv, "--config", str(self.config)])
        captured = self.capsys.readouterr()
        self.out, self.err = captured.out, captured.err
        return code

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def run(
    emulator: Emulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    for name in [n for n in os.environ if n.startswith("HM_INGEST_")]:
        monkeypatch.delenv(name)
    info = emulator.info
    config = tmp_path / "ingest.toml"
    config.write_text(
        f"""
[mqtt]
app_id = "fleet-cli-test"

[state]
path = "state"

[api]
base_url = "{info["base_url"]}"
client_id = "{info["client_id"]}"
client_secret = "{info["client_secret"]}"
""",
        encoding="utf-8",
    )
    return Cli(config, capsys)


def store_of(tmp_path: Path) -> ClearanceStateStore:
    return ClearanceStateStore(tmp_path / "state" / "clearance.sqlite3")


async def test_add_list_show_and_the_store_records_the_cli(
    run: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    code = await run("fleet", "add", vin(1), vin(2), "--brand", "sandbox", "--tag", "fleet=a",
                     "--json")  # fmt: skip
    assert code == 0, run.err
    assert run.json() == {
        "results": [
            {"vin": vin(1), "status": "pending", "description": None},
            {"vin": vin(2), "status": "pending", "description": None},
        ],
        "refused": 0,
    }
    with store_of(tmp_path) as store:
        assert [t.source for t in store.transitions(vin(1))] == ["cli"]
    await emulator.advance(STEP_S)

    assert await run("fleet", "list", "--json") == 0
    listed = {item["vin"]: item for item in run.json()}
    assert listed[vin(1)]["status"] == "approved"
    assert listed[vin(1)]["tags"] == {"fleet": "a"}

    assert await run("fleet", "list", "--status", "pending", "--json") == 0
    assert run.json() == []

    assert await run("fleet", "list") == 0
    assert run.out.splitlines()[0].split() == ["VIN", "BRAND", "STATUS", "SINCE", "REASON", "TAGS"]
    assert vin(2) in run.out
    assert "2 clearance(s)" in run.out

    assert await run("fleet", "show", vin(1), "--json") == 0
    assert [e["status"] for e in run.json()["changelog"]] == ["pending", "approved"]
    assert await run("fleet", "show", vin(1)) == 0
    assert "status  approved" in run.out


async def test_bad_vins_and_brands_are_refused_locally(run: Cli, emulator: Emulator) -> None:
    code = await run("fleet", "add", "WBADT43452G29640", "wbadt43452g296405", "--brand", "bwm")
    assert code == 2
    assert "refused before sending anything to HM" in run.err
    assert "'WBADT43452G29640' has 16 characters" in run.err
    assert "write it as 'WBADT43452G296405'" in run.err
    assert "did you mean 'bmw'?" in run.err
    assert await emulator.statuses() == {}  # nothing reached HM
    assert await run("fleet", "remove", "SHORT") == 2
    assert "'SHORT' has 5 characters" in run.err
    assert await run("fleet", "add", vin(1), "--brand", "bmw", "--tag", "novalue") == 2
    assert "--tag 'novalue' is not key=value" in run.err


async def test_missing_credentials_exit_2_naming_the_setting(run: Cli) -> None:
    text = run.config.read_text().replace("client_secret", "# client_secret")
    run.config.write_text(text)
    assert await run("fleet", "list") == 2
    assert "api.client_secret is empty" in run.err


async def test_show_unknown_vin_exits_1(run: Cli) -> None:
    assert await run("fleet", "show", vin(9)) == 1
    assert f"HM holds no clearance for {vin(9)}" in run.err


async def test_add_reports_items_hm_refuses(run: Cli) -> None:
    # nissan passes the local brand list but the emulator (HM's spec enum) refuses it per item.
    assert await run("fleet", "add", vin(1), "--brand", "nissan", "--json") == 1
    [result] = run.json()["results"]
    assert (result["status"], result["description"]) == ("error", "The brand is invalid")


async def test_remove_reports_hm_refusals(run: Cli, emulator: Emulator, tmp_path: Path) -> None:
    assert await run("fleet", "add", vin(1), vin(2), "--brand", "sandbox") == 0
    await emulator.advance(STEP_S)
    assert await run("fleet", "remove", vin(1), "--json") == 0
    assert run.json()["results"] == [{"vin": vin(1), "status": "revoking", "description": None}]
    # Already in transition: HM answers 409, reported with its detail, exit 1.
    assert await run("fleet", "remove", vin(1), vin(2), "--json") == 1
    answer = run.json()
    assert answer["results"] == [{"vin": vin(2), "status": "revoking", "description": None}]
    assert answer["refused"] == [
        {"vin": vin(1), "action": "remove", "http_status": 409,
         "detail": "Clearance is in transition mode"},
    ]  # fmt: skip
    assert await run("fleet", "remove", vin(7)) == 1
    assert "refused (404)" in run.out
    with store_of(tmp_path) as store:
        assert store.statuses() == {vin(1): "revoking", vin(2): "revoking"}


async def test_sync_dry_run_then_sync_then_prune(
    run: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(f"vin,brand\n{vin(1)},sandbox\n{vin(2, 'R')},sandbox\n")
    assert await run("fleet", "sync", "--file", str(fleet), "--dry-run", "--json") == 0
    assert run.json()["plan"]["create"] == [vin(1), vin(2, "R")]
    assert await emulator.statuses() == {}

    assert await run("fleet", "sync", "--file", str(fleet), "--json") == 0, run.err
    report = run.json()
    assert sorted(r["vin"] for r in report["created"]) == [vin(1), vin(2, "R")]
    assert report["errors"] == []
    await emulator.advance(STEP_S)

    assert await run("fleet", "sync", "--file", str(fleet)) == 0
    assert "rejected (not re-requested)  1" in run.out
    assert "vehicle_not_supported" in run.out

    fleet.write_text(f"vin,brand\n{vin(2, 'R')},sandbox\n")
    assert await run("fleet", "sync", "--file", str(fleet), "--prune", "--json") == 0
    assert [(r["vin"], r["status"]) for r in run.json()["removed"]] == [(vin(1), "revoking")]
    with store_of(tmp_path) as store:
        assert {t.source for t in store.transitions(vin(1))} == {"cli", "reconcile"}


async def test_sync_with_a_bad_file_exits_2_before_any_request(
    run: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(f"vin,brand\n{vin(1)},sandbox\nBAD,sandbox\n")
    assert await run("fleet", "sync", "--file", str(fleet)) == 2
    assert f"{fleet}:3: VIN 'BAD': has 3 characters" in run.err
    assert await emulator.statuses() == {}


async def test_api_outage_exits_1_with_hms_words(run: Cli, emulator: Emulator) -> None:
    await emulator.fault(kind="5xx", status=502, path_prefix="/v1/fleets")
    assert await run("fleet", "list") == 1
    assert "answered 502: Server error: injected fault" in run.err


async def test_token_vin_refresh_and_revoke(
    run: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await run("token", "vin", vin(1)) == 1  # no clearance yet
    assert await run("fleet", "add", vin(1), "--brand", "sandbox") == 0
    await emulator.advance(STEP_S)

    assert await run("token", "vin", vin(1), "--json") == 0
    issued = run.json()
    assert issued["access_token"].count(".") == 2  # a JWT, printed: that is the command's job
    assert issued["refresh_token"]

    # Through stdin: a token may start with "-" (1 in 64 do), which argparse would read as an
    # option on the command line (there it needs "--" before it).
    monkeypatch.setattr("sys.stdin", io.StringIO(issued["refresh_token"] + "\n"))
    assert await run("token", "refresh", "-", "--json") == 0
    refreshed = run.json()
    assert refreshed["access_token"] != issued["access_token"]

    # "-" reads the token from stdin, keeping it out of the process list.
    monkeypatch.setattr("sys.stdin", io.StringIO(refreshed["refresh_token"] + "\n"))
    assert await run("token", "revoke", "-") == 0
    assert "revoked (refresh_token)" in run.out
    monkeypatch.setattr("sys.stdin", io.StringIO(refreshed["refresh_token"] + "\n"))
    assert await run("token", "refresh", "-") == 1


def test_progress_line_draws_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        line = ProgressLine(stream)
        line("create", 100, 200)
        line("create", 200, 200)
    assert pipe.getvalue() == ""
    assert terminal.getvalue().endswith("create  [" + "#" * 30 + "] 200/200\n")


def test_table_pads_columns() -> None:
    assert table(("A", "LONGER"), [("xyz", None)]).splitlines() == [
        "A    LONGER",
        "---  ------",
        "xyz  -",
    ]
