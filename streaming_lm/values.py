"""The one validation vocabulary: every knob, method parameter and math function's argument is checked here.

Model-arg values arrive parsed by lm-eval ("4" as 4, "4.5" as 4.5, "true" as True) or as strings (the compare grid);
each function returns the value as its type or raises ``ValueError`` naming the argument and what it allows."""

from __future__ import annotations

import math
import numbers


def as_int(name: str, value, minimum: int | None) -> int:
    # lm-eval parses "4" as int and "4.5" as float; bool is an int subclass but never a size.
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer{bound}, got {value}")
    return value


def as_count(name: str, value, minimum: int) -> int:
    """An integer ``>= minimum`` given as one (a math function's argument: no strings, no floats)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def as_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def as_float(name: str, value, minimum: float | None = None) -> float:
    """A finite number ``>= minimum``."""
    value = _number(value)
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be a number{bound}, got {value}")
    return value


def as_fraction(name: str, value, upper_open: bool = False) -> float:
    """A number in [0, 1], or [0, 1) with ``upper_open``."""
    interval = "[0, 1)" if upper_open else "[0, 1]"
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    value = float(value)
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def as_odd(name: str, value, minimum: int = 1) -> int:
    """An odd integer ``>= minimum`` (a pooling kernel keeps one score per key only then)."""
    value = as_int(name, value, minimum)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (1, 3, 5, ...): the pooling keeps one score per key only then; "
                         f"got {value}")
    return value


def as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")
