"""Streaming cache settings and their validation.

Kept free of torch and transformers imports so that bad arguments are rejected
in milliseconds, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re

from . import methods
from .methods.base import HEADS, OBSERVATIONS, SCORED as _SCORED_KIND
from .methods.wrappers import WRAPPER_PARAMS, check_wrappers
from .schedule import CONTEXT, ContextSchedule, Schedule
from .values import as_choice, as_fraction, as_int

POSITIONS = ("shifted", "original")
# Built-in compression methods: the registry's names (streaming_lm/methods/ declares what each one is and takes);
# "package.module:Class" names a user's (docs/policies.md).
POLICIES: tuple[str, ...] = tuple(methods.POLICIES)
DEFAULT_POLICY = "sink_window"
# chunked: exact and fast; token: the reference loop; recompute: a fresh dense pass per window
# (the paper's "sliding window with re-computation" baseline, not a streaming cache).
METHODS = ("chunked", "token", "recompute")
DEFAULT_METHOD = "chunked"
DEFAULT_START_SIZE = 4
DEFAULT_RECENT_SIZE = 1020


SPEED_ONLY = "speed_only"  # field metadata: the knob changes speed, never a number
POLICY_PARAMS = "policy_params"  # field metadata: the policy's own parameters, not a knob
# Model args of streaming_hf that are about the model, not the cache (no settings field): no policy may take them.
_OTHER_ARGS = ("trust_positions",)


def _knob(default, help: str, choices: tuple[str, ...] | None = None, speed_only: bool = False):
    """A settings field with what the tools' flags need: help text, allowed values, whether it is speed only."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, SPEED_ONLY: speed_only})


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
    chunk_size: int | None = _knob(None, "tokens per forward pass of method chunked (speed only, same numbers; "
                                   "default: the policy's default_chunk_size, docs/knobs.md)", speed_only=True)
    stride: int | None = _knob(None, "method recompute: tokens scored per window (default 1)")
    policy: str = _knob(DEFAULT_POLICY, f"eviction policy: {', '.join(POLICIES)}, or package.module:Class")
    heavy_size: int = _knob(0, "slots a scored policy fills by its score (C = start + recent + heavy)")
    evict_every: int | str = _knob(1, "K: the cache is compressed to C after every K tokens read (1: after every "
                                   "token; a layer then holds at most C + K); context: once per request, after its "
                                   "context minus the last query_size tokens (kvpress's regime)")
    query_size: int | None = _knob(None, "evict_every=context: the context's last Q tokens, read after the event with "
                                   "nothing evicted (kvpress's question; default 1)")
    # The policy's own parameters (its class's ``params``), every one resolved; not a knob: each is a model arg
    # of its own, named by the policy (docs/policies.md).
    policy_params: dict = dataclasses.field(default_factory=dict, metadata={"help": None, POLICY_PARAMS: True})

    def __post_init__(self):
        cls = _policy_class(self.policy)
        object.__setattr__(self, "policy_params", check_policy_params(cls, self.policy, self.policy_params))
        scored = cls.kind == _SCORED_KIND
        object.__setattr__(self, "evict_every", _check_evict_every(self.evict_every, self.method))
        object.__setattr__(self, "query_size", _check_query_size(self.query_size, self.evict_every))
        object.__setattr__(self, "start_size", as_int("start_size", self.start_size, 0))
        # Scored policies may keep no recent window (pure TOVA); sink+window needs one, unless a ratio sizes it at
        # each event (evict_every=context).
        object.__setattr__(self, "recent_size", as_int("recent_size", self.recent_size,
                                                       0 if scored or self.ratio_budget else 1))
        object.__setattr__(self, "heavy_size", as_int("heavy_size", self.heavy_size, 0))
        if not scored and self.heavy_size:
            raise ValueError(
                f"heavy_size applies to scored policies ({', '.join(SCORED)}, a plug-in); policy={self.policy} keeps "
                f"sinks and recent tokens only: got heavy_size={self.heavy_size}"
            )
        if self.capacity < 1 and not self.ratio_budget:
            raise ValueError("start_size + recent_size + heavy_size must be >= 1 (a cache of at least one token)")
        as_choice("positions", self.positions, POSITIONS)
        as_choice("method", self.method, METHODS)
        _check_method(cls, self.policy, self.method, self.positions, self.evict_every, self.policy_params)
        object.__setattr__(self, "chunk_size", cls.default_chunk_size if self.chunk_size is None
                           else as_int("chunk_size", self.chunk_size, 1))
        object.__setattr__(self, "stride", _check_stride(self.stride, self.method, self.positions, self.recent_size))
        cls.check_settings(self)
        if cls.kind == _SCORED_KIND and cls.takes_wrappers:
            check_wrappers(self)  # ChunkKV, CriticalKV: every scored method takes them

    @property
    def capacity(self) -> int:
        """C: tokens held between steps."""
        return self.start_size + self.recent_size + self.heavy_size

    @property
    def schedule(self) -> Schedule | ContextSchedule:
        """When the cache is compressed (schedule.py): after every ``evict_every`` tokens, or once per request."""
        return ContextSchedule(self.query_size) if self.context_regime else Schedule(self.evict_every)

    @property
    def keys_attended(self) -> int | None:
        """The most keys one step attends to: ``C + K`` (what a layer kept at the last event plus the segment so far;
        ``C + 1`` with ``evict_every=1``), so shifted positions reach ``C + K - 1``. None under ``evict_every=context``
        (the prefill is read whole, as long as the context) and for a policy some of whose heads keep every token
        (duo's retrieval heads)."""
        if self.context_regime or _policy_class(self.policy).kind == HEADS:
            return None
        return self.capacity + self.schedule.extra_slots()

    @property
    def context_regime(self) -> bool:
        """``evict_every=context`` (kvpress's regime): one event per request, after its context minus its last
        ``query_size`` tokens."""
        return self.evict_every == CONTEXT

    @property
    def ratio_budget(self) -> bool:
        """Whether budgets come from ``compression_ratio`` at each event, kvpress's ``int(n·(1 − r))`` of the ``n``
        tokens a layer holds (evict_every=context), instead of a token budget C."""
        return self.context_regime and self.compression_ratio is not None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"capacity": self.capacity}


