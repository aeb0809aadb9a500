"""DedupeIndex: the smaller-LSN rule, replays, persistence, pruning, and a model-based check."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import dedupe as dedupe_module
from ingest.dedupe import DedupeIndex
from ingest.errors import LogError

T0_US = 1_790_000_000_000_000
DAY_US = 86_400 * 1_000_000


@pytest.fixture
def index(tmp_path: Path) -> Iterator[DedupeIndex]:
    with DedupeIndex(tmp_path / "dedupe.sqlite3") as opened:
        yield opened


def test_new_keys_are_not_duplicates(index: DedupeIndex) -> None:
    assert index.duplicates([("a", 1), ("b", 2), ("c", 3)]) == set()
    assert index.duplicates([]) == set()


def test_repeat_within_a_batch_is_a_duplicate_after_its_first_occurrence(
    index: DedupeIndex,
) -> None:
    assert index.duplicates([("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]) == {3, 4, 5}


def test_key_seen_at_smaller_lsn_in_index_is_a_duplicate(index: DedupeIndex) -> None:
    index.record([("a", 5, T0_US), ("b", 6, T0_US)])
    assert index.duplicates([("a", 10), ("c", 11), ("b", 12)]) == {10, 12}


def test_replay_of_a_recorded_batch_decides_as_the_first_attempt(index: DedupeIndex) -> None:
    index.record([("old", 1, T0_US)])
    batch = [("x", 10), ("old", 11), ("y", 12), ("x", 13)]
    first_attempt = index.duplicates(batch)
    assert first_attempt == {11, 13}
    # The attempt recorded its keys, then crashed before the checkpoint commit.
    index.record([("x", 10, T0_US), ("y", 12, T0_US)])
    assert index.duplicates(batch) == first_attempt


def test_key_in_index_at_a_larger_lsn_is_not_a_duplicate(index: DedupeIndex) -> None:
    index.record([("a", 20, T0_US)])
    assert index.duplicates([("a", 15), ("a", 20), ("a", 25)]) == {20, 25}


def test_record_keeps_the_earliest_lsn_whatever_the_order(index: DedupeIndex) -> None:
    index.record([("a", 9, T0_US + 9), ("a", 4, T0_US + 4)])
    index.record([("a", 7, T0_US + 7)])
    # Earliest is 4: a candidate at 5 is a duplicate, one at 4 is not.
    assert index.duplicates([("a", 4)]) == set()
    assert index.duplicates([("a", 5)]) == {5}


def test_index_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "dedupe.sqlite3"
    with DedupeIndex(path) as first:
        first.record([("a", 1, T0_US), ("b", 2, T0_US)])
    with DedupeIndex(path) as second:
        assert second.duplicates([("a", 3), ("b", 2), ("c", 4)]) == {3}
        # WAL journal mode is a property of the file: it must still be set.
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_many_candidates_span_several_query_chunks(index: DedupeIndex) -> None:
    known = [(f"k{i}", i, T0_US) for i in range(1, 5001)]
    index.record(known)
    candidates = [(f"k{i}", 10_000 + i) for i in range(0, 10_000, 2)]
    expected = {10_000 + i for i in range(2, 5001, 2)}
    assert index.duplicates(candidates) == expected


def test_prune_deletes_only_entries_past_retention(tmp_path: Path) -> None:
    with DedupeIndex(tmp_path / "dedupe.sqlite3", retention_s=2 * 86_400) as index:
        index.record(
            [("old", 1, T0_US), ("edge", 2, T0_US + DAY_US), ("new", 3, T0_US + 2 * DAY_US)]
        )
        now = T0_US + 3 * DAY_US
        # Retention 2 days: "old" (3 days) goes, "edge" (exactly 2 days) and "new" stay.
        assert index.prune(now) == 1
        assert index.duplicates([("old", 10), ("edge", 11), ("new", 12)]) == {11, 12}
        assert index.prune(now) == 0


def test_record_is_one_transaction(index: DedupeIndex) -> None:
    with pytest.raises(LogError, match="NOT NULL"):
        index.record([("a", 1, T0_US), ("b", None, T0_US)])  # type: ignore[list-item]
    # "a" was not kept: the whole call rolled back.
    assert index.duplicates([("a", 2)]) == set()


def model_duplicates(seen: dict[str, int], batch: list[tuple[str, int]]) -> set[int]:
    """The rule in its plainest form: a smaller LSN for the same key, in the index or the batch."""
    return {
        lsn
        for position, (key, lsn) in enumerate(batch)
        if (key in seen and seen[key] < lsn)
        or any(k == key and earlier < lsn for k, earlier in batch[:position])
    }


KEYS = st.sampled_from(["a", "b", "c", "d", "e", "é", "message/1"])


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.tuples(KEYS, st.integers(min_value=1, max_value=4)), max_size=12),
        min_size=1,
        max_size=6,
    ),
    crashes=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_decisions_match_the_model_including_replays(
    batches: list[list[tuple[str, int]]], crashes: list[bool]
) -> None:
    # Each batch: keys with LSN steps (several rows may share an LSN), after the previous batch.
    seen: dict[str, int] = {}
    next_lsn = 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dedupe.sqlite3"
        index = DedupeIndex(path)
        try:
            for steps, crash in zip(batches, crashes, strict=False):
                batch = []
                for key, step in steps:
                    next_lsn += step - 1
                    batch.append((key, next_lsn))
                next_lsn += 1
                expected = model_duplicates(seen, batch)
                assert index.duplicates(batch) == expected
                entries = [(key, lsn, T0_US + lsn) for key, lsn in batch]
                index.record(entries)
                if crash:
                    # Recorded, then crashed before the commit: reopen and replay the batch.
                    index.close()
                    index = DedupeIndex(path)
                    assert index.duplicates(batch) == expected
                    index.record(entries)
                for key, lsn in batch:
                    seen[key] = min(seen.get(key, lsn), lsn)
        finally:
            index.close()


# -- the Bloom filter in front of the index ------------------------------------------------------


def _lookups(index: DedupeIndex) -> list[str]:
    """The SELECTs the index sends to SQLite from now on."""
    statements: list[str] = []
    index._db.set_trace_callback(
        lambda sql: statements.append(sql) if sql.startswith("SELECT key, lsn") else None
    )
    return statements


def test_keys_the_index_never_held_are_answered_without_a_lookup(index: DedupeIndex) -> None:
    index.record([(f"held-{i}", i, T0_US) for i in range(1, 101)])
    lookups = _lookups(index)
    assert index.duplicates([(f"new-{i}", 1000 + i) for i in range(100)]) == set()
    # 1 % false positives at most are asked about; 100 new keys: 0-1 lookups, here none is
    # likely enough to assert (the filter is sized for a million keys).
    assert lookups == []
    assert index.duplicates([("held-5", 2000), ("new-x", 2001)]) == {2000}
    assert len(lookups) == 1


@pytest.mark.parametrize(("min_keys", "max_keys"), [(16, 1_000_000), (16, 32)])
def test_a_filter_outgrown_or_at_its_cap_never_hides_a_held_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_keys: int, max_keys: int
) -> None:
    """Sized for 16 keys: rebuilt larger as batches add more (first case), or capped at 32 and
    overfull (second); either way every held key is a duplicate and every new one is not."""
    monkeypatch.setattr(dedupe_module, "FILTER_MIN_KEYS", min_keys)
    monkeypatch.setattr(dedupe_module, "FILTER_MAX_KEYS", max_keys)
    with DedupeIndex(tmp_path / "dedupe.sqlite3") as index:
        lsn = 0
        for batch in range(20):
            entries = [(f"k{batch}-{i}", lsn + i + 1, T0_US) for i in range(25)]
            lsn += 25
            index.record(entries)
        held = [(f"k{batch}-{i}", 10_000) for batch in range(20) for i in range(25)]
        assert index.duplicates([(key, 10_000 + n) for n, (key, _) in enumerate(held)]) == {
            10_000 + n for n in range(len(held))
        }
        assert index.duplicates([(f"other-{i}", 20_000 + i) for i in range(500)]) == set()
    # Reopened: the filter is built from what the index holds.
    with DedupeIndex(tmp_path / "dedupe.sqlite3") as index:
        assert len(index.duplicates([(f"k19-{i}", 30_000 + i) for i in range(25)])) == 25
