"""What the demo produced: the Parquet output read back, checked against what the stream sent,
printed as a summary with queries to paste, and saved as ``summary.json``."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ingest.demo.fleet import FleetVehicle
from ingest.demo.metrics import Figures

TABLES = ("telemetry", "rejected")
# Printed for the user to paste ({telemetry}/{rejected} become read_parquet(...)), never run here.
PER_VEHICLE_SQL = (
    "SELECT vin, count(*) AS rows, count(DISTINCT message_id) AS messages, "
    "max(value_number) FILTER (WHERE property = 'odometer') AS odometer_km, "
    "arg_max(value_number, timestamp) FILTER (WHERE property = 'battery_level') AS battery "
    "FROM {telemetry} GROUP BY vin ORDER BY vin"
)
REASONS_SQL = (
    "SELECT reason, count(*) AS messages FROM {rejected} GROUP BY reason ORDER BY messages DESC"
)


@dataclass
class TableFiles:
    files: int = 0
    rows: int = 0
    bytes: int = 0


@dataclass
class Output:
    """The Parquet under ``data/``, read back."""

    tables: dict[str, TableFiles] = field(default_factory=dict)
    rows_by_vin: Counter[str] = field(default_factory=Counter)
    messages: int = 0  # distinct message ids in telemetry
    reasons: Counter[str] = field(default_factory=Counter)  # quarantined messages by reason


def read_output(data: Path) -> Output:
    output = Output()
    for table in TABLES:
        files = sorted((data / table).glob("*/*.parquet"))
        output.tables[table] = TableFiles(
            len(files),
            sum(int(pq.read_metadata(p).num_rows) for p in files),
            sum(p.stat().st_size for p in files),
        )
    ids: set[str] = set()
    for path in sorted((data / "telemetry").glob("*/*.parquet")):
        columns = pq.read_table(path, columns=["vin", "message_id"])
        output.rows_by_vin.update(str(v) for v in columns.column("vin").to_pylist())
        ids.update(columns.column("message_id").to_pylist())
    output.messages = len(ids)
    for path in sorted((data / "rejected").glob("*/*.parquet")):
        output.reasons.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
    return output


@dataclass
class Run:
    """Everything the demo learned while running, for the summary and the checks."""

    fleet: list[FleetVehicle]
    clearances: dict[str, str]  # the emulator's (HM's) view at the end
    stream: dict[str, Any] | None  # GET /_emulator/stream at the end
    figures: Figures  # the daemon's last /metrics
    drained: bool  # every published message was acknowledged by the daemon before it stopped
    seconds: float


@dataclass(frozen=True)
class Check:
    ok: bool
    text: str


def checks(run: Run, output: Output) -> list[Check]:
    """The demo's promises, each true or false; the last two only once everything drained."""
    approved = sorted(v for v, s in run.clearances.items() if s == "approved")
    others = sorted(v.vin for v in run.fleet if run.clearances.get(v.vin) != "approved")
    found = [
        Check(
            bool(approved),
            f"{len(approved)} of {len(run.fleet)} vehicles approved"
            + ("" if approved else ": did the daemon's fleet control register the fleet file?"),
        ),
        Check(
            all(output.rows_by_vin[v] for v in approved),
            "telemetry for every approved vehicle"
            + "".join(f"\n      none for {v}" for v in approved if not output.rows_by_vin[v]),
        ),
        Check(
            not any(output.rows_by_vin[v] for v in others),
            "no telemetry for vehicles not approved"
            + "".join(f"\n      rows for {v}" for v in others if output.rows_by_vin[v]),
        ),
    ]
    if run.stream is None or not run.drained:
        return found
    sent = run.stream["vehicles"]
    wrong = [
        f"\n      {vin}: {output.rows_by_vin[vin]} rows written, {c['items']} sent"
        for vin, c in sent.items()
        if output.rows_by_vin[vin] != c["items"]
    ]
    bad = run.stream["totals"]["bad"]
    quarantined = sum(output.reasons.values())
    return [
        *found,
        Check(
            not wrong,
            "rows per vehicle == items the stream sent (repeats dropped)" + "".join(wrong),
        ),
        Check(
            quarantined == bad,
            f"quarantined messages ({quarantined}) == bad messages injected ({bad})",
        ),
    ]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def summary_lines(run: Run, output: Output, data: Path) -> list[str]:
    statuses = Counter(run.clearances.get(v.vin, "not registered") for v in run.fleet)
    lines = [
        f"Summary ({data}, {run.seconds:.0f} s)",
        f"  fleet        {len(run.fleet)} vehicles: "
        + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        + " (the emulator rejects VINs ending in R)",
    ]
    if run.stream is not None:
        t = run.stream["totals"]
        versions = ", ".join(f"{k} {n}" for k, n in sorted(t["by_version"].items()))
        lines.append(
            f"  stream       {t['messages']} messages ({versions or 'none'}) with {t['items']} "
            f"items ({_plural(t['failures'], 'failure')}), {_plural(t['duplicates'], 'repeat')}, "
            f"{t['bad']} bad"
        )
    tel, rej = output.tables["telemetry"], output.tables["rejected"]
    lines += [
        f"  telemetry    {tel.rows} rows from {output.messages} messages, {tel.files} files, "
        f"{_size(tel.bytes)}",
        f"  duplicates   {_plural(run.figures.duplicates, 'repeat')} dropped by message_id",
        f"  quarantined  {sum(output.reasons.values())} messages ({rej.files} files)",
        *(f"    {reason:<22} {n}" for reason, n in output.reasons.most_common()),
        "  per vehicle",
    ]
    for vehicle in run.fleet:
        status = run.clearances.get(vehicle.vin, "-")
        lines.append(
            f"    {vehicle.vin}  {vehicle.brand:<14} {status:<10} "
            f"{output.rows_by_vin[vehicle.vin]:>7} rows"
        )
    if not run.drained:
        lines.append("  note: stopped before the daemon had acknowledged everything published")
    return lines