# The one list of knobs: streaming_hf's model args, the compare grid's keys and the scripts' flags
# all derive from the dataclass fields (tests/test_knobs.py checks that each one reaches them). The policy's
# own parameters are model args too, named by the policy's class (``policy_params``, ``pop_policy_params``).
KNOBS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(StreamingSettings) if not field.metadata.get(POLICY_PARAMS)
)
# Knobs that change results: a run's name is made of these (chunk_size is speed only).
RESULT_KNOBS: tuple[str, ...] = tuple(
    name for name in KNOBS if not StreamingSettings.__dataclass_fields__[name].metadata.get(SPEED_ONLY)
)
# The registry's answers that messages and defaults need (policy.py declares them on each class).
SCORED: tuple[str, ...] = tuple(name for name, cls in methods.POLICIES.items() if cls.kind == _SCORED_KIND)


def _policy_class(policy) -> type:
    """A built-in name or ``package.module:Class`` (loaded, and checked for the interface, by methods/)."""
    if policy not in POLICIES and not (isinstance(policy, str)
                                       and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", policy)):
        raise ValueError(f"policy must be one of {', '.join(POLICIES)} or package.module:Class; got {policy!r}")
    cls = methods.policy_class(policy)
    check_declarations(cls, policy)
    return cls


def check_declarations(cls, policy: str) -> None:
    """What a method's class declares must name real paths, position modes, observations and knobs (a plug-in's
    too)."""
    for method, modes in cls.paths.items():
        if method not in METHODS or not set(modes) <= set(POSITIONS):
            raise ValueError(f"policy={policy}: paths must map methods {METHODS} to position modes {POSITIONS}; "
                             f"got {method!r}: {modes!r}")
    old = [flag for flag in ("needs_attention", "needs_queries", "needs_step", "accumulate") if hasattr(cls, flag)]
    if old:
        raise ValueError(f"policy={policy}: {', '.join(old)} is no longer read; declare what an event reads as "
                         f"observes = frozenset({{...}}) of {', '.join(OBSERVATIONS)} (docs/policies.md)")
    unknown = set(cls.observes) - set(OBSERVATIONS)
    if unknown:
        raise ValueError(f"policy={policy}: observes names {sorted(unknown)}; an event can observe "
                         f"{', '.join(OBSERVATIONS)}")
    if cls.default_positions not in POSITIONS:
        raise ValueError(f"policy={policy}: default_positions must be one of {', '.join(POSITIONS)}")
    clash = [param.name for param in cls.params if param.name in KNOBS or param.name in _OTHER_ARGS]
    if clash:
        raise ValueError(f"policy={policy}: parameter names {clash} are taken by streaming_hf's own args")


def check_policy_params(cls, policy: str, given) -> dict:
    """Every parameter of the policy, from ``given`` (a mapping, possibly partial) or its default, checked.
    A name the policy does not declare is refused with the list of those it has."""
    given = dict(given or {})
    names = [param.name for param in cls.params]
    unknown = [name for name in given if name not in names]
    if unknown:
        _refuse_wrapper(cls, policy, unknown[0])
        raise ValueError(f"policy={policy} has no parameter {unknown[0]!r}; its parameters: "
                         f"{', '.join(names) if names else 'none'}")
    return {param.name: param.parse(given[param.name]) if param.name in given else param.default
            for param in cls.params}


def _refuse_wrapper(cls, policy: str, name: str) -> None:
    """A wrapper's parameter (ChunkKV, CriticalKV) given to a method it cannot wrap: say why."""
    if name not in {param.name for param in WRAPPER_PARAMS}:
        return
    wrapper = "ChunkKV" if name == "chunk_length" else "CriticalKV"
    if cls.kind != _SCORED_KIND:
        raise ValueError(f"{name} wraps a scored method (kvpress's {wrapper}, docs/methods.md); policy={policy} keeps "
                         f"by token index and has no scores to wrap: use a scored policy ({', '.join(SCORED)})")
    if not cls.takes_wrappers:
        raise ValueError(f"{name} wraps a method that keeps each layer's best tokens (kvpress's {wrapper}, "
                         f"docs/methods.md); policy={policy} ranks the cells of the whole model at once and takes no "
                         f"wrapper (kvpress's {wrapper}Press does not wrap it either)")


def known_policy_params() -> dict[str, list[str]]:
    """Parameter name -> the built-in policies that declare it."""
    known: dict[str, list[str]] = {}
    for name, cls in methods.POLICIES.items():
        for param in cls.params:
            known.setdefault(param.name, []).append(name)
    return known


def pop_policy_params(policy: str, args: dict) -> dict:
    """Take the chosen policy's parameters out of model args ``args``. An arg that is a parameter of another
    policy, or close to one of this policy's (a misspelling), is refused before anything loads, with the
    parameters this policy has; any other arg is left for transformers."""
    cls = _policy_class(policy)
    names = [param.name for param in cls.params]
    own = {name: args.pop(name) for name in names if name in args}
    others = known_policy_params()
    for key in args:
        _refuse_wrapper(cls, policy, key)
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.7)
        if key in others or close:
            hint = f"; did you mean {close[0]!r}?" if close else f" (it is a parameter of {', '.join(others[key])})"
            raise ValueError(f"policy={policy} has no parameter {key!r}{hint}; its parameters: "
                             f"{', '.join(names) if names else 'none'}")
    return own


