"""What to change at HM to move its fleet towards the desired one: a pure function, no I/O.

For a desired VIN, by its current status at HM:

========================  =================================================================
(not at HM)               create
revoked, canceled         create again (the operator wants it back)
pending, approved         keep
rejected                  not re-requested: HM decided, asking again every cycle only repeats
                          the rejection; reported with HM's reason (remove the VIN from the
                          file, or re-add it by hand with ``hm-ingest fleet add``)
revoking, canceling       wait: HM refuses a new request mid-transition; created once it ends
any other (new) status    keep: never act on a status this version does not understand
========================  =================================================================

With ``prune``, VINs at HM that are not desired and are ``approved`` (revoke) or ``pending``
(cancel) are removed. Pruning never happens in observe-only mode (no desired fleet), and never
against an *empty* desired fleet: an emptied or truncated file must not revoke the whole fleet
(remove vehicles explicitly with ``hm-ingest fleet remove``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ingest.fleet.desired import DesiredVehicle
from ingest.hmapi import Clearance, ClearanceStatus

RECREATE = frozenset({ClearanceStatus.REVOKED.value, ClearanceStatus.CANCELED.value})
IN_TRANSITION = frozenset({ClearanceStatus.REVOKING.value, ClearanceStatus.CANCELING.value})
REMOVABLE = frozenset({ClearanceStatus.APPROVED.value, ClearanceStatus.PENDING.value})
EMPTY_PRUNE_REFUSED = (
    "the desired fleet is empty: pruning would remove every clearance, so nothing was removed; "
    "use 'hm-ingest fleet remove' to remove vehicles explicitly"
)


@dataclass(frozen=True)
class RejectedVehicle:
    """A desired VIN HM rejected; ``reason`` is HM's (from the clearance changelog)."""

    vin: str
    brand: str | None
    reason: str | None


@dataclass(frozen=True)
class Plan:
    create: list[DesiredVehicle] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    rejected: list[RejectedVehicle] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    prune_skipped: str | None = None

    @property
    def observe_only(self) -> bool:
        return not (self.create or self.remove or self.keep or self.rejected or self.waiting)


def rejection_reason(clearance: Clearance) -> str | None:
    for entry in reversed(clearance.changelog):
        if entry.status == ClearanceStatus.REJECTED and entry.reason:
            return entry.reason
    return None


def plan(
    desired: Sequence[DesiredVehicle] | None,
    current: Mapping[str, Clearance],
    *,
    prune: bool,
) -> Plan:
    """The changes that bring ``current`` (HM's fleet by VIN) towards ``desired``.

    ``desired=None`` is observe-only: an empty plan, whatever ``prune`` says.
    """
    if desired is None:
        return Plan()
    create: list[DesiredVehicle] = []
    keep: list[str] = []
    rejected: list[RejectedVehicle] = []
    waiting: list[str] = []
    for vehicle in desired:
        clearance = current.get(vehicle.vin)
        if clearance is None or clearance.status in RECREATE:
            create.append(vehicle)
        elif clearance.status == ClearanceStatus.REJECTED:
            reason = rejection_reason(clearance)
            rejected.append(RejectedVehicle(vehicle.vin, clearance.brand, reason))
        elif clearance.status in IN_TRANSITION:
            waiting.append(vehicle.vin)
        else:
            keep.append(vehicle.vin)
    remove: list[str] = []
    skipped: str | None = None
    if prune:
        wanted = {vehicle.vin for vehicle in desired}
        remove = sorted(
            vin for vin, c in current.items() if vin not in wanted and c.status in REMOVABLE
        )
        if remove and not desired:
            remove, skipped = [], EMPTY_PRUNE_REFUSED
    return Plan(create, remove, keep, rejected, waiting, skipped)


__all__ = ["EMPTY_PRUNE_REFUSED", "Plan", "RejectedVehicle", "plan", "rejection_reason"]
