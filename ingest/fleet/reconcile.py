"""The fleet control loop: make HM's clearances match the desired fleet, and remember what it saw.

One cycle (:meth:`Reconciler.reconcile_once`)::

    desired file (re-read) ─┐
    GET fleet listing ──────┴─▶ store.observe ─▶ plan ─▶ POST creations (chunked)
                                                      └─▶ DELETE removals (prune)
                                   store.observe(answers) ─▶ Parquet history ─▶ metrics

:meth:`Reconciler.run` repeats it every ``interval_s`` (sooner after :meth:`wake`) until ``stop``
is set. An HM failure never escapes the loop: the cycle's report carries HM's title and detail,
the loop logs it and retries with capped exponential backoff and jitter, and ingestion carries on
(the gate only refuses VINs HM itself revoked, rejected or canceled).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from ingest.errors import ApiError, ConfigError, IngestError, RateLimitedError
from ingest.fleet.desired import DesiredVehicle, load_desired_fleet
from ingest.fleet.history import TransitionHistory
from ingest.fleet.plan import Plan, RejectedVehicle, plan
from ingest.fleet.store import GONE, ClearanceStateStore, Transition
from ingest.hmapi import (
    DEFAULT_CHUNK_SIZE,
    Clearance,
    ClearanceResult,
    ClearanceStatus,
    HmApiClient,
    NotFoundError,
)
from ingest.metrics import Metrics

log = logging.getLogger("ingest.fleet")

Clock = Callable[[], datetime]
# (phase, done, total): phase is "create" or "remove".
Progress = Callable[[str, int, int], None]
CycleHook = Callable[["ReconcileReport", float], None]
# Which of these VINs have their topic subscribed (see Reconciler's ``subscribed``).
SubscribedGate = Callable[[list[str]], Awaitable[set[str]]]
T = TypeVar("T")

# HM answers a refused request the same way until something changes: a DELETE (409 in
# transition / already removed, 422 cancellation unsupported or "only after 1 day") until the
# VIN's status changes, a registration (an item-level error) until its line in the desired file
# changes. Asking again every cycle would only repeat the refusal; after this long it is asked
# once more anyway. A day matches HM's own cancellation limit.
REFUSAL_HOLD_S = 86_400.0
# DELETEs are one request per VIN; a few in parallel prune a large fleet in reasonable time
# without looking like a burst to HM.
DELETE_CONCURRENCY = 4
# Cycle backoff after failures: ceiling base * 2**(n-1), capped at the normal interval.
BACKOFF_BASE_S = 5.0
# A burst of webhooks (a whole fleet approved at once) wakes the loop once, not once each.
MIN_CYCLE_GAP_S = 1.0
_HM_STATUSES = tuple(s.value for s in ClearanceStatus if s is not ClearanceStatus.ERROR)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Refusal:
    """A request HM refused: an item-level ``error`` on create (``http_status`` 200), or a
    DELETE answered 404/409/422. ``detail`` is HM's wording."""

    vin: str
    action: Literal["create", "remove"]
    http_status: int
    detail: str


@dataclass(frozen=True)
class ReconcileReport:
    started_at: datetime
    finished_at: datetime
    desired: int | None  # vehicles in the desired fleet; None: observe-only
    listed: int | None  # clearances HM listed; None: the listing failed
    plan: Plan | None
    created: list[ClearanceResult] = field(default_factory=list)
    removed: list[ClearanceResult] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    # HM or the store failed: the cycle is incomplete and the loop backs off.
    errors: list[str] = field(default_factory=list)
    # Problems that do not stop the cycle (a bad desired file, a failed history export).
    warnings: list[str] = field(default_factory=list)
    retry_after_s: float | None = None
    # VINs not asked again this cycle: HM refused the same request recently (REFUSAL_HOLD_S).
    held: list[str] = field(default_factory=list)
    # VINs not registered yet: no replica subscribes their topic yet (VIN-sharded replicas).
    awaiting_subscription: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def rejected(self) -> list[RejectedVehicle]:
        return self.plan.rejected if self.plan else []


