"""Whether this replica leads its group: read by the fleet control loop, set by the runtime."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Role:
    """``leader`` now; ``changed`` is set on every change (the consumer clears it)."""

    leader: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
