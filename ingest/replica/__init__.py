"""Running several daemons on one application's stream: the replicas' shared coordination."""

from ingest.replica.coordination import CoordinationError, Coordinator, Member

__all__ = ["CoordinationError", "Coordinator", "Member"]
