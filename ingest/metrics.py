"""Every Prometheus metric the daemon exports, on an injected registry.

Names follow ``hm_ingest_<noun>_<unit>``; labels are bounded sets (a reason code, a table name,
an endpoint) and never carry a VIN, a topic or a message id, so cardinality stays fixed however
large the fleet grows. Tests build their own :class:`Metrics` on a fresh ``CollectorRegistry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from ingest import __version__

# Flushes take from a few milliseconds (small batch) to several seconds (250k rows, fsync).
_FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# HM's REST API answers in tens to hundreds of milliseconds; retries can stretch to a minute.
_API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The daemon's metrics, created once per process (or per test) on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "hm_ingest_"
        r = registry
        self.build_info = Info(p + "build", "Version of hm-fleet-ingest", registry=r)
        self.build_info.info({"version": __version__})

        # MQTT session
        self.connected = Gauge(p + "mqtt_connected", "1 while connected to the broker", registry=r)
        self.reconnects = Counter(
            p + "mqtt_reconnects_total", "Reconnect attempts by cause", ["cause"], registry=r
        )
        self.session_present = Gauge(
            p + "mqtt_session_present",
            "1 when the broker kept our session at the last connect, 0 when it was new",
            registry=r,
        )
        self.messages_received = Counter(
            p + "messages_received_total", "MQTT messages received", registry=r
        )
        self.messages_acked = Counter(
            p + "messages_acked_total", "PUBACKs sent after the message was durable", registry=r
        )
        self.messages_unacked = Gauge(
            p + "messages_unacked", "Messages received but not yet acknowledged", registry=r
        )

        # Write-ahead log
        self.log_bytes = Gauge(p + "log_bytes", "Bytes held by the write-ahead log", registry=r)
        self.log_segments = Gauge(p + "log_segments", "Write-ahead log segment files", registry=r)
        self.log_oldest_uncommitted_age = Gauge(
            p + "log_oldest_uncommitted_age_seconds",
            "Age of the oldest log record not yet committed to Parquet",
            registry=r,
        )
        self.replayed = Counter(
            p + "messages_replayed_total", "Log records replayed at start-up", registry=r
        )
        self.backpressure = Gauge(
            p + "backpressure_active",
            "1 while acknowledgements are paused (log cap reached or log unwritable)",
            registry=r,
        )

        # Sink
        self.rows_written = Counter(
            p + "rows_written_total", "Rows committed to Parquet by table", ["table"], registry=r
        )
        self.files_committed = Counter(
            p + "files_committed_total", "Parquet files committed by table", ["table"], registry=r
        )
        self.bytes_written = Counter(
            p + "parquet_bytes_written_total", "Parquet bytes committed", ["table"], registry=r
        )
        self.flush_duration = Histogram(
            p + "flush_duration_seconds",
            "Time to decode-commit one batch (files, index, checkpoint)",
            buckets=_FLUSH_BUCKETS,
            registry=r,
        )
        self.flush_failures = Counter(
            p + "flush_failures_total", "Flush attempts that failed and will be retried", registry=r
        )
        self.messages_rejected = Counter(
            p + "messages_rejected_total",
            "Messages quarantined in rejected/ by reason code",
            ["reason"],
            registry=r,
        )
        self.intake_groups = Counter(
            p + "intake_groups_total",
            "Groups of messages logged with one write and fsync, by what closed the group",
            ["closed_by"],
            registry=r,
        )
        self.duplicates = Counter(
            p + "duplicates_total", "Messages dropped as repeats of a seen message_id", registry=r
        )
        self.unknown_properties = Counter(
            p + "unknown_properties_total",
            "Items whose capability/property is not in the bundled Auto API catalogue (kept)",
            registry=r,
        )

        # Disk (ingest.volumes): refreshed on the heartbeat; no output series for an object store
        self.volume_available = Gauge(
            p + "volume_available_bytes",
            "Bytes an unprivileged writer may still use on the filesystem holding the state "
            "folder or the local output folder",
            ["volume"],
            registry=r,
        )

        # Liveness
        self.last_commit_time = Gauge(
            p + "last_commit_timestamp_seconds",
            "Unix time of the last successful Parquet commit",
            registry=r,
        )

        # Fleet clearance and HM API
        self.clearance_vehicles = Gauge(
            p + "clearance_vehicles", "Vehicles by clearance status", ["status"], registry=r
        )
        self.last_reconcile_time = Gauge(
            p + "last_reconcile_timestamp_seconds",
            "Unix time of the last successful reconcile with HM's clearance API",
            registry=r,
        )
        self.api_requests = Counter(
            p + "api_requests_total",
            "HM API requests by endpoint and HTTP status (0: no response)",
            ["endpoint", "status"],
            registry=r,
        )
        self.api_latency = Histogram(
            p + "api_request_duration_seconds",
            "HM API request latency by endpoint",
            ["endpoint"],
            buckets=_API_BUCKETS,
            registry=r,
        )
        self.api_retries = Counter(
            p + "api_retries_total", "HM API retries by cause", ["cause"], registry=r
        )
        self.token_renewals = Counter(
            p + "token_renewals_total", "HM API access tokens obtained", registry=r
        )
        self.webhooks = Counter(
            p + "webhook_deliveries_total",
            "Webhook deliveries by outcome (accepted, or the refusal reason)",
            ["outcome"],
            registry=r,
        )

        # Replicas ([replica] id)
        self.replica_leader = Gauge(
            p + "replica_leader",
            "1 while this replica leads its group (fleet control, adoption of lost replicas)",
            registry=r,
        )
        self.replica_adoptions = Counter(
            p + "replica_adoptions_total",
            "Sessions of lost replicas this replica took over (shared mode: drained and deleted; "
            "VIN-sharded mode: hosted until the replica returns)",
            registry=r,
        )
        self.adopted_messages = Counter(
            p + "replica_adopted_messages_total",
            "Messages taken over from lost replicas' sessions (also in messages_received_total)",
            registry=r,
        )
        self.hosted_sessions = Gauge(
            p + "replica_hosted_sessions",
            "Lost replicas' sessions this replica hosts now (VIN-sharded mode)",
            registry=r,
        )
        self.topic_filters = Gauge(
            p + "replica_topic_filters",
            "Topic filters this replica's own session holds (VIN-sharded mode)",
            registry=r,
        )
        self.envelope_rule_lists = Gauge(
            p + "replica_envelope_rule_lists",
            "Member lists this replica's own session keeps V2 envelopes by: 1 when settled, more "
            "while a member-list change settles, 0 when it takes none (VIN-sharded mode, MQTT 5)",
            registry=r,
        )
        self.handover_claims = Counter(
            p + "replica_handover_claims_total",
            "Messages of VINs changing owner claimed before logging, by who got them: own (logged "
            "here), other (another replica's session logs them; acknowledged unlogged), "
            "unavailable (the database could not be asked: logged)",
            ["claimant"],
            registry=r,
        )
        self.envelopes_skipped = Counter(
            p + "replica_envelopes_skipped_total",
            "V2 envelopes acknowledged without being logged because another replica's session "
            "keeps their VIN's (VIN-sharded mode with MQTT 5; also in messages_received_total)",
            registry=r,
        )
