"""The vehicle stream: follows the clearance store and publishes telemetry for approved VINs.

Every ``REFRESH_S`` the stream reads the store (in-process, same event loop): a VIN whose status
becomes ``approved`` starts streaming, one that leaves it (``revoking``, then ``revoked``) stops at
once. A pacing loop on the event loop hands out publish slots at the configured rate, round-robin
over the streaming VINs in VIN order. Each slot is one MQTT publish, of one of three kinds:

* a repeat of one of the vehicle's last few messages (probability ``duplicate_rate``);
* a deliberately bad message (``bad_rate``, see :data:`~.messages.BAD_KINDS`);
* a message that is not JSON (``malformed_rate``, see :data:`~.messages.MALFORMED_KINDS`);
* otherwise a new message: a V1 property (cycling through :data:`~.vehicle.V1_CYCLE`) or a V2
  envelope with every property, or either at random for ``format = "both"``.

Each vehicle draws from its own ``random.Random`` seeded with ``"{seed}:{vin}"``, so with the same
seed a vehicle's message ids, values, repeats and damage come out the same whenever it streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ingest.emulator.clock import Clock, isoformat
from ingest.emulator.rules import Outcome
from ingest.emulator.state import ClearanceStore
from ingest.emulator.stream.config import MUTABLE, BrokerTarget, StreamSettings
from ingest.emulator.stream.counters import StreamCounters
from ingest.emulator.stream.messages import MessageFactory, Outgoing
from ingest.emulator.stream.publisher import MqttPublisher
from ingest.emulator.stream.vehicle import V1_CYCLE, VehicleSim

log = logging.getLogger("ingest.emulator.stream")

TICK_S = 0.02  # pacing granularity: 50 batches a second keeps bursts small at any rate
REFRESH_S = 0.25  # how often the store is read; the same period as the store's settle tick
# Past this many messages without PUBACK the stream stops issuing new ones until the broker
# catches up: the configured rate is a ceiling, and memory stays bounded.
MAX_UNACKED = 20_000
RECENT = 8  # a duplicate repeats one of the vehicle's last RECENT messages
DRAIN_S = 5.0  # on stop, how long to wait for outstanding PUBACKs
EXTRA_VIN_PREFIX = "EMULATED"  # + 9 digits: a valid 17-character VIN
EXTRA_BRAND = "sandbox"


def extra_vin(index: int) -> str:
    return f"{EXTRA_VIN_PREFIX}{index:09d}"


@dataclass
class _Vehicle:
    sim: VehicleSim
    rng: random.Random
    cycle: int = 0
    recent: deque[Outgoing] = field(default_factory=lambda: deque(maxlen=RECENT))


class VehicleStream:
    def __init__(
        self,
        settings: StreamSettings,
        target: BrokerTarget,
        store: ClearanceStore,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.target = target
        self._store = store
        self._clock = clock
        self.counters = StreamCounters()
        self._publisher = MqttPublisher(target, self.counters.ack)
        self._factory = MessageFactory(settings.app_id, settings.environment)
        self._vehicles: dict[str, _Vehicle] = {}
        self.streaming: tuple[str, ...] = ()
        self._cursor = 0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (raises StreamConnectError), clear the extra VINs, start pacing."""
        await asyncio.to_thread(self._publisher.connect)
        try:
            for index in range(self.settings.vehicles):
                vin = extra_vin(index)
                vehicle = self._store.add(vin, EXTRA_BRAND, {"source": "stream"})
                if vehicle.status == "pending":
                    self._store.decide(vin, Outcome("approved"))
            self.refresh()
        except BaseException:
            await asyncio.to_thread(self._publisher.close)
            raise
        self._task = asyncio.create_task(self.run(), name="emulator-stream")

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """Stop publishing, wait up to ``drain_s`` for outstanding PUBACKs, disconnect."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # the task's own CancelledError stays in the task
        try:
            async with asyncio.timeout(drain_s):
                # PUBACKs are counted on paho's thread; polling spares a cross-thread wake-up
                # per acknowledgement on the hot path.
                while self.counters.unacked > 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("stream: %d messages still unacknowledged at stop", self.counters.unacked)
        await asyncio.to_thread(self._publisher.close)

    # -- following the store ----------------------------------------------------------------------

    def refresh(self) -> None:
        """Stream exactly the VINs the store holds as approved."""
        approved = tuple(sorted(v.vin for v in self._store.all() if v.status == "approved"))
        if approved == self.streaming:
            return
        started = set(approved) - set(self.streaming)
        stopped = set(self.streaming) - set(approved)
        for vin in sorted(started):
            log.info("stream: %s approved, streaming", vin)
        for vin in sorted(stopped):
            log.info("stream: %s no longer approved, stopped", vin)
        self.streaming = approved

    def _vehicle(self, vin: str) -> _Vehicle:
        vehicle = self._vehicles.get(vin)
        if vehicle is None:
            # Seeded from a string: stable across processes (str seeds are hashed with SHA-512).
            rng = random.Random(f"{self.settings.seed}:{vin}")  # noqa: S311 (test data)
            vehicle = _Vehicle(VehicleSim(vin, rng, self._clock.now()), rng)
            self._vehicles[vin] = vehicle
        return vehicle

    # -- publishing -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = last_refresh = loop.time()
        owed = 0.0  # publish slots earned but not yet used (fractional carry)
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            if now - last_refresh >= REFRESH_S:
                self.refresh()
                last_refresh = now
            elapsed, last = now - last, now
            if self.settings.paused or not self.streaming:
                owed = 0.0
                continue
            rate = self.settings.messages_per_s(len(self.streaming))
            # Never save up more than one second of slots: after a stall, resume, don't burst.
            owed = min(owed + rate * elapsed, max(rate, 1.0))
            slots = int(owed)
            owed -= slots
            for _ in range(slots):
                if self.counters.unacked >= MAX_UNACKED:
                    break
                self.publish_next()

    def publish_next(self) -> Outgoing:
        """Publish one slot for the next streaming VIN (round-robin)."""
        self._cursor %= len(self.streaming)
        vin = self.streaming[self._cursor]
        self._cursor += 1
        out = self.next_message(vin)
        self._publisher.publish(out.topic, out.payload)
        self.counters.record(out, self._clock.now())
        return out

    def next_message(self, vin: str) -> Outgoing:
        """Decide and build the next publish for ``vin`` (advances its model)."""
        vehicle = self._vehicle(vin)
        rng, settings = vehicle.rng, self.settings
        now = self._clock.now()
        vehicle.sim.advance(now)
        stamp = isoformat(now)
        roll = rng.random()
        if roll < settings.duplicate_rate and vehicle.recent:
            return rng.choice(vehicle.recent).repeated()
        message_id = f"{rng.getrandbits(128):032X}"
        capability, prop = V1_CYCLE[vehicle.cycle % len(V1_CYCLE)]
        vehicle.cycle += 1
        sample = vehicle.sim.sample(capability, prop)
        bad_until = settings.duplicate_rate + settings.bad_rate
        if settings.duplicate_rate <= roll < bad_until:
            return self._factory.bad(vin, message_id, sample, stamp, rng)
        # After the bad share, so a stream with malformed_rate 0 draws exactly as before.
        if bad_until <= roll < bad_until + settings.malformed_rate:
            return self._factory.malformed(vin, message_id, sample, stamp, rng)
        use_v2 = settings.format == "v2" or (settings.format == "both" and rng.random() < 0.5)
        if use_v2:
            samples = vehicle.sim.samples()
            out = self._factory.v2(
                vin, message_id, samples, stamp=stamp, rng=rng, failure_rate=settings.failure_rate
            )
        else:
            out = self._factory.v1(
                vin, message_id, sample, stamp=stamp, rng=rng, failure_rate=settings.failure_rate
            )
        vehicle.recent.append(out)
        return out

    # -- admin ------------------------------------------------------------------------------------

    def update(self, changes: Any) -> StreamSettings:
        """Apply ``PUT /_emulator/stream``; raises ValueError naming the bad field."""
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        for key, value in changes.items():
            allowed = MUTABLE.get(key)
            if allowed is None:
                raise ValueError(f"{key!r} cannot be changed; changeable: {', '.join(MUTABLE)}")
            if isinstance(value, bool) is not (bool in allowed) or not isinstance(value, allowed):
                raise ValueError(f"{key!r} has the wrong type: {value!r}")
        merged = {**changes}
        # Setting one of the two rates clears the other, so a PUT of just one is enough.
        if merged.get("rate") is not None:
            merged.setdefault("vehicle_rate", None)
        if merged.get("vehicle_rate") is not None:
            merged.setdefault("rate", None)
        self.settings = dataclasses.replace(self.settings, **merged)
        return self.settings

    def to_json(self, *, per_vin: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "broker": f"{self.target.host}:{self.target.port}",
            "client_id": self.target.client_id,
            "connected": self._publisher.connected,
            "settings": self.settings.to_json(),
            "streaming": list(self.streaming),
            "messages_per_s": self.settings.messages_per_s(len(self.streaming)),
            "totals": self.counters.totals(),
        }
        if per_vin:
            data["vehicles"] = self.counters.per_vin()
        return data
