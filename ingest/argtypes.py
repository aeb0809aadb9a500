"""argparse value types shared by the sub-commands, so every flag words its errors the same way."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def probability(text: str) -> float:
    """A share from 0 to 1, e.g. ``--bad-rate 0.01``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 to 1, got {text!r}")
    return value


def positive(what: str = "a number") -> Callable[[str], float]:
    """A converter for numbers > 0; ``what`` names the quantity in the error."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        if not value > 0:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return value

    return convert
