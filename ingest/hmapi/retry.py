"""How the client retries: capped exponential backoff with full jitter, and 429 waits."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ingest.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings.

    ``max_attempts`` counts every try of one call, including the first; the single re-authentication
    after a 401 is not counted. A 429 waits what HM asked (``Retry-After`` or "retry after Ns"),
    at most ``max_rate_limit_wait_s``, and ``default_rate_limit_wait_s`` when HM names no wait.
    """

    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    # HM's documented 429 example says "retry after 10s".
    default_rate_limit_wait_s: float = 10.0
    # The per-VIN GET allows 60 calls/min, so a minute covers any window HM has documented.
    max_rate_limit_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("retry max_attempts must be at least 1", key="api.retry")
        if min(self.backoff_base_s, self.backoff_cap_s, self.max_rate_limit_wait_s) < 0:
            raise ConfigError("retry waits must not be negative", key="api.retry")

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2**(n-1))].

        Spreading retries over the whole window keeps many daemons that failed together from
        retrying together.
        """
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(attempt - 1, 62))
        return rng.uniform(0.0, ceiling)

    def rate_limit_wait_s(self, asked_s: float) -> float:
        return min(max(asked_s, 0.0), self.max_rate_limit_wait_s)
