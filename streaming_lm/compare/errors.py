"""How compare reports: bad input as ``CompareError``, progress on stderr."""

from __future__ import annotations

import sys


class CompareError(ValueError):
    """A bad argument or input file; the CLI prints it and exits with status 2."""


def say(message: str) -> None:
    # stderr, like lm-eval's own logs and progress bars, so stdout keeps only the table.
    print(message, file=sys.stderr, flush=True)
