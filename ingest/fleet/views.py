"""How the operator CLI shows clearances, plans and reconcile reports: JSON and text tables."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ingest.fleet.plan import Plan
from ingest.fleet.reconcile import ReconcileReport, Refusal
from ingest.fleet.render import table
from ingest.hmapi import Clearance, ClearanceResult

# Beyond this many, the text summary of a sync counts registrations instead of listing them.
MAX_LISTED_CREATED = 20


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def since(clearance: Clearance) -> str | None:
    entries = [e for e in clearance.changelog if e.status == clearance.status]
    return iso(entries[-1].timestamp) if entries else None


def reason(clearance: Clearance) -> str | None:
    entries = [e for e in clearance.changelog if e.status == clearance.status]
    return entries[-1].reason if entries else None


def tags(tags: Any) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(dict(tags).items()))


def clearance_json(clearance: Clearance) -> dict[str, Any]:
    return {
        "vin": clearance.vin,
        "status": clearance.status,
        "brand": clearance.brand,
        "tags": dict(clearance.tags),
        "since": since(clearance),
        "reason": reason(clearance),
        "changelog": [
            {"timestamp": iso(e.timestamp), "status": e.status, "reason": e.reason}
            for e in clearance.changelog
        ],
    }


def result_json(result: ClearanceResult) -> dict[str, Any]:
    return {"vin": result.vin, "status": result.status, "description": result.description}


def refusal_json(refusal: Refusal) -> dict[str, Any]:
    return {
        "vin": refusal.vin,
        "action": refusal.action,
        "http_status": refusal.http_status,
        "detail": refusal.detail,
    }


def plan_json(proposal: Plan) -> dict[str, Any]:
    return {
        "create": [v.vin for v in proposal.create],
        "remove": proposal.remove,
        "keep": proposal.keep,
        "waiting": proposal.waiting,
        "rejected": [{"vin": r.vin, "reason": r.reason} for r in proposal.rejected],
        "prune_skipped": proposal.prune_skipped,
    }


def report_json(report: ReconcileReport) -> dict[str, Any]:
    return {
        "dry_run": False,
        "desired": report.desired,
        "listed": report.listed,
        "plan": plan_json(report.plan) if report.plan else None,
        "created": [result_json(r) for r in report.created],
        "removed": [result_json(r) for r in report.removed],
        "refused": [refusal_json(r) for r in report.refused],
        "rejected": [{"vin": r.vin, "reason": r.reason} for r in report.rejected],
        "transitions": [
            {
                "vin": t.vin,
                "from": t.from_status,
                "to": t.to_status,
                "reason": t.reason,
                "source": t.source,
            }
            for t in report.transitions
        ],
        "held": report.held,
        "errors": report.errors,
        "warnings": report.warnings,
    }


@dataclass(frozen=True)
class Line:
    vin: str
    action: str
    result: str
    detail: str | None = None


def print_plan(proposal: Plan) -> None:
    counts = [
        ("register", len(proposal.create)),
        ("remove", len(proposal.remove)),
        ("keep", len(proposal.keep)),
        ("wait (in transition)", len(proposal.waiting)),
        ("rejected (not re-requested)", len(proposal.rejected)),
    ]
    print("dry run: nothing was changed\n")
    print(table(("WOULD", "VEHICLES"), counts))
    lines = [Line(v.vin, "register", "planned") for v in proposal.create]
    lines += [Line(vin, "remove", "planned") for vin in proposal.remove]
    lines += [Line(r.vin, "none", "rejected", r.reason) for r in proposal.rejected]
    print_lines(lines)
    if proposal.prune_skipped:
        print(f"\nnote: {proposal.prune_skipped}")


def print_report(report: ReconcileReport) -> None:
    counts = [
        ("registered", len(report.created)),
        ("removal started", len(report.removed)),
        ("refused by HM", len(report.refused)),
        ("rejected (not re-requested)", len(report.rejected)),
        ("status changes recorded", len(report.transitions)),
    ]
    print(table(("RESULT", "VEHICLES"), counts))
    lines = [Line(r.vin, "register", r.status) for r in report.created]
    if len(lines) > MAX_LISTED_CREATED:
        lines = [Line(f"({len(lines)} VINs)", "register", "pending", "--json lists them")]
    lines += [Line(r.vin, "remove", r.status) for r in report.removed]
    lines += [
        Line(r.vin, "register" if r.action == "create" else "remove", "refused", r.detail)
        for r in report.refused
    ]
    lines += [Line(r.vin, "none", "rejected", r.reason) for r in report.rejected]
    print_lines(lines)
    for warning in report.warnings:
        print(f"\nwarning: {warning}")
    for error in report.errors:
        print(f"hm-ingest: sync incomplete: {error}", file=sys.stderr)


def print_lines(lines: list[Line]) -> None:
    if lines:
        print()
        print(table(("VIN", "ACTION", "RESULT", "DETAIL"), [
            (line.vin, line.action, line.result, line.detail) for line in lines
        ]))  # fmt: skip
