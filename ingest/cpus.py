"""How many CPUs this process may use: its affinity mask, capped by a container's CPU limit.

``os.cpu_count()`` reports the host's CPUs, also inside a container limited to one of them;
Kubernetes and Docker enforce CPU limits as a cgroup quota, which is read here (cgroup v2's
``cpu.max``, else v1's ``cpu.cfs_quota_us``).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> float:
    """CPUs available to this process; fractional under a quota (``cpu: 1500m`` is 1.5)."""
    count = float(len(os.sched_getaffinity(0)))
    quota = _quota(cgroup)
    return count if quota is None else min(count, quota)


def _quota(cgroup: Path) -> float | None:
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            limit = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if limit in ("max", "-1"):
        return None
    try:
        return int(limit) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
