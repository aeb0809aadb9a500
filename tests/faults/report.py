"""Run the fault scenarios and print the figures table (issue 6).

    .venv/bin/python -m tests.faults.report            # CI-sized (the sizes the pytest suite uses)
    .venv/bin/python -m tests.faults.report --full     # 20 daemon kills, longer streams
    .venv/bin/python -m tests.faults.report --only 1,3 --markdown

Each scenario gets its own throwaway certificates, Mosquitto and daemon. Exit status 1 when any
scenario lost or duplicated a message, or failed outright.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from ingest.testing import MosquittoBroker, make_certs
from ingest.testing.certs import CertBundle
from tests.faults import scenarios
from tests.faults.harness import Outcome
from tests.faults.sizes import CI, FULL, Sizes

Scenario = Callable[[MosquittoBroker, CertBundle, Path], Outcome]


def plan(sizes: Sizes, *, tmpfs: bool) -> dict[str, list[Scenario]]:
    return {
        "1": [lambda b, c, w: scenarios.sigkill(b, c, w, kills=sizes.kills)],
        "2": [lambda b, c, w: scenarios.broker_kill(b, c, w, kills=sizes.broker_kills)],
        "3": [lambda b, c, w: scenarios.network(b, c, w, rounds=sizes.network_rounds)],
        "4": [
            lambda b, c, w: scenarios.disk_full(
                b, c, w, messages=sizes.disk_messages, log_on_full_disk=False, use_tmpfs=tmpfs
            ),
            *(
                [
                    lambda b, c, w: scenarios.disk_full(
                        b, c, w, messages=sizes.disk_messages, log_on_full_disk=True, use_tmpfs=True
                    )
                ]
                if tmpfs
                else []
            ),
        ],
        "5": [lambda b, c, w: scenarios.torn_tail(b, c, w, messages=sizes.torn_messages)],
        "6": [
            lambda b, c, w: scenarios.hostile(
                b, c, w, count=sizes.hostile_count, big=sizes.hostile_big
            )
        ],
        "7": [scenarios.api_faults],
        "8": [scenarios.refused_certificates, scenarios.webhook_attacks],
    }


def run_one(scenario: Scenario, root: Path, certs: CertBundle) -> Outcome | str:
    workdir = Path(tempfile.mkdtemp(dir=root))
    try:
        with MosquittoBroker(workdir / "broker", certs) as broker:
            return scenario(broker, certs, workdir)
    except Exception as exc:  # report it as a failed row, keep going with the others
        traceback.print_exc()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


HEADER = (
    "scenario",
    "faults",
    "published",
    "rows written",
    "quarantined",
    "lost",
    "duplicated",
    "recovery s",
    "notes",
)


def rows(results: list[Outcome | tuple[str, str]]) -> list[tuple[str, ...]]:
    table = []
    for result in results:
        if isinstance(result, Outcome):
            t = result.tally
            table.append(
                (
                    result.scenario,
                    str(result.faults),
                    str(t.published),
                    str(t.rows_written),
                    str(t.quarantined),
                    str(t.lost),
                    str(t.duplicated),
                    f"{result.recovery_s:.2f}" if result.recovery_s else "-",
                    result.notes,
                )
            )
        else:
            name, error = result
            table.append((name, "-", "-", "-", "-", "-", "-", "-", f"FAILED: {error}"))
    return table


def render(table: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(HEADER)
    ]
    widths[-1] = 0
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [HEADER, *table])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report", description=__doc__)
    parser.add_argument(
        "--full", action="store_true", help="full sizes (20 kills) instead of CI sizes"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario numbers, e.g. 1,3")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    sizes = FULL if args.full else CI
    with tempfile.TemporaryDirectory(prefix="hm-faults-") as tmp:
        root = Path(tmp)
        tmpfs = os.geteuid() == 0 and scenarios.can_mount_tmpfs(root / "probe")
        certs = make_certs(root / "certs")
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        results: list[Outcome | tuple[str, str]] = []
        started = time.monotonic()
        for number, group in plan(sizes, tmpfs=tmpfs).items():
            if wanted and number not in wanted:
                continue
            for scenario in group:
                print(f"running scenario {number} ...", file=sys.stderr, flush=True)
                result = run_one(scenario, root, certs)
                results.append(result if isinstance(result, Outcome) else (f"{number}.", result))
        print(render(rows(results), args.markdown))
        print(
            f"\n{'full' if args.full else 'CI'} sizes, {time.monotonic() - started:.0f} s; "
            f"disk full via {'tmpfs' if tmpfs else 'injected ENOSPC'}",
        )
    failed = [r for r in results if not isinstance(r, Outcome) or not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
