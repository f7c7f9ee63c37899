"""argparse types for the numbers the commands take: a bad value is refused by argparse with
a message naming the option and exit status 2 (usage), before any work starts."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (0 where an option means "automatic")."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 0")
    return value


def positive_float(text: str) -> float:
    """A finite number over 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number over 0")
    return value


def finite_float(text: str) -> float:
    """A finite number (``nan`` and ``inf`` parse as floats, but a threshold of either calls
    every crop normal, or every one anomalous, with no error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number at all: the same refusal
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value