def policy_param_names(policy: str) -> tuple[str, ...]:
    """The parameters the policy's class declares, in order."""
    return tuple(param.name for param in _policy_class(policy).params)


def is_scored(policy: str) -> bool:
    """Whether the method is not index-only (scored, or per head): budgets by heavy_size."""
    return _policy_class(policy).kind == _SCORED_KIND


def default_positions(policy: str, evict_every=None) -> str:
    """The policy's own (its class's ``default_positions``): shifted for sink_window (the StreamingLLM paper),
    original for scored policies (their papers' code); once after the context (``evict_every=context``) the text's,
    original, whatever the policy (kvpress's)."""
    return "original" if evict_every == CONTEXT else _policy_class(policy).default_positions


def default_method(policy: str, positions: str) -> str:
    """chunked where an exact chunked path serves the policy in this position mode, else the token loop."""
    return _policy_class(policy).default_method(positions)


def _check_method(cls, policy: str, method: str, positions: str, evict_every=1, params=None) -> None:
    if evict_every == CONTEXT:
        _check_context_regime(cls, policy, positions, params or {})
        return
    if method == "recompute" and method not in cls.paths:
        served = [name for name, other in methods.POLICIES.items() if "recompute" in other.paths]
        raise ValueError(
            f"method=recompute re-encodes the sink+window tokens: it applies to policy={', '.join(served)} only, "
            f"got policy={policy}; use method=token"
        )
    if method == "recompute":
        return  # its position rule is _check_stride's
    if positions not in cls.paths.get(method, ()):
        served = ", ".join(f"{name} with positions={' or '.join(other.paths[method])}"
                           for name, other in methods.POLICIES.items() if method in other.paths)
        raise ValueError(
            f"method={method} has no exact path for policy={policy} with positions={positions}; use method=token "
            f"(the {method} path serves {served})"
        )


