"""PendingBatch: the rows, rejections and dedupe keys a commit reads back, whatever the chunking."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ingest import batch as batch_module
from ingest.batch import PendingBatch, dedupe_key
from ingest.decode import Decoder
from ingest.schemas import REJECTED, TELEMETRY, arrow_schema
from ingest.testing.daemon import APP_ID
from ingest.testing.traffic import stream
from ingest.wal import LogRecord


def _records(count: int, first_lsn: int) -> list[LogRecord]:
    return [
        LogRecord(lsn, 1_780_000_000_000_000 + lsn * 7, m.topic, m.payload)
        for lsn, m in enumerate(stream(APP_ID, count, invalid_fraction=0.05, seed=3), first_lsn)
    ]


def _fill(records: list[LogRecord], repeat_every: int) -> tuple[PendingBatch, list[tuple]]:
    """Add ``records`` as the sink does; every ``repeat_every``-th one repeats an earlier key."""
    decoder = Decoder(app_id=APP_ID)
    batch = PendingBatch(first_lsn=records[0].lsn)
    expected_rows = []
    for index, logged in enumerate(records):
        batch.last_lsn = logged.lsn
        record = logged
        if index and index % repeat_every == 0:  # the first message again, at a later lsn
            record = LogRecord(
                logged.lsn, logged.received_at_us, records[0].topic, records[0].payload
            )
        decoded = decoder.decode(record.topic, record.payload, record.received_at_us)
        key = dedupe_key(decoded, record)
        if key not in batch.seen and decoded.rejection is None:
            expected_rows.extend(decoded.rows)
        batch.add(record, decoded, key)
    return batch, expected_rows


@pytest.mark.parametrize("chunk_rows", [1, 7, 8192])
def test_table_holds_every_row_in_order_whatever_the_chunk_size(
    monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    monkeypatch.setattr(batch_module, "CHUNK_ROWS", chunk_rows)
    records = _records(3000, first_lsn=501)
    batch, rows = _fill(records, repeat_every=10)

    table = batch.telemetry.table()

    schema = arrow_schema(TELEMETRY)
    expected = pa.Table.from_arrays(
        [
            pa.array(column, type=f.type)
            for column, f in zip(zip(*rows, strict=True), schema, strict=True)
        ],
        schema=schema,
    )
    assert batch.telemetry.rows == len(rows) == table.num_rows
    assert table.equals(expected)
    # table() is asked again when a commit is retried: the same rows, not an empty table.
    assert batch.telemetry.table().equals(expected)


def test_rejections_are_kept_with_their_raw_payload() -> None:
    records = _records(400, first_lsn=1)
    batch, _ = _fill(records, repeat_every=10**9)

    table = batch.rejected.table()

    assert table.schema == arrow_schema(REJECTED)
    assert table.num_rows == sum(batch.rejected_by_reason.values()) > 0
    by_lsn = {r.lsn: r for r in records}
    for lsn, payload in zip(
        table.column("lsn").to_pylist(), table.column("payload").to_pylist(), strict=True
    ):
        assert payload == by_lsn[lsn].payload


def test_dedupe_entries_carry_each_first_occurrence_lsn_and_receive_time() -> None:
    records = _records(2500, first_lsn=10_000)
    batch, _ = _fill(records, repeat_every=9)
    by_lsn = {r.lsn: r for r in records}

    entries = [(key, lsn, batch.seen_at_us[key]) for key, lsn in batch.seen.items()]

    assert batch.duplicates == len(records) - len(entries) > 0
    assert [lsn for _, lsn, _ in entries] == sorted(lsn for _, lsn, _ in entries)
    for _key, lsn, seen_at_us in entries:
        assert seen_at_us == by_lsn[lsn].received_at_us
    assert len(batch.seen_at_us) == len(entries)
    assert set(batch.seen_at_us) == set(batch.seen)


def test_receive_time_of_a_key_never_seen_is_a_key_error() -> None:
    batch = PendingBatch(first_lsn=5)
    batch.seen["a"] = 5
    batch.seen_at_us["a"] = 123

    assert "a" in batch.seen_at_us
    assert "b" not in batch.seen_at_us
    with pytest.raises(KeyError):
        batch.seen_at_us["b"] = 1
    with pytest.raises(KeyError):
        _ = batch.seen_at_us["b"]
