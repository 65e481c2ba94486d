"""Streaming cache settings and their validation.

Kept free of torch and transformers imports so that bad arguments are rejected
in milliseconds, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers

POSITIONS = ("shifted", "original")
# chunked: exact and fast; token: the reference loop; recompute: a fresh dense pass per window
# (the paper's "sliding window with re-computation" baseline, not a streaming cache).
METHODS = ("chunked", "token", "recompute")
DEFAULT_METHOD = "chunked"
DEFAULT_START_SIZE = 4
DEFAULT_RECENT_SIZE = 1020
DEFAULT_CHUNK_SIZE = 128  # measured by scripts/bench_eval.py (SmolLM2, CPU, 4+1020): 64-512 within 25 %


SPEED_ONLY = "speed_only"  # field metadata: the knob changes speed, never a number


def _knob(default, help: str, choices: tuple[str, ...] | None = None, speed_only: bool = False):
    """A settings field with what the tools' flags need: help text, allowed values, whether it is speed only."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, SPEED_ONLY: speed_only})


def _as_int(name: str, value, minimum: int) -> int:
    # lm-eval parses "4" as int and "4.5" as float; bool is an int subclass but never a size.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _as_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class StreamingSettings:
    """A sink+window cache: ``start_size`` sinks plus ``recent_size`` recent tokens.

    See docs/semantics.md for what every field means.
    """

    start_size: int = _knob(DEFAULT_START_SIZE, "attention sinks: the first tokens, never evicted")
    recent_size: int = _knob(DEFAULT_RECENT_SIZE, f"recent tokens kept after the sinks (default {DEFAULT_RECENT_SIZE})")
    positions: str = _knob("shifted", "shifted: positions of cache slots; original: positions in the text",
                           choices=POSITIONS)
    method: str = _knob(DEFAULT_METHOD, "chunked: exact, many tokens per pass; token: the reference loop; "
                        "recompute: a dense pass per window", choices=METHODS)
    # Informational once resolved: recent_size was derived from it.
    compression_ratio: float | None = _knob(None, "instead of the recent size: C = round((1 - r) * max_length)")
    # Speed only: every chunk size gives the same numbers, so runs differing in it share a name.
    chunk_size: int = _knob(DEFAULT_CHUNK_SIZE, "tokens per forward pass of method chunked (speed only, same numbers)",
                            speed_only=True)
    stride: int | None = _knob(None, "method recompute: tokens scored per window (default 1)")

    def __post_init__(self):
        object.__setattr__(self, "start_size", _as_int("start_size", self.start_size, 0))
        object.__setattr__(self, "recent_size", _as_int("recent_size", self.recent_size, 1))
        _as_choice("positions", self.positions, POSITIONS)
        _as_choice("method", self.method, METHODS)
        object.__setattr__(self, "chunk_size", _as_int("chunk_size", self.chunk_size, 1))
        object.__setattr__(self, "stride", _check_stride(self.stride, self.method, self.positions, self.recent_size))

    @property
    def capacity(self) -> int:
        """C: tokens held between steps."""
        return self.start_size + self.recent_size

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"capacity": self.capacity}


# The one list of knobs: streaming_hf's model args, the compare grid's keys and the scripts' flags
# all derive from the dataclass fields (tests/test_knobs.py checks that each one reaches them).
KNOBS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(StreamingSettings))
# Knobs that change results: a run's name is made of these (chunk_size is speed only).
RESULT_KNOBS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(StreamingSettings) if not field.metadata.get(SPEED_ONLY)
)
def _check_stride(stride, method: str, positions: str, recent_size: int | None) -> int | None:
    """1 <= stride <= recent_size for method=recompute (None means 1); no stride for the cache methods."""
    if method != "recompute":
        if stride is not None:
            raise ValueError(f"stride applies to method=recompute only; got stride={stride!r} with method={method}")
        return None
    if positions != "shifted":
        raise ValueError(
            f"positions={positions} does not apply to method=recompute: every window is re-encoded at "
            "positions 0..C-1 (leave positions at its default, shifted)"
        )
    if stride is None:
        return 1
    stride = _as_int("stride", stride, 1)
    # The scored tokens are the window's last ones; more than recent_size would reach into the sinks.
    if recent_size is not None and stride > recent_size:
        raise ValueError(f"stride must be an integer in [1, recent_size={recent_size}], got {stride}")
    return stride


def check_compression_ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"compression_ratio must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"compression_ratio must be in [0, 1), got {value}")
    return value


def recent_size_from_ratio(ratio: float, start_size: int, max_length: int) -> int:
    """W = round((1 - r) * L) - S; raises when that leaves fewer than one recent token."""
    capacity = round((1.0 - ratio) * max_length)
    recent = capacity - start_size
    if recent < 1:
        raise ValueError(
            f"compression_ratio={ratio} with max_length={max_length} gives a cache of {capacity} tokens, "
            f"which leaves recent_size={recent} after start_size={start_size}; recent_size must be >= 1 "
            "(lower compression_ratio, lower start_size or raise max_length)"
        )
    return recent


def resolve(
    start_size=DEFAULT_START_SIZE,
    recent_size=None,
    compression_ratio=None,
    positions="shifted",
    method=DEFAULT_METHOD,
    chunk_size=DEFAULT_CHUNK_SIZE,
    stride=None,
    max_length: int | None = None,
) -> StreamingSettings:
    """Validate user arguments and return settings.

    With ``compression_ratio`` and no ``max_length`` yet, recent_size is left at a
    placeholder: call again with ``max_length`` once the model's context length is known.
    """
    start_size = _as_int("start_size", start_size, 0)
    _as_choice("positions", positions, POSITIONS)
    _as_choice("method", method, METHODS)
    chunk_size = _as_int("chunk_size", chunk_size, 1)
    # recent_size may not be known yet (compression_ratio): its bound on stride is checked below.
    stride = _check_stride(stride, method, positions, None)
    common = dict(positions=positions, method=method, chunk_size=chunk_size, stride=stride)
    if compression_ratio is None:
        recent = DEFAULT_RECENT_SIZE if recent_size is None else recent_size
        return StreamingSettings(start_size, recent, **common)
    if recent_size is not None:
        raise ValueError(
            "give either recent_size or compression_ratio, not both "
            f"(got recent_size={recent_size!r}, compression_ratio={compression_ratio!r})"
        )
    ratio = check_compression_ratio(compression_ratio)
    if max_length is None:
        # Placeholder recent_size (the smallest a stride allows) until max_length is known.
        return StreamingSettings(start_size, stride or 1, compression_ratio=ratio, **common)
    max_length = _as_int("max_length", max_length, 1)
    recent = recent_size_from_ratio(ratio, start_size, max_length)
    return StreamingSettings(start_size, recent, compression_ratio=ratio, **common)


# What a user gets for a knob not given: resolve()'s defaults (recent_size None: DEFAULT_RECENT_SIZE, or
# derived from compression_ratio; stride None: 1 for recompute). The adapter's and scripts' defaults.
ARG_DEFAULTS: dict = {
    name: parameter.default for name, parameter in inspect.signature(resolve).parameters.items() if name in KNOBS
}
