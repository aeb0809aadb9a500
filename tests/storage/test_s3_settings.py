"""``[output] path = "s3://..."`` through the settings loader and ``hm-ingest check``."""

from __future__ import annotations

import os
from pathlib import Path

from ingest.config import load_settings
from ingest.preflight import Level, run_checks
from ingest.testing.daemon import write_toml
from tests.storage.s3_support import MotoS3


def test_a_uri_in_the_file_stays_a_uri_and_check_probes_the_store(
    s3: MotoS3, tmp_path: Path
) -> None:
    uri = f"s3://{s3.new_bucket()}/hm/prod"
    config = write_toml(
        {"output": {"path": uri}, "state": {"path": "state"}}, tmp_path / "ingest.toml"
    )
    settings = load_settings(config, os.environ)
    assert settings.output.path == uri
    assert settings.state.path == tmp_path / "state"  # relative paths still resolve
    [finding] = [f for f in run_checks(settings) if f.key == "output.path"]
    assert finding.level == Level.OK, finding

    missing = load_settings(
        None,
        {
            **os.environ,
            "HM_INGEST_OUTPUT_PATH": "s3://no-such-bkt/x",
            # The checks create the state folder: keep it out of the working directory.
            "HM_INGEST_STATE_PATH": str(tmp_path / "state"),
        },
    )
    [finding] = [f for f in run_checks(missing) if f.key == "output.path"]
    assert finding.level == Level.WARN
    assert "could not upload s3://no-such-bkt/x/.hm-ingest-probe-" in str(finding)
