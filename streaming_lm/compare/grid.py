"""The grid of settings: one ``Run`` per streaming_hf setting, plus the dense baseline."""

from __future__ import annotations

import dataclasses
import itertools

from .. import settings as settings_mod
from .errors import CompareError

BASELINE = "hf"


@dataclasses.dataclass(frozen=True)
class Run:
    model: str  # "hf" or "streaming_hf"
    stream: dict  # streaming_hf model args as passed ({} for the baseline)

    @property
    def name(self) -> str:
        return run_name(self.model, self.stream)

    def describe(self) -> str:
        if self.model == BASELINE:
            return "hf (dense baseline)"
        return "streaming_hf " + " ".join(f"{k}={v}" for k, v in self.stream.items())


def run_name(model: str, stream: dict) -> str:
    """Sub-directory and column name, e.g. ``streaming_s4_r252_shifted``; defaults filled as the model does."""
    if model == BASELINE:
        return BASELINE
    start = stream.get("start_size", settings_mod.DEFAULT_START_SIZE)
    if stream.get("compression_ratio") is not None:
        size = f"cr{float(stream['compression_ratio']):g}"
    else:
        size = f"r{stream.get('recent_size', settings_mod.DEFAULT_RECENT_SIZE)}"
    name = f"streaming_s{start}_{size}_{stream.get('positions', 'shifted')}"
    # The method is named only when chosen, so the model's default can change without renaming runs.
    return name + (f"_{stream['method']}" if stream.get("method") else "")


def _split(text: str | None, convert, flag: str) -> list:
    if text is None:
        return []
    values = []
    for item in (part.strip() for part in text.split(",")):
        try:
            values.append(convert(item))
        except ValueError:
            raise CompareError(f"{flag}: {item!r} is not a valid value; expected comma-separated numbers") from None
    return list(dict.fromkeys(values))  # drop repeats, keep order


def build_grid(
    start_sizes, recent_sizes, compression_ratios, positions, method=None, max_length=None, chunk_size=None
) -> list[Run]:
    """The baseline plus one run per setting, every setting validated by ``settings.resolve``."""
    if recent_sizes and compression_ratios:
        # Both budget the same cache (C); mixing them would put two kinds of x value on one axis.
        raise CompareError("give --recent-sizes or --compression-ratios, not both")
    if not recent_sizes and not compression_ratios:
        raise CompareError("give --recent-sizes or --compression-ratios (comma-separated lists)")
    size_key, sizes = ("recent_size", recent_sizes) if recent_sizes else ("compression_ratio", compression_ratios)
    runs = [Run(BASELINE, {})]
    for pos, start, size in itertools.product(positions, start_sizes, sizes):
        stream = {"start_size": start, size_key: size, "positions": pos}
        if method is not None:
            stream["method"] = method
        if chunk_size is not None:  # speed only: same numbers, so not part of the run's name
            stream["chunk_size"] = chunk_size
        try:
            resolved = settings_mod.resolve(**stream, max_length=max_length)
        except ValueError as error:
            shown = " ".join(f"{k}={v}" for k, v in stream.items())
            raise CompareError(f"bad grid setting ({shown}): {error}") from None
        # Pass the validated values on, so "04" and 4 are one run with one name.
        stream["start_size"] = resolved.start_size
        if size_key == "recent_size":
            stream["recent_size"] = resolved.recent_size
        runs.append(Run("streaming_hf", stream))
    return _unique(runs)


def _unique(runs: list[Run]) -> list[Run]:
    seen, out = set(), []
    for run in runs:
        if run.name not in seen:
            seen.add(run.name)
            out.append(run)
    return out