def _check_context_regime(cls, policy: str, positions: str, params: dict) -> None:
    """evict_every=context: the context path (streams/context.py) reads densely and compresses once, for every policy
    in both methods (chunked: many tokens a pass; token: one). positions=original reads what follows the event at its
    text positions (kvpress's default); positions=shifted re-rotates the kept keys to 0 .. kept - 1 and reads on from
    there (kvpress's KeyRerotationPress), which needs every layer and head to keep as many tokens."""
    if positions == "shifted":
        differ = "its key/value heads keep different counts (a pattern per head)" if cls.kind == HEADS else \
            "head_budgets=adaptive keeps different counts per head" if params.get("head_budgets") == "adaptive" else \
            "layer_budgets=pyramid keeps different counts per layer" if params.get("layer_budgets") == "pyramid" else None
        if differ:
            raise ValueError(f"evict_every=context with positions=shifted re-rotates the kept keys to positions 0 .. "
                             f"kept - 1 (kvpress's KeyRerotationPress), which needs every layer and head to keep as "
                             f"many tokens; policy={policy}: {differ}: use positions=original")
    if "history" in cls.observes:
        raise ValueError(f"policy={policy} accumulates attention over every step it holds a token; evict_every=context "
                         f"scores once, after the context: use evict_every=K (an integer) with this policy")


def _check_evict_every(every, method: str) -> int | str:
    if every != CONTEXT:
        try:
            every = as_int("evict_every", every, 1)
        except ValueError:
            raise ValueError(f"evict_every must be an integer >= 1 or {CONTEXT!r}, got {every!r}") from None
    if every != 1 and method == "recompute":
        raise ValueError(f"evict_every applies to the cache methods (chunked, token); method=recompute keeps no "
                         f"cache, got evict_every={every}")
    return every


def _check_query_size(query_size, evict_every) -> int | None:
    """Q >= 1 under evict_every=context (default 1); no query_size otherwise."""
    if evict_every != CONTEXT:
        if query_size is not None:
            raise ValueError(f"query_size applies to evict_every=context only (the context's last tokens read after "
                             f"its one event); got query_size={query_size!r} with evict_every={evict_every}")
        return None
    return 1 if query_size is None else as_int("query_size", query_size, 1)


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
    stride = as_int("stride", stride, 1)
    # The scored tokens are the window's last ones; more than recent_size would reach into the sinks.
    if recent_size is not None and stride > recent_size:
        raise ValueError(f"stride must be an integer in [1, recent_size={recent_size}], got {stride}")
    return stride


def ratio_capacity(ratio: float, max_length: int) -> int:
    """C = round((1 - r) * L): the cache a compression ratio leaves of the model's ``max_length`` (every K tokens)."""
    return round((1.0 - ratio) * max_length)


