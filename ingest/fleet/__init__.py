"""Fleet clearance control: the desired fleet, HM's statuses, the reconcile loop, the history.

::

    desired.py    the desired fleet file (CSV or YAML) → validated DesiredVehicle list
    plan.py       desired vs HM's listing → what to create, remove, keep (pure)
    store.py      statuses and transitions in SQLite; the sink's gate (refusal)
    history.py    transitions → <output>/clearance/date=…/*.parquet, exactly once
    reconcile.py  the control loop (Reconciler.run) and one cycle (reconcile_once)
    apiclient.py  [api] settings → HmApiClient with metrics
    views.py      the operator CLI's JSON and tables (ingest/fleet_cli.py); render.py draws them
"""

from ingest.fleet.apiclient import build_api_client
from ingest.fleet.desired import DesiredVehicle, load_desired_fleet
from ingest.fleet.history import TransitionHistory
from ingest.fleet.plan import Plan, RejectedVehicle, plan
from ingest.fleet.reconcile import Reconciler, ReconcileReport, Refusal
from ingest.fleet.store import STORE_FILE, ClearanceStateStore, Transition

__all__ = [
    "STORE_FILE",
    "ClearanceStateStore",
    "DesiredVehicle",
    "Plan",
    "ReconcileReport",
    "Reconciler",
    "Refusal",
    "RejectedVehicle",
    "Transition",
    "TransitionHistory",
    "build_api_client",
    "load_desired_fleet",
    "plan",
]
