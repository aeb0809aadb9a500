"""The daemon: assembles the pipeline and runs it in one TaskGroup until shutdown.

::

    paho thread ──submit──▶ intake thread ──append+fsync──▶ write-ahead log
                               │  PUBACK in receipt order
                               └──records──▶ sink thread ──▶ Parquet telemetry/ rejected/
                                                  │           dedupe index, checkpoint
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
import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ingest.checkpoint import CheckpointStore
from ingest.config import Settings
from ingest.control import FleetControl
from ingest.decode import Decoder
from ingest.dedupe import DedupeIndex
from ingest.health import HEARTBEAT_S, HealthState, stale
from ingest.http import build_app, serve
from ingest.intake import Intake, IntakeLimits
from ingest.metrics import Metrics
from ingest.mqtt import (
    CAUSE_SESSION_PRESENT,
    Delivery,
    MqttOptions,
    ReceiveSession,
    is_connection_loss,
)
from ingest.mqtt_native import make_session
from ingest.parquet import PartitionedWriter
from ingest.schemas import REJECTED, TELEMETRY
from ingest.sink import FlushPolicy, Sink
from ingest.storage import OutputStore
from ingest.threads import run_in_thread
from ingest.wal import Durability, WriteAheadLog
from ingest.webhook import ClearanceChange, WebhookReceiver

log = logging.getLogger("ingest.app")


@dataclass
class Pipeline:
    """The storage half of the daemon: log, sink and their state, opened and replayed."""

    wal: WriteAheadLog
    sink: Sink
    dedupe: DedupeIndex

    def close(self) -> None:
        self.dedupe.close()
        self.wal.close()


def open_pipeline(settings: Settings, metrics: Metrics) -> Pipeline:
    """Open the log and state, and replay whatever the last run logged but did not commit."""
    state_dir = settings.state.path
    state_dir.mkdir(parents=True, exist_ok=True)
    # A local folder or an object store (s3://...), same layout either way.
    output = OutputStore.open(settings.output.path)
    if output.local_root is not None:
        output.local_root.mkdir(parents=True, exist_ok=True)
    checkpoints = CheckpointStore(state_dir / "checkpoint.json")
    checkpoint = checkpoints.load()
    wal = WriteAheadLog.open(
        state_dir / "log",
        segment_bytes=settings.state.log_segment_bytes,
        durability=Durability(settings.state.durability.value),
        min_next_lsn=checkpoint.committed_lsn + 1,
    )
    dedupe = DedupeIndex(
        state_dir / "dedupe.sqlite3", retention_s=settings.state.dedupe_retention_s
    )
    level = settings.output.compression_level
    sink = Sink(
        wal=wal,
        checkpoints=checkpoints,
        dedupe=dedupe,
        telemetry=PartitionedWriter(
            output, "telemetry", schema_name=TELEMETRY, compression_level=level
        ),
        rejected=PartitionedWriter(
            output, "rejected", schema_name=REJECTED, compression_level=level
        ),
        decoder=Decoder(
            app_id=settings.mqtt.app_id or None,
            max_payload_bytes=settings.ingest.max_payload_bytes,
        ),
        policy=FlushPolicy(
            max_rows=settings.output.flush_rows,
            max_bytes=settings.output.flush_bytes,
            max_age_s=settings.output.flush_age_s,
        ),
        metrics=metrics,
    )
    sink.replay(checkpoint)
    return Pipeline(wal=wal, sink=sink, dedupe=dedupe)


def mqtt_options(settings: Settings) -> MqttOptions:
    mqtt = settings.mqtt
    # preflight refuses to start without these files, so they are set here.
    assert mqtt.ca_file is not None
    assert mqtt.cert_file is not None
    assert mqtt.key_file is not None
    return MqttOptions(
        host=mqtt.host,
        port=mqtt.port,
        client_id=mqtt.client_id,
        topic=mqtt.resolved_topic,
        ca_file=mqtt.ca_file,
        cert_file=mqtt.cert_file,
        key_file=mqtt.key_file,
        protocol=mqtt.protocol,
        keepalive_s=mqtt.keepalive_s,
        session_expiry_s=mqtt.session_expiry_s,
        receive_maximum=mqtt.receive_maximum,
        verify_hostname=mqtt.verify_hostname,
        reconnect_min_s=mqtt.reconnect_min_s,
        reconnect_max_s=mqtt.reconnect_max_s,
    )


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

    async def run(self) -> int:
        settings = self.settings
        if settings.fleet.enabled:
            # Bad API credentials stop start-up here (ConfigError, exit 2), before any message.
            self.control = await asyncio.to_thread(FleetControl.open, settings, self.metrics)
        try:
            return await self._run_pipeline()
        finally:
            if self.control is not None:
                await self.control.aclose()

    async def _run_pipeline(self) -> int:
        settings = self.settings
        metrics = self.metrics
        pipeline = await asyncio.to_thread(open_pipeline, settings, metrics)
        if self.control is not None:
            # Set after the start-up replay: replayed records were received before this run and
            # are judged by the clearance state known now only from here on (either is correct:
            # none of them was committed before).
            pipeline.sink.set_gate(self.control.gate)
        try:
            return await self._run_live(pipeline)
        finally:
            pipeline.close()

    async def _run_live(self, pipeline: Pipeline) -> int:
        settings, metrics, health = self.settings, self.metrics, self.health
        intake_stop, sink_stop = threading.Event(), threading.Event()
        session_box: list[ReceiveSession] = []

        def ack(delivery: Delivery) -> bool:
            return session_box[0].ack(delivery)

        intake = Intake(
            pipeline.wal,
            ack=ack,
            deliver=pipeline.sink.submit,
            limits=IntakeLimits.sized(
                max_log_bytes=settings.state.log_max_bytes,
                flush_bytes=settings.output.flush_bytes,
            ),
            metrics=metrics,
            committed_lsn=lambda: pipeline.sink.committed_lsn,
            sink_backlog=lambda: pipeline.sink.queued_groups,
        )
        session = make_session(
            mqtt_options(settings),
            intake.submit,
            on_state=self._on_mqtt_state,
            pause_reading=intake.receive_backlog_full,
            client=settings.mqtt.client,
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
                return await self._supervise(intake, pipeline.sink, session, intake_stop, sink_stop)
            finally:
                intake_stop.set()
                sink_stop.set()
                await asyncio.to_thread(session.stop)

    async def _supervise(
        self,
        intake: Intake,
        sink: Sink,
        session: ReceiveSession,
        intake_stop: threading.Event,
        sink_stop: threading.Event,
    ) -> int:
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
            if self.control is not None:
                fleet = tg.create_task(self.control.run(fleet_stop), name="fleet-control")
            self.started.set()
            log.info("running: subscribed to %s", self.settings.mqtt.resolved_topic)
            await self.shutdown.wait()
            if self.control is not None:
                # The loop's state is transactional: cutting a cycle short loses nothing, and
                # the drain must not wait for an HM API call.
                fleet_stop.set()
                fleet.cancel()
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
        return exit_code

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
        while True:
            self.health.beat()
            await asyncio.sleep(HEARTBEAT_S)

    def _register_probes(self, intake: Intake, sink: Sink, session: ReceiveSession) -> None:
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
