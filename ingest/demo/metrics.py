"""The figures the demo shows, read from the daemon's Prometheus ``/metrics``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Figures:
    received: int = 0
    acked: int = 0
    telemetry_rows: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)  # by reason
    clearance: dict[str, int] = field(default_factory=dict)  # vehicles by status

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


def parse(text: str) -> Figures:
    totals: Counter[str] = Counter()
    quarantined: Counter[str] = Counter()
    clearance: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name: str = sample.name
            labels: dict[str, str] = sample.labels
            value = int(sample.value)
            if name == "hm_ingest_messages_received_total":
                totals["received"] += value
            elif name == "hm_ingest_messages_acked_total":
                totals["acked"] += value
            elif name == "hm_ingest_rows_written_total" and labels.get("table") == "telemetry":
                totals["rows"] += value
            elif name == "hm_ingest_duplicates_total":
                totals["duplicates"] += value
            elif name == "hm_ingest_messages_rejected_total":
                quarantined[labels.get("reason", "")] += value
            elif name == "hm_ingest_clearance_vehicles" and value:
                clearance[labels.get("status", "")] = value
    return Figures(
        received=totals["received"],
        acked=totals["acked"],
        telemetry_rows=totals["rows"],
        duplicates=totals["duplicates"],
        quarantined=quarantined,
        clearance=clearance,
    )


def scrape(url: str) -> Figures | None:
    """The daemon's figures, or None while ``/metrics`` does not answer."""
    try:
        response = httpx.get(url, timeout=SCRAPE_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    return parse(response.text) if response.status_code == 200 else None
