"""hm-fleet-ingest: High Mobility fleet telemetry, mutual-TLS MQTT to Parquet, losing nothing."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hm-fleet-ingest")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
