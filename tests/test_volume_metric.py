"""``hm_ingest_volume_available_bytes``: free space where the daemon writes, from the real daemon.

The state folder and the output folder sit on two different filesystems here (the test's disk
and a tmpfs under /dev/shm), so each series must match its own filesystem, not just any disk.
An object-store output (moto's S3) must have no ``output`` series at all.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from ingest.app import Daemon
from ingest.config import Settings
from ingest.testing import CertBundle, MosquittoBroker
from ingest.testing.daemon import daemon_config, wait_for
from ingest.volumes import available_bytes
from tests.storage.s3_support import MotoS3

NAME = "hm_ingest_volume_available_bytes"
MIB = 1 << 20
# Other processes write to these filesystems while the test runs: a figure counts as the same
# filesystem's when within this much of a reading taken right after it.
TOLERANCE = 256 * MIB
SHM = Path("/dev/shm")  # a tmpfs: a second filesystem


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    if not SHM.is_dir() or SHM.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
        pytest.skip("needs /dev/shm as a filesystem apart from the temp folder")
    folder = SHM / f"hm-volume-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def volumes(daemon: Daemon) -> dict[str, float]:
    """The gauge's series by ``volume`` label, as the registry exposes them."""
    found = {}
    for metric in daemon.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == NAME:
                found[sample.labels["volume"]] = sample.value
    return found


async def run_until(daemon: Daemon, scenario: Callable[[], None]) -> int:
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(60):
            started = asyncio.create_task(daemon.started.wait())
            await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if task.done():  # failed at start-up: show why rather than time out
                raise AssertionError(f"the daemon exited at start-up: {task.result()!r}")
            await asyncio.to_thread(scenario)
    finally:
        daemon.shutdown.set()
    return await asyncio.wait_for(task, 60)


def assert_matches(value: float, path: Path) -> None:
    now = available_bytes(path)
    assert now is not None
    assert abs(value - now) <= TOLERANCE, f"{value:.0f} is not the free space of {path} ({now})"


async def test_state_and_local_output_report_their_own_filesystems(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, tmpfs_dir: Path
) -> None:
    tree = daemon_config(broker, certs, tmp_path, overrides={"output": {"path": str(tmpfs_dir)}})
    settings = Settings.model_validate(tree)
    daemon = Daemon(settings, registry=CollectorRegistry())
    ballast = tmpfs_dir / "ballast.bin"

    def scenario() -> None:
        wait_for(lambda: volumes(daemon).keys() == {"state", "output"}, 10, "both series")
        seen = volumes(daemon)
        assert_matches(seen["state"], settings.state.path)
        assert_matches(seen["output"], tmpfs_dir)
        # Two filesystems, two figures: neither series is the other's.
        assert abs(seen["state"] - seen["output"]) > TOLERANCE
        # Exposed on the real /metrics, with the label.
        text = httpx.get(f"http://{tree['metrics']['listen']}/metrics", timeout=5).text
        assert f"# TYPE {NAME} gauge" in text
        assert f'{NAME}{{volume="output"}}' in text

        # Taking 512 MiB of the output volume shows within a few heartbeats.
        before = seen["output"]
        with ballast.open("wb") as f:
            for _ in range(512):
                f.write(b"\0" * MIB)
        wait_for(
            lambda: volumes(daemon)["output"] <= before - 256 * MIB,
            10,
            "the output figure to drop after writing 512 MiB",
        )

    try:
        assert await run_until(daemon, scenario) == 0
    finally:
        ballast.unlink(missing_ok=True)


async def test_object_store_output_has_no_output_series(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, s3: MotoS3
) -> None:
    tree = daemon_config(broker, certs, tmp_path)
    tree["output"]["path"] = f"s3://{s3.new_bucket()}/hm"
    settings = Settings.model_validate(tree)
    daemon = Daemon(settings, registry=CollectorRegistry())

    def scenario() -> None:
        wait_for(lambda: "state" in volumes(daemon), 10, "the state series")
        assert volumes(daemon).keys() == {"state"}
        assert_matches(volumes(daemon)["state"], settings.state.path)

    assert await run_until(daemon, scenario) == 0


def test_a_folder_not_made_yet_is_measured_where_it_will_be(tmp_path: Path) -> None:
    later = tmp_path / "not" / "yet"
    assert available_bytes(later) is not None
    assert_matches(float(available_bytes(later) or 0), tmp_path)
