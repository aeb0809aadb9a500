"""Restarts keep state and credentials; the command-line entry point prints its JSON line."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from ingest.emulator import EmulatorServer, ManualClock

if TYPE_CHECKING:
    from tests.emulator.conftest import HM

VIN = "SBXTESTVN00000001"


async def test_state_and_credentials_survive_restart(hm: HM, tmp_path: Path) -> None:
    await hm.add(VIN, team="a")
    await hm.advance(60)
    token = await hm.token()
    before = (await hm.api("GET", f"/fleets/vehicles/{VIN}", token=token)).json()
    state_dir = hm.server.state_dir
    # Stop the fixture's server now; its own teardown later is a harmless second cleanup.
    await hm.server.__aexit__(None, None, None)

    clock = ManualClock(hm.clock.now())
    async with EmulatorServer(state_dir, clock=clock) as again:
        info = again.info()
        assert info["client_id"] == hm.client_id
        assert info["client_secret"] == hm.client_secret
        assert (
            Path(info["private_key_file"]).name == Path(hm.server.info()["private_key_file"]).name
        )
        async with httpx.AsyncClient() as http:
            stale = await http.get(
                f"{again.base_url}/fleets/vehicles/{VIN}",
                headers={"Authorization": f"Bearer {token}"},
            )
            # Issued tokens are not persisted: clients must re-authenticate once on a 401.
            assert stale.status_code == 401
            new = await http.post(
                f"{again.base_url}/access_tokens",
                json={
                    "client_id": info["client_id"],
                    "client_secret": info["client_secret"],
                    "grant_type": "client_credentials",
                },
            )
            fresh = new.json()["access_token"]
            after = await http.get(
                f"{again.base_url}/fleets/vehicles/{VIN}",
                headers={"Authorization": f"Bearer {fresh}"},
            )
    assert after.json() == before


async def test_cli_prints_json_line_and_stops_on_sigterm(tmp_path: Path) -> None:
    code = (
        "import argparse, asyncio, sys\n"
        "from ingest.emulator import cli\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        "sys.exit(asyncio.run(cli.main(p.parse_args(sys.argv[1:]))))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--api-listen",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path / "state"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        info = json.loads(line)
        assert set(info) >= {
            "base_url",
            "client_id",
            "client_secret",
            "private_key_file",
            "service_account_key_file",
            "webhook_secret",
        }
        assert info["base_url"].startswith("http://127.0.0.1:")
        assert info["base_url"].endswith("/v1")
        key_text = await asyncio.to_thread(Path(info["service_account_key_file"]).read_text)
        key = json.loads(key_text)
        assert set(key) == {"inserted_at", "private_key", "instance_uri", "token_uri", "id"}
        assert key["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
        assert Path(info["service_account_key_file"]).name == (
            f"service-account-private-key-{key['id']}.json"
        )
        async with httpx.AsyncClient() as http:
            state = await http.get(info["admin_url"] + "/state")
            assert state.status_code == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
