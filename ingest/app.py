"""The daemon: assembles the pipeline and runs it in one TaskGroup until shutdown.

::

    paho thread ──submit──▶ intake thread ──append+fsync──▶ write-ahead log
                               │  PUBACK in receipt order
                               └──records──▶ sink thread ──▶ Parquet telemetry/ rejected/
                                              (or process)     dedupe index, checkpoint
                                                  └──release──▶ log segments deleted
    event loop: HTTP (/metrics /healthz /readyz /webhook), heartbeat, fleet control loop

Shutdown (SIGTERM/SIGINT set ``shutdown``): intake stops taking messages, logs and acks what it
holds; the MQTT session disconnects; the sink commits what is pending; exit 0. All of it within
``[shutdown] deadline_s``, which deploy/ keeps below the container's stop grace period so the drain
finishes before the orchestrator's SIGKILL. Past the deadline the process exits anyway (code 1):
whatever was not committed is in the log and is replayed at the next start.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry

from ingest.config import Settings
from ingest.control import FleetControl
from ingest.fleet.reconcile import SubscribedGate
from ingest.health import HEARTBEAT_S, HealthState, stale
from ingest.http import build_app, serve
from ingest.intake import Intake, IntakeLimits, Keep
from ingest.metrics import Metrics
from ingest.mqtt import (
    CAUSE_SESSION_PRESENT,
    Delivery,
    MqttSession,
    ReceiveSession,
    is_connection_loss,
)
from ingest.mqtt_native import make_session
from ingest.pipeline import Pipeline, open_pipeline
from ingest.replica.adopt import KeyOf, SessionAdopter, message_key_function
from ingest.replica.envelopes import EnvelopeOwnership
from ingest.replica.handover import MessageOwnership
from ingest.replica.host import SessionHost
from ingest.replica.runtime import ReplicaRuntime, open_replica_runtime
from ingest.replica.shards import topic_prefix
from ingest.replica.subscriptions import DesiredVins, SubscriptionSync, subscribed_vins
from ingest.replica.vin_mode import VinSharding
from ingest.session_options import adopted_session_options, mqtt_options, subscription_topic
from ingest.sink import Sink
from ingest.sink_process import SinkProcess
from ingest.threads import run_in_thread
from ingest.volumes import refresh as refresh_volumes
from ingest.volumes import watched_volumes
from ingest.webhook import ClearanceChange, WebhookReceiver

log = logging.getLogger("ingest.app")


class Daemon:
    """One run of ``hm-ingest run``. Tests construct it directly and set ``shutdown`` themselves."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        shutdown: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry or CollectorRegistry())
        self.health = HealthState()
        self.shutdown = shutdown or asyncio.Event()
        self.http_port: int | None = None
        self.started = asyncio.Event()
        self.control: FleetControl | None = None
        # Set when running as one of several replicas ([replica] id).
        self.replica: ReplicaRuntime | None = None
        self._fenced = False
        # Delivery channels of adopted and hosted sessions: one sequence, so none is reused
        # while another is live (0 is the daemon's own session).
        self._channels = itertools.count(1)

    async def run(self) -> int:
        settings = self.settings
        try:
            if settings.replica.enabled:
                # An unreachable coordination database stops start-up here (ConfigError).
                self.replica = await asyncio.to_thread(open_replica_runtime, settings, self.metrics)
                if not await self.replica.join(self.shutdown):
                    return 0
            if settings.fleet.enabled:
                # Bad API credentials stop start-up here (ConfigError, exit 2), before any message.
                self.control = await asyncio.to_thread(
                    FleetControl.open, settings, self.metrics, subscribed=self._subscribed_gate()
                )
            return await self._run_pipeline()
        finally:
            if self.control is not None:
                await self.control.aclose()
            if self.replica is not None:
                await asyncio.to_thread(self.replica.call, self.replica.coordinator.close)

    async def _run_pipeline(self) -> int:
        settings = self.settings
        metrics = self.metrics
        pipeline = await asyncio.to_thread(
            partial(
                open_pipeline,
                settings,
                metrics,
                before_replay=self.replica.load_adopted if self.replica is not None else None,
            )
        )
        if self.control is not None:
            # Set after the start-up replay: replayed records were received before this run and
            # are judged by the clearance state known now only from here on (either is correct:
            # none of them was committed before).
            pipeline.sink.set_clearances(self.control.store)
        try:
            return await self._run_live(pipeline)
        finally:
            pipeline.close()

    async def _run_live(self, pipeline: Pipeline) -> int:
        settings, metrics, health = self.settings, self.metrics, self.health
        intake_stop, sink_stop = threading.Event(), threading.Event()
        session_box: list[ReceiveSession] = []
        # Sessions of lost replicas adopted or hosted here (ingest.replica), by delivery channel.
        adopters: dict[int, SessionAdopter | SessionHost] = {}
        sharding = self._vin_sharding()
        own_sync = sharding.sync_for(settings.replica.id) if sharding is not None else None
        if own_sync is not None:
            # Read now: the session calls it on its own thread while it connects.
            await asyncio.to_thread(own_sync.held)

        def ack(delivery: Delivery) -> bool:
            if delivery.channel:
                adopter = adopters.get(delivery.channel)
                # Gone (failed or interrupted): the broker redelivers it to the next adoption.
                return adopter is not None and adopter.ack(delivery)
            return session_box[0].ack(delivery)

        intake = Intake(
            pipeline.wal,
            keep=self._message_ownership(adopters),
            ack=ack,
            deliver=pipeline.sink.submit,
            limits=IntakeLimits.sized(
                max_log_bytes=settings.state.log_max_bytes,
                flush_bytes=settings.output.flush_bytes,
            ),
            metrics=metrics,
            committed_lsn=lambda: pipeline.sink.committed_lsn,
            sink_backlog=lambda: pipeline.sink.queued_records,
            window=settings.mqtt.window,
        )
        session = make_session(
            mqtt_options(settings),
            intake.submit,
            on_state=self._on_mqtt_state,
            pause_reading=intake.receive_backlog_full,
            client=settings.receive_client,
            # VIN-sharded: what the session holds, subscribed again if the broker lost it.
            filters=own_sync.held if own_sync is not None else None,
            subscription_ids=own_sync.subscription_ids if own_sync is not None else None,
        )
        session_box.append(session)
        self._register_probes(intake, pipeline.sink, session)

        host, port = settings.metrics.host_port
        webhook = WebhookReceiver(
            settings.webhook.secret.get_secret_value(),
            max_body_bytes=settings.webhook.max_body_bytes,
            on_change=self._on_webhook,
            metrics=metrics,
        )
        app = build_app(metrics, health, [webhook.route()])
        async with serve(app, host, port) as bound_port:
            self.http_port = bound_port
            session.start()
            try:
                await asyncio.to_thread(
                    session.wait_first_connection, settings.mqtt.connect_timeout_s
                )
                if sharding is not None and own_sync is not None:
                    assert isinstance(session, MqttSession)  # the settings pick paho in vin mode
                    adopt = self._hosting(
                        sharding, intake, adopters, retire=self._adoption(intake, adopters)
                    )
                    subscriptions = partial(sharding.keep_subscriptions, own_sync, session)
                else:
                    adopt, subscriptions = self._adoption(intake, adopters), None
                return await self._supervise(
                    intake,
                    pipeline.sink,
                    session,
                    intake_stop,
                    sink_stop,
                    adopt=adopt,
                    subscriptions=subscriptions,
                )
            finally:
                intake_stop.set()
                sink_stop.set()
                await asyncio.to_thread(session.stop)

    async def _supervise(
        self,
        intake: Intake,
        sink: Sink | SinkProcess,
        session: ReceiveSession,
        intake_stop: threading.Event,
        sink_stop: threading.Event,
        *,
        adopt: Callable[[str], Awaitable[None]],
        subscriptions: Callable[[asyncio.Event], Coroutine[Any, Any, None]] | None = None,
    ) -> int:
        """``subscriptions``: VIN-sharded mode's loop keeping our own subscriptions in step."""
        deadline_s = self.settings.shutdown.deadline_s
        exit_code = 0
        async with asyncio.TaskGroup() as tg:
            intake_task = tg.create_task(
                run_in_thread("intake", lambda: intake.run(intake_stop)), name="intake"
            )
            sink_task = tg.create_task(
                run_in_thread("sink", lambda: sink.run(sink_stop)), name="sink"
            )
            heartbeat = tg.create_task(self._heartbeat(), name="heartbeat")
            fleet_stop = asyncio.Event()
            replica_stop = asyncio.Event()
            role = None
            if self.replica is not None:
                role = self.replica.role
                replica_task = tg.create_task(
                    self.replica.run(
                        replica_stop, adopt=adopt, on_fenced=lambda: self._on_fenced(session)
                    ),
                    name="replica",
                )
            if self.control is not None:
                fleet = tg.create_task(self.control.run(fleet_stop, role), name="fleet-control")
            if subscriptions is not None:
                tg.create_task(subscriptions(replica_stop), name="subscriptions")
                log.info(
                    "running: subscribed to the topics of the VINs replica %s owns under %s",
                    self.settings.replica.id,
                    subscription_topic(self.settings),
                )
            else:
                log.info("running: subscribed to %s", subscription_topic(self.settings))
            self.started.set()
            await self.shutdown.wait()
            if self.control is not None:
                # The loop's state is transactional: cutting a cycle short loses nothing, and
                # the drain must not wait for an HM API call.
                fleet_stop.set()
                fleet.cancel()
            if self.replica is not None:
                # Stops adoptions and resigns leadership; membership lapses by itself, so if
                # this replica does not come back its session is adopted after the lease.
                replica_stop.set()
                await replica_task
            log.info("shutting down: draining within %.0f s", deadline_s)
            started = time.monotonic()
            try:
                async with asyncio.timeout(deadline_s):
                    intake.close()
                    intake_stop.set()
                    await intake_task
                    await asyncio.to_thread(session.stop)
                    sink_stop.set()
                    await sink_task
                log.info(
                    "drained in %.2f s; committed through lsn %d",
                    time.monotonic() - started,
                    sink.committed_lsn,
                )
            except TimeoutError:
                log.error(
                    "drain did not finish within %.0f s; uncommitted records stay in the log and "
                    "are replayed at the next start",
                    deadline_s,
                )
                exit_code = 1
                # The threads are daemons: the process can exit while they finish or not.
                intake_task.cancel()
                sink_task.cancel()
            heartbeat.cancel()
        if self._fenced:
            return 1
        return exit_code

    def _on_fenced(self, session: ReceiveSession) -> None:
        """Declared lost by the group: stop taking messages at once, then shut down (exit 1)."""
        self._fenced = True
        # Off the loop: stop() joins the session thread. Our session now belongs to the adopter;
        # reconnecting would only pull it back and forth between us.
        threading.Thread(target=session.stop, name="fenced-stop", daemon=True).start()
        self.shutdown.set()

    def _adoption(
        self, intake: Intake, adopters: dict[int, SessionAdopter | SessionHost]
    ) -> Callable[[str], Awaitable[None]]:
        """How the leader adopts a lost replica's session: into this daemon's own intake."""
        settings = self.settings
        channels, key_of = self._channels, self._key_of()

        async def adopt(member: str) -> None:
            runtime = self.replica
            assert runtime is not None
            coordinator = runtime.coordinator
            channel = next(channels)
            stop = threading.Event()
            adopter = SessionAdopter(
                adopted_session_options(settings, member),
                replica=member,
                channel=channel,
                submit=intake.submit,
                key_of=key_of,
                record_keys=lambda keys: runtime.call(coordinator.record_adopted, member, keys),
                keep_claim=lambda: runtime.call(coordinator.renew_drain, member),
                logged_before=lambda keys: runtime.call(coordinator.adopted_among, member, keys),
                receive_backlog_full=intake.receive_backlog_full,
                stop=stop,
            )
            adopters[channel] = adopter
            try:
                report = await asyncio.to_thread(adopter.run)
                self.metrics.replica_adoptions.inc()
                self.metrics.adopted_messages.inc(report.messages)
            finally:
                stop.set()
                adopters.pop(channel, None)

        return adopt

    def _key_of(self) -> KeyOf:
        """The sink's dedupe key of a message, for keys recorded before a PUBACK."""
        settings = self.settings
        return message_key_function(settings.mqtt.app_id or None, settings.ingest.max_payload_bytes)

    def _vin_sharding(self) -> VinSharding | None:
        """VIN-sharded mode's context, or None (one daemon, or shared-subscription replicas)."""
        if self.replica is None or not self.settings.replica.vin_sharded:
            return None
        control = self.control
        assert control is not None  # the settings require [fleet] enabled in vin mode
        desired = DesiredVins(self.settings.fleet.file)

        def vins() -> set[str]:
            return set(control.store.statuses()) | desired()

        return VinSharding(
            runtime=self.replica,
            prefix=topic_prefix(self.settings.mqtt.resolved_topic),
            vins=vins,
            interval_s=self.settings.replica.heartbeat_s,
            metrics=self.metrics,
            envelopes=self.settings.spreads_envelopes,
            handover_window_s=self.settings.replica.handover_window_s,
        )

    def _message_ownership(self, adopters: dict[int, SessionAdopter | SessionHost]) -> Keep | None:
        """VIN-sharded mode: which received messages are ours to log (ingest.replica.handover):
        not a V2 envelope another session keeps by its rule, nor a message of a VIN changing
        owner that another session claimed first."""
        runtime = self.replica
        if runtime is None or not self.settings.replica.vin_sharded:
            return None
        own = self.settings.replica.id
        prefix = topic_prefix(self.settings.mqtt.resolved_topic)
        max_payload_bytes = self.settings.ingest.max_payload_bytes

        def member_of(channel: int) -> str | None:
            if not channel:
                return own
            session = adopters.get(channel)
            return session.replica if session is not None else None

        envelopes = (
            EnvelopeOwnership(
                prefix=prefix,
                member_of=member_of,
                member_list=runtime.member_list,
                max_payload_bytes=max_payload_bytes,
            )
            if self.settings.spreads_envelopes
            else None
        )

        def claim(member: str, keys: Sequence[str]) -> dict[str, str]:
            # The runtime's connection: only groups holding a moving VIN's messages ask.
            return runtime.call(runtime.coordinator.claim, member, keys)

        return MessageOwnership(
            prefix=prefix,
            member_of=member_of,
            member_lists=lambda: runtime.member_lists,
            settled_at=lambda: runtime.settled_at,
            claim=claim,
            window_s=self.settings.replica.handover_window_s,
            metrics=self.metrics,
            envelopes=envelopes,
            max_payload_bytes=max_payload_bytes,
        ).keep

    def _subscribed_gate(self) -> SubscribedGate | None:
        """VIN-sharded mode: the leader registers a VIN at HM only once its topic has a
        subscriber, because HM streams from the approval on and the broker drops what no
        subscription matches."""
        runtime = self.replica
        if runtime is None or not self.settings.replica.vin_sharded:
            return None
        prefix = topic_prefix(self.settings.mqtt.resolved_topic)

        async def subscribed(vins: list[str]) -> set[str]:
            return await asyncio.to_thread(
                runtime.call, subscribed_vins, runtime.coordinator, prefix, vins
            )

        return subscribed

    def _hosting(
        self,
        sharding: VinSharding,
        intake: Intake,
        adopters: dict[int, SessionAdopter | SessionHost],
        *,
        retire: Callable[[str], Awaitable[None]],
    ) -> Callable[[str], Awaitable[None]]:
        """How the leader hosts a lost replica's session (VIN-sharded mode); ``retire`` drains
        and deletes the session of a replica removed from the member list."""
        settings = self.settings
        channels, key_of = self._channels, self._key_of()

        async def host(member: str) -> None:
            runtime = sharding.runtime
            coordinator = runtime.coordinator
            channel = next(channels)

            def make_host(member: str, sync: SubscriptionSync) -> SessionHost:
                session_host = SessionHost(
                    adopted_session_options(settings, member),
                    replica=member,
                    channel=channel,
                    submit=intake.submit,
                    key_of=key_of,
                    record_keys=lambda keys: runtime.call(coordinator.record_adopted, member, keys),
                    logged_before=lambda keys: runtime.call(
                        coordinator.adopted_among, member, keys
                    ),
                    filters=sync.held,
                    subscription_ids=sync.subscription_ids,
                )
                adopters[channel] = session_host
                return session_host

            try:
                retired = await sharding.host(member, make_host)
            finally:
                adopters.pop(channel, None)
            if retired:
                await retire(member)

        return host

    async def _on_webhook(self, change: ClearanceChange) -> None:
        if self.control is None:
            log.warning(
                "webhook for %s (%s) ignored: [fleet] enabled is false, no clearance state is kept",
                change.vin,
                change.status,
            )
            return
        await self.control.on_webhook(change)

    async def _heartbeat(self) -> None:
        volumes = watched_volumes(self.settings)
        while True:
            self.health.beat()
            # One statvfs per volume a second, off the loop: a network filesystem can stall it.
            await asyncio.to_thread(refresh_volumes, self.metrics.volume_available, volumes)
            await asyncio.sleep(HEARTBEAT_S)

    def _register_probes(
        self, intake: Intake, sink: Sink | SinkProcess, session: ReceiveSession
    ) -> None:
        self.health.liveness["intake"] = lambda: stale("intake thread", intake.heartbeat)
        self.health.liveness["sink"] = lambda: stale("sink thread", sink.heartbeat)
        self.health.readiness["mqtt"] = lambda: (
            None
            if session.connected.is_set() and session.subscribed.is_set()
            else f"not connected/subscribed: {session.last_error or 'connecting'}"
        )
        self.health.readiness["log"] = lambda: (
            None
            if intake.last_write_error is None
            else f"write-ahead log not writable: {intake.last_write_error}"
        )
        self.health.readiness["sink"] = lambda: (
            None if sink.last_error is None else f"output not writable: {sink.last_error}"
        )

    def _on_mqtt_state(self, state: str, cause: str) -> None:
        metrics = self.metrics
        if state == "connected":
            metrics.connected.set(1)
            metrics.session_present.set(1 if cause == CAUSE_SESSION_PRESENT else 0)
        elif state == "disconnected":
            metrics.connected.set(0)
            if is_connection_loss(state, cause):  # a clean stop is not a reconnect
                metrics.reconnects.labels(cause).inc()


async def run_daemon(settings: Settings, shutdown: asyncio.Event) -> int:
    return await Daemon(settings, shutdown=shutdown).run()