def recent_size_from_ratio(ratio: float, start_size: int, max_length: int) -> int:
    """W = round((1 - r) * L) - S; raises when that leaves fewer than one recent token."""
    capacity = ratio_capacity(ratio, max_length)
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
    chunk_size=None,
    stride=None,
    policy=DEFAULT_POLICY,
    heavy_size=None,
    evict_every=1,
    query_size=None,
    policy_params: dict | None = None,
    max_length: int | None = None,
) -> StreamingSettings:
    """Validate user arguments and return settings.

    ``positions`` and ``method`` default by policy (``default_positions``, ``default_method``).
    ``policy_params``: the policy's own parameters given (the rest take their defaults). With
    ``compression_ratio`` and no ``max_length`` yet, the derived size is left at a placeholder: call
    again with ``max_length`` once the model's context length is known.
    """
    cls = _policy_class(policy)
    policy_params = check_policy_params(cls, policy, policy_params)
    start_size = as_int("start_size", start_size, 0)
    context_regime = evict_every == CONTEXT
    # Once after the context, positions are the text's (kvpress's) and the context path serves every policy chunked.
    positions = default_positions(policy, evict_every) if positions is None else positions
    as_choice("positions", positions, POSITIONS)
    method = ("chunked" if context_regime else cls.default_method(positions)) if method is None else method
    as_choice("method", method, METHODS)
    evict_every = _check_evict_every(evict_every, method)
    _check_method(cls, policy, method, positions, evict_every, policy_params)
    chunk_size = None if chunk_size is None else as_int("chunk_size", chunk_size, 1)  # None: the policy's default
    # recent_size may not be known yet (compression_ratio): its bound on stride is checked below.
    stride = _check_stride(stride, method, positions, None)
    common = dict(positions=positions, method=method, chunk_size=chunk_size, stride=stride, policy=policy,
                  evict_every=evict_every, query_size=query_size, policy_params=policy_params)
    if cls.kind == _SCORED_KIND:
        return _resolve_scored(start_size, recent_size, heavy_size, compression_ratio, max_length, common)
    # index-only: a heavy_size other than 0 is refused by StreamingSettings, with its name.
    common["heavy_size"] = 0 if heavy_size is None else heavy_size
    if compression_ratio is None:
        recent = DEFAULT_RECENT_SIZE if recent_size is None else recent_size
        return StreamingSettings(start_size, recent, **common)
    if recent_size is not None:
        raise ValueError(
            "give either recent_size or compression_ratio, not both "
            f"(got recent_size={recent_size!r}, compression_ratio={compression_ratio!r})"
        )
    ratio = as_fraction("compression_ratio", compression_ratio, upper_open=True)
    if context_regime:  # the ratio sizes each event (kvpress's int(n·(1 − r))); the recent window is what the sinks leave
        return StreamingSettings(start_size, 0, compression_ratio=ratio, **common)
    if max_length is None:
        # Placeholder recent_size (the smallest a stride allows) until max_length is known.
        return StreamingSettings(start_size, stride or 1, compression_ratio=ratio, **common)
    max_length = as_int("max_length", max_length, 1)
    recent = recent_size_from_ratio(ratio, start_size, max_length)
    return StreamingSettings(start_size, recent, compression_ratio=ratio, **common)


def _resolve_scored(start_size, recent_size, heavy_size, compression_ratio, max_length, common) -> StreamingSettings:
    """Scored policies: recent_size defaults to 0; a ratio's budget C goes to heavy_size, H = C - S - W."""
    recent = 0 if recent_size is None else as_int("recent_size", recent_size, 0)
    if compression_ratio is None:
        return StreamingSettings(start_size, recent, heavy_size=0 if heavy_size is None else heavy_size, **common)
    if heavy_size is not None:
        raise ValueError(
            "give either heavy_size or compression_ratio, not both "
            f"(got heavy_size={heavy_size!r}, compression_ratio={compression_ratio!r})"
        )
    ratio = as_fraction("compression_ratio", compression_ratio, upper_open=True)
    if max_length is None or common["evict_every"] == CONTEXT:  # once: the ratio sizes each event (kvpress's)
        return StreamingSettings(start_size, recent, heavy_size=0, compression_ratio=ratio, **common)
    max_length = as_int("max_length", max_length, 1)
    heavy = ratio_capacity(ratio, max_length) - start_size - recent
    if heavy < 0:
        raise ValueError(
            f"compression_ratio={ratio} with max_length={max_length} gives a cache of "
            f"{ratio_capacity(ratio, max_length)} tokens, less than start_size + recent_size = {start_size + recent}"
        )
    return StreamingSettings(start_size, recent, heavy_size=heavy, compression_ratio=ratio, **common)


# What a user gets for a knob not given: resolve()'s defaults (recent_size None: DEFAULT_RECENT_SIZE, or
# derived from compression_ratio; stride None: 1 for recompute). The adapter's and scripts' defaults.
ARG_DEFAULTS: dict = {
    name: parameter.default for name, parameter in inspect.signature(resolve).parameters.items() if name in KNOBS
}
