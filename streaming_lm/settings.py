"""Streaming cache settings and their validation.

Kept free of torch and transformers imports so that bad arguments are rejected
in milliseconds, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import re

POSITIONS = ("shifted", "original")
# Built-in eviction policies (streaming_lm/policy.py implements them; tests/test_policies.py checks the two agree).
# Every one but sink_window evicts by a score; "package.module:Class" names a user policy (docs/policies.md).
POLICIES = ("sink_window", "tova", "h2o", "knorm")
DEFAULT_POLICY = "sink_window"
# Scored policies with an exact chunked path (streams/scored_chunked.py), and the position mode it serves
# (a plug-in runs on the token loop).
CHUNKED_SCORED = {"tova": "original", "h2o": "original", "knorm": "original"}
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
    positions: str = _knob("shifted", "shifted: positions of cache slots; original: positions in the text "
                           "(default: shifted for sink_window, original for scored policies)", choices=POSITIONS)
    method: str = _knob(DEFAULT_METHOD, "chunked: exact, many tokens per pass; token: the reference loop; "
                        "recompute: a dense pass per window (default: chunked where a policy has it, else token)",
                        choices=METHODS)
    # Informational once resolved: recent_size (or heavy_size) was derived from it.
    compression_ratio: float | None = _knob(None, "instead of the recent size: C = round((1 - r) * max_length)")
    # Speed only: every chunk size gives the same numbers, so runs differing in it share a name.
    chunk_size: int = _knob(DEFAULT_CHUNK_SIZE, "tokens per forward pass of method chunked (speed only, same numbers)",
                            speed_only=True)
    stride: int | None = _knob(None, "method recompute: tokens scored per window (default 1)")
    policy: str = _knob(DEFAULT_POLICY, "eviction policy: sink_window, tova, h2o, knorm, or package.module:Class")
    heavy_size: int = _knob(0, "slots a scored policy fills by its score (C = start + recent + heavy)")

    def __post_init__(self):
        _check_policy(self.policy)
        scored = self.policy != "sink_window"
        object.__setattr__(self, "start_size", _as_int("start_size", self.start_size, 0))
        # Scored policies may keep no recent window (pure TOVA); sink+window needs one.
        object.__setattr__(self, "recent_size", _as_int("recent_size", self.recent_size, 0 if scored else 1))
        object.__setattr__(self, "heavy_size", _as_int("heavy_size", self.heavy_size, 0))
        if not scored and self.heavy_size:
            raise ValueError(
                f"heavy_size applies to scored policies (tova, h2o, knorm, a plug-in); policy=sink_window keeps "
                f"sinks and recent tokens only: got heavy_size={self.heavy_size}"
            )
        if self.capacity < 1:
            raise ValueError("start_size + recent_size + heavy_size must be >= 1 (a cache of at least one token)")
        _as_choice("positions", self.positions, POSITIONS)
        _as_choice("method", self.method, METHODS)
        _check_method(self.policy, self.method, self.positions)
        object.__setattr__(self, "chunk_size", _as_int("chunk_size", self.chunk_size, 1))
        object.__setattr__(self, "stride", _check_stride(self.stride, self.method, self.positions, self.recent_size))

    @property
    def capacity(self) -> int:
        """C: tokens held between steps."""
        return self.start_size + self.recent_size + self.heavy_size

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"capacity": self.capacity}


# The one list of knobs: streaming_hf's model args, the compare grid's keys and the scripts' flags
# all derive from the dataclass fields (tests/test_knobs.py checks that each one reaches them).
KNOBS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(StreamingSettings))
# Knobs that change results: a run's name is made of these (chunk_size is speed only).
RESULT_KNOBS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(StreamingSettings) if not field.metadata.get(SPEED_ONLY)
)


def _check_policy(policy) -> None:
    """A built-in name or ``package.module:Class`` (loaded, and checked for the interface, by policy.py)."""
    if policy in POLICIES:
        return
    if not (isinstance(policy, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", policy)):
        raise ValueError(f"policy must be one of {', '.join(POLICIES)} or package.module:Class; got {policy!r}")


def default_positions(policy: str) -> str:
    """shifted for sink_window (the StreamingLLM paper), original for scored policies (their papers' code)."""
    return "shifted" if policy == "sink_window" else "original"


def default_method(policy: str, positions: str) -> str:
    """chunked where an exact chunked path serves the policy in this position mode, else the token loop."""
    if policy == "sink_window" or CHUNKED_SCORED.get(policy) == positions:
        return DEFAULT_METHOD
    return "token"


def _check_method(policy: str, method: str, positions: str) -> None:
    if policy == "sink_window" or method == "token":
        return
    if method == "recompute":
        raise ValueError(
            f"method=recompute re-encodes the sink+window tokens: it applies to policy=sink_window only, "
            f"got policy={policy}; use method=token"
        )
    if CHUNKED_SCORED.get(policy) != positions:
        served = ", ".join(f"{p} with positions={m}" for p, m in CHUNKED_SCORED.items()) or "none"
        raise ValueError(
            f"method={method} has no exact path for policy={policy} with positions={positions}; use method=token "
            f"(the chunked path serves sink_window, and {served})"
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
    positions=None,
    method=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    stride=None,
    policy=DEFAULT_POLICY,
    heavy_size=None,
    max_length: int | None = None,
) -> StreamingSettings:
    """Validate user arguments and return settings.

    ``positions`` and ``method`` default by policy (``default_positions``, ``default_method``). With
    ``compression_ratio`` and no ``max_length`` yet, the derived size is left at a placeholder: call
    again with ``max_length`` once the model's context length is known.
    """
    _check_policy(policy)
    start_size = _as_int("start_size", start_size, 0)
    positions = default_positions(policy) if positions is None else positions
    _as_choice("positions", positions, POSITIONS)
    method = default_method(policy, positions) if method is None else method
    _as_choice("method", method, METHODS)
    _check_method(policy, method, positions)
    chunk_size = _as_int("chunk_size", chunk_size, 1)
    # recent_size may not be known yet (compression_ratio): its bound on stride is checked below.
    stride = _check_stride(stride, method, positions, None)
    common = dict(positions=positions, method=method, chunk_size=chunk_size, stride=stride, policy=policy)
    if policy != "sink_window":
        return _resolve_scored(start_size, recent_size, heavy_size, compression_ratio, max_length, common)
    # sink_window: a heavy_size other than 0 is refused by StreamingSettings, with its name.
    common["heavy_size"] = 0 if heavy_size is None else heavy_size
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


def _resolve_scored(start_size, recent_size, heavy_size, compression_ratio, max_length, common) -> StreamingSettings:
    """Scored policies: recent_size defaults to 0; a ratio's budget C goes to heavy_size, H = C - S - W."""
    recent = 0 if recent_size is None else _as_int("recent_size", recent_size, 0)
    if compression_ratio is None:
        return StreamingSettings(start_size, recent, heavy_size=0 if heavy_size is None else heavy_size, **common)
    if heavy_size is not None:
        raise ValueError(
            "give either heavy_size or compression_ratio, not both "
            f"(got heavy_size={heavy_size!r}, compression_ratio={compression_ratio!r})"
        )
    ratio = check_compression_ratio(compression_ratio)
    if max_length is None:
        return StreamingSettings(start_size, recent, heavy_size=0, compression_ratio=ratio, **common)
    max_length = _as_int("max_length", max_length, 1)
    heavy = round((1.0 - ratio) * max_length) - start_size - recent
    if heavy < 0:
        raise ValueError(
            f"compression_ratio={ratio} with max_length={max_length} gives a cache of "
            f"{round((1.0 - ratio) * max_length)} tokens, less than start_size + recent_size = {start_size + recent}"
        )
    return StreamingSettings(start_size, recent, heavy_size=heavy, compression_ratio=ratio, **common)


# What a user gets for a knob not given: resolve()'s defaults (recent_size None: DEFAULT_RECENT_SIZE, or
# derived from compression_ratio; stride None: 1 for recompute). The adapter's and scripts' defaults.
ARG_DEFAULTS: dict = {
    name: parameter.default for name, parameter in inspect.signature(resolve).parameters.items() if name in KNOBS
}
