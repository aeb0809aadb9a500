"""A wrapper that keeps credentials out of ``repr``, ``str``, logs and tracebacks."""

from __future__ import annotations

import hmac
from typing import Generic, TypeVar

T = TypeVar("T")

MASK = "***"


class Secret(Generic[T]):
    """Holds a secret value; only :meth:`reveal` hands it out.

    ``repr`` and ``str`` are ``***`` so a settings object, a dataclass holding a token or an
    exception message built with ``f"{secret}"`` cannot leak the value into a log line.
    """

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = self._value, other._value
        if isinstance(mine, str) and isinstance(theirs, str):
            # Constant time: equality on tokens must not become a timing oracle.
            return hmac.compare_digest(mine.encode(), theirs.encode())
        return bool(mine == theirs)

    def __hash__(self) -> int:
        return hash(self._value)
