"""The grid of settings: one ``Run`` per streaming_hf setting, plus the dense baseline."""

from __future__ import annotations

import dataclasses
import itertools
import re

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


# Knobs with their own place in a run name; every other knob in settings.RESULT_KNOBS is appended when set.
_NAMED_KNOBS = ("start_size", "recent_size", "compression_ratio", "positions", "method", "policy", "heavy_size")


def knob(stream: dict, name: str):
    """A run's value for a knob: its own, else the default the model would use."""
    value = stream.get(name, settings_mod.ARG_DEFAULTS[name])
    if value is not None:
        return value
    policy = stream.get("policy", settings_mod.DEFAULT_POLICY)
    scored = policy != "sink_window"
    defaults = {"recent_size": 0 if scored else settings_mod.DEFAULT_RECENT_SIZE, "heavy_size": 0,
                "positions": settings_mod.default_positions(policy)}
    return defaults.get(name)


def other_knobs(stream: dict) -> dict:
    """The result knobs a run sets beyond the named ones (e.g. stride): runs differing in them differ in name."""
    return {k: stream[k] for k in settings_mod.RESULT_KNOBS if k not in _NAMED_KNOBS and stream.get(k) is not None}


def run_name(model: str, stream: dict) -> str:
    """Sub-directory and column name, e.g. ``streaming_s4_r252_shifted``; defaults filled as the model does."""
    if model == BASELINE:
        return BASELINE
    if stream.get("compression_ratio") is not None:
        size = f"cr{float(stream['compression_ratio']):g}"
    else:
        size = f"r{knob(stream, 'recent_size')}"
    policy = str(knob(stream, "policy"))
    # sink_window runs keep the names they had before policies existed; a plug-in path becomes a folder name.
    prefix = "streaming" if policy == "sink_window" else "streaming_" + re.sub(r"[^\w]+", "-", policy)
    if (policy != "sink_window" or stream.get("heavy_size") is not None) and stream.get("compression_ratio") is None:
        size += f"_h{knob(stream, 'heavy_size')}"
    name = f"{prefix}_s{knob(stream, 'start_size')}_{size}_{knob(stream, 'positions')}"
    # The method is named only when chosen, so the model's default can change without renaming runs.
    name += f"_{stream['method']}" if stream.get("method") else ""
    return name + "".join(f"_{k}{v}" for k, v in other_knobs(stream).items())


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
    start_sizes, recent_sizes, compression_ratios, positions, method=None, max_length=None, chunk_size=None,
    strides=(), policies=(), heavy_sizes=(),
) -> list[Run]:
    """The baseline plus one run per setting, every setting validated by ``settings.resolve``."""
    if recent_sizes and compression_ratios:
        # Both budget the same cache (C); mixing them would put two kinds of x value on one axis.
        raise CompareError("give --recent-sizes or --compression-ratios, not both")
    if not recent_sizes and not compression_ratios:
        raise CompareError("give --recent-sizes or --compression-ratios (comma-separated lists)")
    size_key, sizes = ("recent_size", recent_sizes) if recent_sizes else ("compression_ratio", compression_ratios)
    runs = [Run(BASELINE, {})]
    combos = itertools.product(policies or [None], positions or [None], start_sizes, sizes, strides or [None],
                               heavy_sizes or [None])
    for policy, pos, start, size, stride, heavy in combos:
        stream = {"start_size": start, size_key: size,
                  "positions": pos or settings_mod.default_positions(policy or settings_mod.DEFAULT_POLICY)}
        if policy not in (None, settings_mod.DEFAULT_POLICY):
            stream["policy"] = policy
            if heavy is not None:
                stream["heavy_size"] = heavy
        if method is not None:
            stream["method"] = method
        if stride is not None:
            stream["stride"] = stride
        if chunk_size is not None:  # speed only: same numbers, so not part of the run's name
            stream["chunk_size"] = chunk_size
        try:
            resolved = settings_mod.resolve(**stream, max_length=max_length)
        except ValueError as error:
            shown = " ".join(f"{k}={v}" for k, v in stream.items())
            raise CompareError(f"bad grid setting ({shown}): {error}") from None
        # Pass the validated values on, so "04" and 4 are one run with one name.
        for key in ("start_size", "recent_size", "stride", "heavy_size"):
            if key in stream:
                stream[key] = getattr(resolved, key)
        runs.append(Run("streaming_hf", stream))
    return _unique(runs)


def _unique(runs: list[Run]) -> list[Run]:
    seen, out = set(), []
    for run in runs:
        if run.name not in seen:
            seen.add(run.name)
            out.append(run)
    return out