def shell_quote(text: str) -> str:
    """Quote for bash, readably: double quotes (SQL keeps its single quotes) unless ``!``."""
    if "!" in text:
        return shlex.quote(text)
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in text)
    return f'"{escaped}"'


def queries(data: Path) -> str:
    """Ready-to-paste DuckDB and pyarrow queries against ``data``."""

    def source(table: str) -> str:
        glob = str(data / table / "*" / "*.parquet").replace("'", "''")
        return f"read_parquet('{glob}', hive_partitioning = true)"

    per_vehicle = PER_VEHICLE_SQL.replace("{telemetry}", source("telemetry"))
    reasons = REASONS_SQL.replace("{rejected}", source("rejected"))
    python = shlex.quote(sys.executable)
    duckdb_py = f"import duckdb; duckdb.sql({per_vehicle!r}).show()"
    arrow_py = (
        "import pyarrow.dataset as ds; "
        f"t = ds.dataset({str(data / 'telemetry')!r}, format='parquet', "
        "partitioning='hive').to_table(); "
        "counts = t.group_by(['vin', 'property']).aggregate([('message_id', 'count')]); "
        "[print(row) for row in counts.sort_by([('vin', 'ascending')]).to_pylist()]"
    )
    lines = [
        "Query the output (pyarrow comes with hm-ingest; DuckDB with its dev extras, "
        "which `make install` installs):"
    ]
    lines += [f"  {python} -c {shell_quote(duckdb_py)}", f"  {python} -c {shell_quote(arrow_py)}"]
    if shutil.which("duckdb"):
        lines += [f"  duckdb -c {shell_quote(sql)}" for sql in (per_vehicle, reasons)]
    else:
        reasons_py = f"import duckdb; duckdb.sql({reasons!r}).show()"
        lines.append(f"  {python} -c {shell_quote(reasons_py)}")
    return "\n".join(lines)


def write_summary(path: Path, run: Run, output: Output, found: list[Check]) -> None:
    data = {
        "seconds": run.seconds,
        "drained": run.drained,
        "fleet": [{"vin": v.vin, "brand": v.brand} for v in run.fleet],
        "clearances": run.clearances,
        "stream": run.stream,
        "daemon": {
            "received": run.figures.received,
            "acked": run.figures.acked,
            "telemetry_rows": run.figures.telemetry_rows,
            "duplicates": run.figures.duplicates,
            "quarantined": dict(run.figures.quarantined),
            "clearance": run.figures.clearance,
        },
        "output": {
            "rows_by_vin": dict(output.rows_by_vin),
            "messages": output.messages,
            "quarantined": dict(output.reasons),
            "tables": {name: vars(t) for name, t in output.tables.items()},
        },
        "checks": [{"ok": c.ok, "check": c.text} for c in found],
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
