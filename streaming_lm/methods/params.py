"""A method's parameter: its declaration (name, type, default, bounds) and its parsing, in ``values.py``'s words."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..values import as_bool, as_choice, as_float, as_int


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a method, declared on its class (``params``): a model arg of its own
    (``policy=<name>,<param>=<value>``), checked before any model loads, written in the results file under
    ``config.streaming.policy_params`` and usable as a grid axis of ``compare`` (``--param``).

    ``kind`` is ``int``, ``float``, ``bool`` or ``str``; ``minimum`` bounds a number, ``choices`` lists a
    string's values; ``check`` (optional) raises ``ValueError`` for anything else it refuses (in the words of
    ``values.py``).
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], Any] | None = None

    def parse(self, value) -> Any:
        """The value as ``kind`` (lm-eval passes "4" as 4; the grid passes strings); ValueError names it."""
        if self.kind is bool:
            value = as_bool(self.name, value)
        elif self.kind is int:
            value = as_int(self.name, value, None if self.minimum is None else int(self.minimum))
        elif self.kind is float:
            value = as_float(self.name, value, self.minimum)
        elif self.choices is not None:
            value = as_choice(self.name, value, self.choices)
        elif not isinstance(value, str):
            raise ValueError(f"{self.name} must be a string, got {value!r}")
        if self.check is not None:
            self.check(value)
        return value