@dataclass
class _Cycle:
    """The report under construction."""

    started_at: datetime
    desired: int | None = None
    listed: int | None = None
    plan: Plan | None = None
    created: list[ClearanceResult] = field(default_factory=list)
    removed: list[ClearanceResult] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    retry_after_s: float | None = None
    held: list[str] = field(default_factory=list)
    awaiting_subscription: list[str] = field(default_factory=list)

    def fail(self, what: str, exc: ApiError) -> None:
        self.errors.append(f"{what}: {exc}")
        if isinstance(exc, RateLimitedError):
            self.retry_after_s = max(self.retry_after_s or 0.0, exc.retry_after_s)

    def report(self, finished_at: datetime) -> ReconcileReport:
        return ReconcileReport(
            self.started_at, finished_at, self.desired, self.listed, self.plan, self.created,
            self.removed, self.refused, self.transitions, self.errors, self.warnings,
            self.retry_after_s, self.held, self.awaiting_subscription,
        )  # fmt: skip


class Reconciler:
    """Keeps HM's fleet clearances in line with ``desired_file`` and records what it observes.

    ``desired_file=None`` observes only (lists and records statuses, never creates or removes).
    ``subscribed`` (VIN-sharded replicas) answers which of some VINs have their topic subscribed
    by a replica: a VIN is registered at HM only then, so its first message has a subscriber.
    ``history=None`` leaves transitions in the store for a later export (the CLI does this: the
    daemon owns the Parquet output). ``request_source`` labels transitions taken from the answers
    to our own POST/DELETE. ``rng`` and ``min_cycle_gap_s`` are for tests.
    """

    def __init__(
        self,
        client: HmApiClient,
        store: ClearanceStateStore,
        history: TransitionHistory | None,
        *,
        desired_file: Path | None,
        prune: bool,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        request_source: str = "request",
        backoff_base_s: float = BACKOFF_BASE_S,
        min_cycle_gap_s: float = MIN_CYCLE_GAP_S,
        refusal_hold_s: float = REFUSAL_HOLD_S,
        rng: random.Random | None = None,
        subscribed: SubscribedGate | None = None,
    ) -> None:
        self._client = client
        self._subscribed = subscribed
        self._store = store
        self._history = history
        self.desired_file = desired_file
        self.prune = prune
        self._metrics = metrics
        self._clock = clock
        self._chunk_size = chunk_size
        self._request_source = request_source
        self._backoff_base_s = backoff_base_s
        self._min_cycle_gap_s = min_cycle_gap_s
        self._refusal_hold_s = refusal_hold_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._wake = asyncio.Event()
        self._last_good: list[DesiredVehicle] | None = None
        # (action, VIN) → (what HM refused: the VIN's status for a removal, its desired entry
        # for a registration; the monotonic time the hold ends)
        self._holds: dict[tuple[str, str], tuple[object, float]] = {}
        self.consecutive_failures = 0
        self.last_report: ReconcileReport | None = None
        self.last_success_at: datetime | None = None

    # -- one cycle ----------------------------------------------------------------------------

    async def reconcile_once(self, *, progress: Progress | None = None) -> ReconcileReport:
        """List, plan, create, remove, record. HM failures go into the report, never raised."""
        cycle = _Cycle(self._clock())
        desired = await self._desired(cycle)
        cycle.desired = None if desired is None else len(desired)
        listing = await self._list(cycle)
        if listing is not None:
            current = {c.vin: c for c in listing}
            cycle.plan = plan(desired, current, prune=self.prune)
            if cycle.plan.prune_skipped:
                cycle.warnings.append(cycle.plan.prune_skipped)
            create = self._unheld(cycle, "create", {v.vin: v for v in cycle.plan.create})
            create = await self._only_subscribed(cycle, create)
            remove = self._unheld(
                cycle, "remove", {vin: current[vin].status for vin in cycle.plan.remove}
            )
            await self._create(cycle, list(create.values()), progress)
            await self._remove(cycle, list(remove), current, progress)
            await self._record_answers(cycle, current)
            await self._export(cycle)
        report = cycle.report(self._clock())
        self._finish(report)
        return report

    async def _desired(self, cycle: _Cycle) -> list[DesiredVehicle] | None:
        if self.desired_file is None:
            return None
        try:
            desired = await asyncio.to_thread(load_desired_fleet, self.desired_file)
        except ConfigError as exc:
            kept = (
                f"keeping the last good fleet ({len(self._last_good)} vehicles)"
                if self._last_good is not None
                else "observing only until it is fixed"
            )
            cycle.warnings.append(f"desired fleet not reloaded, {kept}: {exc}")
            log.error("desired fleet file not usable; %s: %s", kept, exc)
            return self._last_good
        self._last_good = desired
        return desired

    async def _list(self, cycle: _Cycle) -> list[Clearance] | None:
        try:
            # Taken before the request: a webhook recorded while it is in flight is newer.
            mark = await asyncio.to_thread(self._store.generation)
            listing = await self._client.list_clearances()
        except ApiError as exc:
            cycle.fail("listing the fleet", exc)
            return None
        cycle.listed = len(listing)
        cycle.transitions += await asyncio.to_thread(
            self._store.observe,
            listing,
            source="reconcile",
            at=self._clock(),
            complete=True,
            as_of=mark,
        )
        return listing

    async def _create(
        self, cycle: _Cycle, vehicles: Sequence[DesiredVehicle], progress: Progress | None
    ) -> None:
        # Chunked here (the client would chunk too) so progress and partial results survive a
        # failure half-way: chunks already sent stay in the report and the store.
        for start in range(0, len(vehicles), self._chunk_size):
            chunk = vehicles[start : start + self._chunk_size]
            try:
                results = await self._client.create_clearances(
                    [v.to_request() for v in chunk], chunk_size=self._chunk_size
                )
            except ApiError as exc:
                cycle.fail(f"registering {len(vehicles) - start} vehicle(s)", exc)
                return
            by_vin = {v.vin: v for v in chunk}
            for result in results:
                if result.is_error:
                    detail = result.description or "refused without a description"
                    cycle.refused.append(Refusal(result.vin, "create", 200, detail))
                    if result.vin in by_vin:
                        self._hold("create", result.vin, by_vin[result.vin])
                else:
                    cycle.created.append(result)
            if progress is not None:
                progress("create", start + len(chunk), len(vehicles))

    def _unheld(self, cycle: _Cycle, action: str, items: dict[str, T]) -> dict[str, T]:
        """``items`` (VIN → what would be sent) minus those HM refused recently, unchanged."""
        now = time.monotonic()
        ready: dict[str, T] = {}
        for vin, item in items.items():
            hold = self._holds.get((action, vin))
            if hold is not None and hold[0] == item and now < hold[1]:
                cycle.held.append(vin)
                continue
            self._holds.pop((action, vin), None)
            ready[vin] = item
        return ready

    async def _only_subscribed(
        self, cycle: _Cycle, create: dict[str, DesiredVehicle]
    ) -> dict[str, DesiredVehicle]:
        """``create`` minus the VINs nobody subscribes yet (they wait for a later cycle): HM
        streams as soon as it approves, and the broker drops what no subscription matches."""
        if self._subscribed is None or not create:
            return create
        ready = await self._subscribed(list(create))
        cycle.awaiting_subscription = sorted(set(create) - ready)
        if cycle.awaiting_subscription:
            log.info(
                "%d vehicle(s) not registered yet: waiting for their replica to subscribe "
                "their topic",
                len(cycle.awaiting_subscription),
            )
        return {vin: vehicle for vin, vehicle in create.items() if vin in ready}

    def _hold(self, action: str, vin: str, item: object) -> None:
        self._holds[(action, vin)] = (item, time.monotonic() + self._refusal_hold_s)

    async def _remove(
        self,
        cycle: _Cycle,
        vins: list[str],
        current: dict[str, Clearance],
        progress: Progress | None,
    ) -> None:
        limit = asyncio.Semaphore(DELETE_CONCURRENCY)
        done = 0

        async def remove(vin: str) -> None:
            nonlocal done
            async with limit:
                if cycle.errors:
                    return  # HM is failing: leave the rest for the next cycle
                try:
                    cycle.removed.append(await self._client.delete_clearance(vin))
                except ApiError as exc:
                    # 404: HM no longer holds it; 409/422: HM refuses for now (see REFUSAL_HOLD_S).
                    if not isinstance(exc, NotFoundError) and exc.status not in (409, 422):
                        cycle.fail(f"removing {vin}", exc)
                        return
                    detail = exc.detail or exc.title or str(exc)
                    cycle.refused.append(Refusal(vin, "remove", exc.status, detail))
                    self._hold("remove", vin, current[vin].status)
                done += 1
                if progress is not None:
                    progress("remove", done, len(vins))

        async with asyncio.TaskGroup() as group:
            for vin in vins:
                group.create_task(remove(vin), name=f"remove-{vin}")

    async def _record_answers(self, cycle: _Cycle, current: dict[str, Clearance]) -> None:
        """Statuses HM gave in its answers (pending, revoking, canceling) go in the store now,
        so the history shows who asked; the next listing confirms them."""
        brands = {v.vin: v.brand for v in (cycle.plan.create if cycle.plan else [])}
        answers = [
            Clearance(r.vin, r.status, brands.get(r.vin) or _brand(current, r.vin), r.tags)
            for r in (*cycle.created, *cycle.removed)
        ]
        if answers:
            cycle.transitions += await asyncio.to_thread(
                self._store.observe,
                answers,
                source=self._request_source,
                at=self._clock(),
                complete=False,
            )

    async def _export(self, cycle: _Cycle) -> None:
        if self._history is None:
            return
        try:
            await asyncio.to_thread(self._history.export)
        except IngestError as exc:
            # The transitions stay in the store and are exported by a later cycle.
            cycle.warnings.append(f"clearance history not written yet: {exc}")
            log.warning("clearance history export failed, will retry next cycle: %s", exc)

    def _finish(self, report: ReconcileReport) -> None:
        self.last_report = report
        for refusal in report.refused:
            log.warning(
                "HM refused to %s %s (%s): %s",
                "register" if refusal.action == "create" else "remove",
                refusal.vin,
                refusal.http_status,
                refusal.detail,
            )
        for transition in report.transitions:
            if transition.to_status == ClearanceStatus.REJECTED:
                # Logged once, when it happens; later cycles only list it in their reports.
                log.warning(
                    "HM rejected the clearance of %s: %s",
                    transition.vin,
                    transition.reason or "no reason given",
                )
        for error in report.errors:
            log.error("fleet reconcile incomplete: %s", error)
        if report.failed:
            return
        self.last_success_at = report.finished_at
        if report.created or report.removed or report.transitions:
            log.info(
                "fleet reconciled: %d listed, %d registered, %d removed, %d refused, "
                "%d status change(s)",
                report.listed or 0,
                len(report.created),
                len(report.removed),
                len(report.refused),
                len(report.transitions),
            )
        if self._metrics is not None:
            counts = self._store.counts()
            for status in sorted(set(_HM_STATUSES) | set(counts) - {GONE}):
                self._metrics.clearance_vehicles.labels(status).set(counts.get(status, 0))
            self._metrics.last_reconcile_time.set(report.finished_at.timestamp())

    # -- the loop -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Start the next cycle now (e.g. a webhook said something changed). Event loop only."""
        self._wake.set()

    async def run(
        self, *, interval_s: float, stop: asyncio.Event, on_cycle: CycleHook | None = None
    ) -> None:
        """Reconcile every ``interval_s`` until ``stop`` is set; never raises on HM failures.

        ``on_cycle(report, next_delay_s)`` is called after every cycle (health checks, tests).
        """
        while not stop.is_set():
            self._wake.clear()
            try:
                report = await self.reconcile_once()
            except IngestError as exc:
                # The store or the output failed in a way the cycle did not expect: report it
                # like an HM failure; ingestion must not stop because the control loop did.
                log.exception("fleet reconcile failed")
                now = self._clock()
                report = ReconcileReport(now, now, None, None, None, errors=[str(exc)])
                self.last_report = report
            delay = self._next_delay(report, interval_s)
            if on_cycle is not None:
                on_cycle(report, delay)
            if report.failed:
                log.warning(
                    "fleet reconcile failed %d time(s) in a row; retrying in %.1f s",
                    self.consecutive_failures,
                    delay,
                )
            await self._pause(delay, stop)

    def _next_delay(self, report: ReconcileReport, interval_s: float) -> float:
        if not report.failed:
            self.consecutive_failures = 0
            return interval_s
        self.consecutive_failures += 1
        exponent = min(self.consecutive_failures - 1, 32)
        ceiling = min(max(interval_s, self._backoff_base_s), self._backoff_base_s * 2**exponent)
        # Jitter in the upper half: spread out, yet never a hot loop of immediate retries.
        delay = self._rng.uniform(ceiling / 2, ceiling)
        return max(delay, report.retry_after_s or 0.0)

    async def _pause(self, delay_s: float, stop: asyncio.Event) -> None:
        started = time.monotonic()
        await _first(stop.wait(), self._wake.wait(), limit_s=delay_s)
        woken_early = self._wake.is_set() and not stop.is_set()
        remaining_gap = self._min_cycle_gap_s - (time.monotonic() - started)
        if woken_early and remaining_gap > 0:
            await _first(stop.wait(), limit_s=remaining_gap)


async def _first(*waits: Coroutine[Any, Any, Any], limit_s: float) -> None:
    """Wait for the first of ``waits`` to finish, at most ``limit_s``; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _brand(current: dict[str, Clearance], vin: str) -> str | None:
    clearance = current.get(vin)
    return clearance.brand if clearance is not None else None


__all__ = [
    "Plan",
    "ReconcileReport",
    "Reconciler",
    "Refusal",
    "RejectedVehicle",
    "plan",
]
