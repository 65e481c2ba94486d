"""Eviction policies: which tokens a cache holds. The one place that decides what is visible, and the one
registry of policies (``POLICIES``): what each one is and which parameters it takes.

Three kinds (docs/policies.md, docs/methods.md):

- **index-only** (``SinkWindow``): the held set is known from token indices alone;
- **index-only per head** (``Duo``): each key/value head holds its own set, known from token indices and the
  head's pattern (``holds_by_head``);
- **scored** (``ScoredPolicy``: TOVA, H2O, key-norm, user plug-ins): at an event the protected tokens
  (the first ``S``, the last ``W``) stay and, while the cache holds more than ``C``, the held token with
  the lowest score goes (ties: the older). A scored policy only says how to score held tokens; the
  storage (storage/scored.py) applies the rule.

Every policy class says what it is, on the class: ``name``, ``params`` (its own parameters, each a model
arg: ``Param``), ``index_only``, ``paths`` (the methods, and their position modes, that serve it exactly) and
``default_positions``. settings.py reads these before any model loads, so this module imports no torch at
import time: the few methods that build tensors import it when they run.

Events (docs/semantics.md "Events"; ``schedule.py``): a cache is compressed after every ``evict_every``
tokens. An index-only policy answers one question, ``compressed(n)``: the token indices a layer keeps when an
event falls after ``n`` tokens read (at most ``capacity``). Everything else follows from it and is derived
here, once:

- ``held(n)``: what a layer holds after reading ``n`` tokens: ``compressed(e)`` of the last event ``e <= n``,
  plus the tokens ``e .. n-1`` read since (with ``evict_every=1``, ``compressed(n)`` itself);
- step ``t`` attends to ``held(t) ∪ {t}`` (``visible_mask``, for the chunked path's mask);
- after step ``t`` the cache keeps ``held(t + 1)`` (the dynamic storage's trim, the static storage's
  free slots: ``evicted_after``);
- ``method=recompute`` re-encodes ``held(end + 1)`` as the window that ends at ``end``.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .values import as_bool, as_choice, as_float, as_int

if TYPE_CHECKING:
    import torch

# Literal here (settings.py imports this module): settings.check_declarations holds them to settings.POSITIONS.
BOTH = ("shifted", "original")


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a policy, declared on its class (``params``): a model arg of its own
    (``policy=<name>,<param>=<value>``), checked before any model loads, written in the results file under
    ``config.streaming.policy_params`` and usable as a grid axis of ``compare`` (``--param``).

    ``kind`` is ``int``, ``float``, ``bool`` or ``str``; ``minimum`` bounds a number, ``choices`` lists a
    string's values; ``check`` (optional) raises ``ValueError`` for anything else it refuses.
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], None] | None = None

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


Runs = list[tuple[int, int]]  # ascending, disjoint half-open ranges [a, b) of token indices


class Policy:
    """What every policy declares on its class (settings.py reads it; see the module docstring)."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    index_only: ClassVar[bool]
    # An index-only policy whose key/value heads hold different tokens (DuoAttention): evict_every=K runs it on the
    # scored storage's padded layout (storage/scored.py), one event rule per head (``event_keep``).
    holds_by_head: ClassVar[bool] = False
    # method -> the position modes in which that path serves the policy exactly
    paths: ClassVar[dict[str, tuple[str, ...]]]
    default_positions: ClassVar[str]

    def __init__(self, settings):  # a settings.StreamingSettings (settings.py imports this module)
        self.settings = settings
        self.capacity = settings.capacity
        self.schedule = settings.schedule
        for param in self.params:  # resolved by settings: every parameter is there, checked
            setattr(self, param.name, settings.policy_params[param.name])

    @classmethod
    def check_settings(cls, settings) -> None:
        """Refuse settings the policy cannot serve (a ``ValueError`` naming the knobs), before any model loads:
        settings.py calls it once every knob is checked. Nothing by default."""

    def bind(self, model, shift) -> None:
        """The model a stream reads with, and its rotary (``rotary.find_rotary``), for a policy that needs more than
        the cache (Expected Attention's RoPE frequencies, DuoAttention's pattern shape). Nothing by default."""

    def budget(self, n: int) -> int:
        """Tokens a layer keeps (per head on average) at an event with ``n`` tokens held: ``C``, or under
        ``evict_every=context`` with ``compression_ratio`` r kvpress's ``int(n·(1 − r))`` (at least 1)."""
        if self.settings.ratio_budget:
            from .compression.budgets import kept_count

            return kept_count(n, self.settings.compression_ratio)
        return self.capacity

    def keep_once(self, layer: int, layers: int, keys, values, queries, scale: float) -> torch.Tensor:
        """``evict_every=context``: bool [kv_heads, n], the held tokens layer ``layer`` (of ``layers``) keeps at the
        request's one event. ``keys``/``values`` [kv_heads, n, head_dim] as held (every prefill token, in text order);
        ``queries`` float32 [query_heads, s, head_dim]: the prefill's last ``s`` queries (``query_window``), or None;
        ``scale`` the attention's. Index-only policies implement it (storage/context.py calls it); a scored policy
        only scores, and storage/context.py's ``scored_keep`` applies the rule, as storage/scored.py does for
        ``evict_every=K``."""
        raise NotImplementedError

    @classmethod
    def default_method(cls, positions: str) -> str:
        """chunked where an exact chunked path serves the policy in this position mode, else the token loop."""
        return "chunked" if positions in cls.paths.get("chunked", ()) else "token"


class EvictionPolicy(Policy, ABC):
    """What a cache of ``capacity`` tokens keeps, from token indices alone; implement ``compressed``."""

    index_only = True
    paths = {"token": BOTH, "chunked": BOTH, "recompute": ("shifted",)}
    default_positions = "shifted"

    @abstractmethod
    def compressed(self, n: int) -> Runs:
        """Token indices kept when an event falls after reading tokens ``0 .. n-1``: at most ``capacity`` of
        them, ascending, and among those held before the event (an evicted token never comes back)."""

    def held(self, n: int) -> Runs:
        """Token indices held after reading tokens ``0 .. n-1``: the last event's ``compressed`` set, then every
        token read since (runs merged where they touch)."""
        event = self.schedule.last_event(n)
        runs = self.compressed(event)
        if event == n:
            return runs
        if runs and runs[-1][1] == event:
            return [*runs[:-1], (runs[-1][0], n)]
        return [*runs, (event, n)]

    def held_count(self, n: int) -> int:
        """How many tokens ``held(n)`` holds."""
        return sum(b - a for a, b in self.held(n))

    def evicted_count(self, n: int) -> int:
        """Tokens evicted after reading ``n`` tokens: each token read is either held or was evicted once."""
        return n - self.held_count(n)

    def held_index(self, n: int) -> torch.Tensor:
        """``held(n)`` as a tensor of token indices."""
        import torch

        return torch.cat([torch.arange(a, b) for a, b in self.held(n)])

    def evicted_after(self, t: int) -> list[int]:
        """Tokens dropped after step ``t``: those of ``held(t) ∪ {t}`` not in ``held(t + 1)``."""
        dropped = []
        for a, b in [*self.held(t), (t, t + 1)]:
            for c, d in self.held(t + 1):  # cut every kept run out of [a, b), run by run
                if c > a:
                    dropped.extend(range(a, min(b, c)))
                a = max(a, d)
                if a >= b:
                    break
            dropped.extend(range(a, b))
        return dropped

    def visible_mask(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """bool [Q, K]: query token ``t`` sees key token ``j`` iff ``j ∈ held(t) ∪ {t}``."""
        import torch

        runs = [self.held(int(t)) for t in queries]
        width = max(len(r) for r in runs)
        lo = torch.tensor([[a for a, _ in r] + [0] * (width - len(r)) for r in runs])
        hi = torch.tensor([[b for _, b in r] + [0] * (width - len(r)) for r in runs])
        k = keys[None, :, None]
        inside = ((k >= lo[:, None, :]) & (k < hi[:, None, :])).any(-1)
        return inside | (keys[None, :] == queries[:, None])


class SinkWindow(EvictionPolicy):
    """StreamingLLM: the first ``start_size`` tokens (attention sinks) and the last ``recent_size`` ones.

    Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024,
    https://arxiv.org/abs/2309.17453
    """

    name = "sink_window"

    def compressed(self, n: int) -> Runs:
        sinks = min(self.settings.start_size, n)
        return [(0, sinks), (min(max(self.settings.start_size, n - self.settings.recent_size), n), n)]

    def keep_once(self, layer, layers, keys, values, queries, scale):
        """The first ``start_size`` and the last ``B - start_size`` of the ``n`` held, ``B`` the budget (kvpress's
        ``StreamingLLMPress`` with ``n_sink = start_size``)."""
        import torch

        n = keys.shape[1]
        budget = min(n, self.budget(n))
        sinks = min(self.settings.start_size, budget)
        index = torch.arange(n, device=keys.device)
        return ((index < sinks) | (index >= n - (budget - sinks))).expand(keys.shape[0], -1)


class ScoredPolicy(Policy):
    """Evicts by a score; implement ``score`` (the shape of kvpress's ``ScorerPress.score``).

    Class attributes: ``needs_attention`` (``score`` reads this step's attention weights: the token loop
    then computes them in its own attention function), ``needs_queries`` (``score`` also takes ``queries``,
    the observation of the event: the segment's queries since the last event, as the attention saw them),
    ``needs_step`` (``score`` also takes ``step``, the stream index of this step's token: the segment's queries are
    those of tokens ``step - s + 1 .. step``),
    ``accumulate`` (a held token's score is the sum of its scores over every step since it was read, as
    H2O's). Whether heads decide alone follows from the shape ``score`` returns.
    """

    name = "scored"
    index_only = False
    paths = {"token": BOTH}  # a plug-in runs on the token loop
    default_positions = "original"  # the policies' own papers and code
    needs_attention = True
    needs_queries = False
    needs_step = False
    accumulate = False
    # Whether check_settings proves that an event can always reach the budget (what it never evicts fits in C): the
    # built-ins' checks do; a plug-in's infinite scores are checked at every event (storage/scored.compress).
    reaches_budget = False
    # evict_every=context: the last token of the prefill always stays (kvpress's TOVAPress)
    keeps_last_once = False

    @property
    def query_window(self) -> int | None:
        """evict_every=context: how many of the prefill's last queries the event reads (None: all of them)."""
        return None if self.needs_queries else 1 if self.needs_attention else 0

    @property
    def adaptive_heads(self) -> bool:
        """Whether the heads of a layer keep different counts (``head_budgets=adaptive``: AdaKV)."""
        return getattr(self, "head_budgets", "uniform") == "adaptive"

    def layer_capacity(self, layer: int, layers: int, n: int) -> int:
        """Tokens layer ``layer`` (of ``layers``) keeps at an event after ``n`` tokens read: ``budget(n)`` at every
        layer unless the policy's budgets differ by layer (``layer_budgets=pyramid``)."""
        return self.budget(n)

    def score(self, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """Scores of the held tokens of one layer (low goes first): [kv_heads, K] (each key/value head evicts on its
        own), or [K] (the whole layer evicts one token).

        ``keys``/``values``: [kv_heads, K, head_dim] as held (this step's token last); ``attention``: float32
        [query_heads, K], this step's softmax weights (None unless ``needs_attention``). Query head ``q``
        reads key/value head ``q // (query_heads // kv_heads)``. With ``needs_queries`` it is called as
        ``score(keys, values, attention, queries=...)``, ``queries`` float32 [query_heads, s, head_dim]: the
        queries of the ``s`` steps since the last event, this one last (the whole segment at an event).
        """
        raise NotImplementedError


class TOVA(ScoredPolicy):
    """TOVA: keep the tokens this step's query attends to most, averaged over the layer's heads.

    Oren et al., *Transformers are Multi-State RNNs*, 2024, https://arxiv.org/abs/2401.06104
    """

    name = "tova"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    keeps_last_once = True

    def score(self, keys, values, attention):
        return attention.mean(0)


class H2O(ScoredPolicy):
    """H2O: keep the heavy hitters, the tokens with the most attention accumulated while held.

    Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
    NeurIPS 2023, https://arxiv.org/abs/2306.14048
    """

    name = "h2o"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    accumulate = True

    def score(self, keys, values, attention):
        group = attention.shape[0] // keys.shape[0]
        return attention.reshape(keys.shape[0], group, -1).sum(1)


class KeyNorm(ScoredPolicy):
    """Key-norm: keep the keys of lowest L2 norm (score ``-||k_j||``).

    Devoto et al., *A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression*, EMNLP 2024,
    https://arxiv.org/abs/2406.11430
    """

    name = "knorm"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    needs_attention = False

    def score(self, keys, values, attention):
        return -keys.float().norm(dim=-1)


def _odd(value: int) -> None:
    if value % 2 == 0:
        raise ValueError(f"kernel_size must be odd (1, 3, 5, ...): the pooling keeps one score per key only then; "
                         f"got {value}")


# Budgets across layers, declared by the policies they apply to (those with an observation window): model args
# like the policy's own parameters, written with them in config.streaming.policy_params.
LAYER_BUDGETS = (
    Param("layer_budgets", str, "uniform", "uniform: every layer keeps C; pyramid: PyramidKV's arithmetic pyramid "
          "of per-layer budgets averaging C (the first layers keep the most)", choices=("uniform", "pyramid")),
    Param("beta", float, 20.0, "layer_budgets=pyramid: the pyramid's steepness (its smallest layer budget is "
          "C / beta)", minimum=1.0),
)


def _fraction(value: float, name: str = "alpha_safeguard") -> None:
    if value > 1:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value}")


# Budgets across the key/value heads of a layer, declared by the per-head policies they apply to (a policy deciding
# per layer, as TOVA, does not declare them: its heads hold the same tokens).
HEAD_BUDGETS = (
    Param("head_budgets", str, "uniform", "uniform: every key/value head keeps C; adaptive: AdaKV, the heads of a "
          "layer keep C on average, the layer's lowest (head, token) scores going first", choices=("uniform",
                                                                                                    "adaptive")),
    Param("alpha_safeguard", float, 0.2, "head_budgets=adaptive: each head's int(C * alpha) best tokens are safe",
          minimum=0.0, check=_fraction),
)


def check_head_budgets(settings) -> None:
    """``head_budgets=adaptive``: heads hold different counts in a padded layout that the attention functions mask;
    original positions only (a shifted query's position, the count of tokens held, would differ by head)."""
    if settings.policy_params["head_budgets"] != "adaptive" or settings.once:  # once: original, any method
        return
    if settings.positions == "shifted":
        raise ValueError("head_budgets=adaptive needs positions=original (heads hold different counts, so a shifted "
                         "position would differ by head); got positions=shifted")


def check_layer_budgets(settings, window: int) -> None:
    """``layer_budgets=pyramid`` must be able to split ``C``: its smallest layer budget ``C / beta`` reaches the
    window (else PyramidKV's rule falls back to uniform budgets at every event, a pyramid that never is); that it
    holds the tokens an event never evicts is ``SnapKV.check_kept_always``."""
    params = settings.policy_params
    if params["layer_budgets"] != "pyramid" or settings.ratio_budget:  # a ratio: kvpress's own rule at each event
        return
    if settings.positions == "shifted":
        raise ValueError("layer_budgets=pyramid needs positions=original: with shifted positions a query's position "
                         "is the count of tokens held, which then differs by layer")
    low = settings.capacity / params["beta"]
    if low < window:
        raise ValueError(
            f"layer_budgets=pyramid cannot split C={settings.capacity} tokens: its smallest layer budget C / beta = "
            f"{low:g} (beta={params['beta']:g}) is below window_size={window}; it needs C >= beta * window_size = "
            f"{params['beta'] * window:g} (raise heavy_size, lower beta or window_size)"
        )


class SnapKV(ScoredPolicy):
    """SnapKV: at an event the segment's last ``window_size`` queries (the observation window) vote for the held
    keys; the votes are pooled over neighbouring keys (``kernel_size``) and the window's own keys always stay
    (compression/snapkv.py, docs/methods.md). The segment must be longer than the window: ``evict_every >
    window_size``. With ``layer_budgets=pyramid`` this is PyramidKV.

    Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*, 2024,
    https://arxiv.org/abs/2404.14469
    """

    name = "snapkv"
    reaches_budget = True
    params = (Param("window_size", int, 64, "the observation window: the segment's last queries that score",
                    minimum=1),
              Param("kernel_size", int, 5, "average pooling of the scores over neighbouring keys (odd)", minimum=1,
                    check=_odd),
              *LAYER_BUDGETS, *HEAD_BUDGETS)
    paths = {"token": BOTH, "chunked": ("original",)}
    needs_attention = False
    needs_queries = True

    @classmethod
    def check_settings(cls, settings) -> None:
        window = settings.policy_params["window_size"]
        if not settings.once and settings.evict_every <= window:  # once: checked against each request's prefill
            raise ValueError(
                f"policy=snapkv observes the last window_size={window} queries of each segment of evict_every="
                f"{settings.evict_every} tokens: the window must be shorter than the segment (evict_every > "
                f"window_size; lower window_size or raise evict_every)"
            )
        check_layer_budgets(settings, window)
        check_head_budgets(settings)
        cls.check_kept_always(settings, window)

    @staticmethod
    def check_kept_always(settings, window: int) -> None:
        """An event never evicts the sinks, the recent window or SnapKV's observation window (the last
        ``window_size`` tokens): a token budget must hold them in every layer (else an event could not reach it)."""
        if settings.ratio_budget:
            return
        params = settings.policy_params
        always = settings.start_size + max(settings.recent_size, window)
        smallest = settings.capacity
        where = f"C = {smallest}"
        if params["layer_budgets"] == "pyramid":
            smallest = settings.capacity / params["beta"]
            where = f"its smallest layer budget C / beta = {smallest:g} (layer_budgets=pyramid, beta={params['beta']:g})"
        if always > smallest:
            raise ValueError(
                f"policy=snapkv keeps start_size + max(recent_size, window_size) = {always} tokens at every event (the "
                f"sinks, then the recent or observation window, whichever is longer), more than {where}: raise "
                f"heavy_size, or lower start_size, recent_size, window_size or beta")

    def layer_capacity(self, layer, layers, n):
        if self.layer_budgets == "uniform":
            return self.budget(n)
        from .compression.budgets import pyramid_layer_budgets

        mean = {"ratio": self.settings.compression_ratio} if self.settings.ratio_budget else {"budget": self.capacity}
        return pyramid_layer_budgets(n, layers, window_size=self.window_size, beta=self.beta, **mean)[layer]

    @property
    def query_window(self):
        return self.window_size

    def score(self, keys, values, attention, queries):
        from .compression.snapkv import snapkv_scores

        if keys.shape[1] <= self.window_size:
            raise ValueError(f"policy=snapkv: an event holds {keys.shape[1]} tokens, not more than window_size="
                             f"{self.window_size}: the observation window must be shorter than what it scores "
                             f"(lower window_size or give a longer context)")
        return snapkv_scores(queries[:, -self.window_size:], keys, self.kernel_size)


class ExpectedAttention(ScoredPolicy):
    """Expected Attention: at an event, the attention that future queries are expected to pay each held key, from
    the mean and covariance of the segment's queries before RoPE, rotated on average over the next
    ``n_future_positions`` positions, times the value's norm (compression/expected_attention.py, docs/methods.md).
    The first ``n_sink`` tokens are kept. Original positions (the segment's queries are un-rotated from their text
    positions; kvpress keeps positions too).

    Devoto et al., *Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution*, 2025, https://arxiv.org/abs/2510.00636
    """

    name = "expected_attention"
    reaches_budget = True
    params = (Param("n_future_positions", int, 512, "future positions the query statistics are rotated over",
                    minimum=1),
              Param("n_sink", int, 4, "first tokens kept and left out of the query statistics", minimum=0),
              Param("use_covariance", bool, True, "add the queries' covariance term"),
              Param("use_vnorm", bool, True, "multiply by the value's norm"),
              Param("epsilon", float, 0.0, "added to the score before the value norm", minimum=0.0),
              *HEAD_BUDGETS)
    paths = {"token": ("original",), "chunked": ("original",)}
    needs_attention = False
    needs_queries = True
    needs_step = True

    @classmethod
    def check_settings(cls, settings) -> None:
        sinks = settings.policy_params["n_sink"]
        always = max(sinks, settings.start_size) + settings.recent_size
        if settings.capacity < always and not settings.ratio_budget:
            raise ValueError(f"policy=expected_attention keeps its n_sink={sinks} first tokens (and start_size="
                             f"{settings.start_size}, recent_size={settings.recent_size}): the budget C = start_size + "
                             f"recent_size + heavy_size = {settings.capacity} must hold max(n_sink, start_size) + "
                             f"recent_size = {always}")
        check_head_budgets(settings)

    def bind(self, model, shift) -> None:
        from .rotary import RotaryShift

        if not isinstance(shift, RotaryShift):
            raise ValueError(f"policy=expected_attention needs one rotary embedding for every layer (RoPE); "
                             f"{type(model).__name__} has {'none' if shift is None else 'different ones by layer'}")
        scaling = {float(getattr(m, "attention_scaling")) for m in model.modules() if hasattr(m, "attention_scaling")}
        self.rotary, self.attention_scaling = shift, scaling.pop() if len(scaling) == 1 else 1.0
        if scaling:
            raise ValueError("policy=expected_attention: the model's rotary modules scale differently")

    def before_rope(self, queries, index):
        """The segment's queries before RoPE: each rotated back from its text position ``index`` and its rotary
        scaling undone (float32 [query_heads, s, head_dim])."""
        return self.rotary.rotate(queries, -index) / self.attention_scaling

    def score(self, keys, values, attention, queries, step):
        import torch

        from .compression.expected_attention import expected_attention_scores, mean_rotation

        index = torch.arange(step - queries.shape[1] + 1, step + 1, device=queries.device)
        before = self.before_rope(queries, index)
        rotation = mean_rotation(self.rotary.inv_freq.float(), step + 1, self.n_future_positions, keys.shape[-1],
                                 self.rotary.layout, self.attention_scaling)
        return expected_attention_scores(before, index, keys, values, rotation, n_sink=self.n_sink,
                                         use_covariance=self.use_covariance, use_vnorm=self.use_vnorm,
                                         epsilon=self.epsilon)


def _duo_pattern(value: str) -> None:
    if value:  # the folder's format, before any model loads (its shape is checked against the model in bind)
        from .compression.duo import load_duo_pattern

        load_duo_pattern(value)


class Duo(Policy):
    """DuoAttention: the ``round(h · layers · heads)`` key/value heads of lowest pattern score are *streaming
    heads*, holding the first ``sink_size`` and the last ``recent_size`` tokens (the pattern's); every other head
    holds everything (compression/duo.py, docs/methods.md). Sizes come from the pattern, not from ``C``.

    Xiao et al., *DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads*, 2024,
    https://arxiv.org/abs/2410.10819
    """

    name = "duo"
    holds_by_head = True
    # What the scored storage asks of a policy (storage/scored.py): duo reads neither attention nor queries.
    needs_attention = needs_queries = needs_step = accumulate = adaptive_heads = False
    params = (Param("pattern", str, "", "a folder in DuoAttention's format (config.json with sink_size and "
                    "recent_size; full_attention_heads.tsv, one row per layer, one column per key/value head)",
                    check=_duo_pattern),
              Param("head_compression_ratio", float, 0.5, "the fraction of (layer, key/value head) pairs that stream",
                    minimum=0.0, check=lambda value: _fraction(value, "head_compression_ratio")))
    index_only = True
    paths = {"token": ("original",), "chunked": ("original",)}
    default_positions = "original"

    @classmethod
    def check_settings(cls, settings) -> None:
        from .compression.duo import FORMAT

        if not settings.policy_params["pattern"]:
            raise ValueError(f"policy=duo needs pattern=<folder>: {FORMAT}. No pattern ships with a model no one "
                             f"measured; DuoAttention publishes patterns for the models it trained")
        if settings.compression_ratio is not None:
            raise ValueError("policy=duo sizes its heads by the pattern and head_compression_ratio; compression_ratio "
                             f"does not apply (got compression_ratio={settings.compression_ratio})")

    def bind(self, model, shift) -> None:
        from .compression.duo import load_duo_pattern, streaming_heads
        from .forward_args import num_decoder_layers

        config = model.config.get_text_config(decoder=True)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        pattern = load_duo_pattern(self.pattern, num_decoder_layers(model), kv_heads)
        self.sink_size, self.recent_size = pattern.sink_size, pattern.recent_size
        self.streaming = streaming_heads(pattern.head_scores, self.head_compression_ratio)

    def keep_once(self, layer, layers, keys, values, queries, scale):
        from .compression.duo import duo_keep

        return duo_keep(keys.shape[1], self.streaming[layer], self.sink_size, self.recent_size).to(keys.device)

    def event_keep(self, layer: int, alive: torch.Tensor) -> torch.Tensor:
        """evict_every=K: bool [kv_heads, K], what layer ``layer``'s heads keep at an event of the held columns
        ``alive`` marks (each head's in token order): a streaming head its first ``sink_size`` and last
        ``recent_size``, a retrieval head everything."""
        from .compression.duo import duo_held_keep

        return duo_held_keep(alive, self.streaming[layer], self.sink_size, self.recent_size)



POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (SinkWindow, TOVA, H2O, KeyNorm, SnapKV,
                                                               ExpectedAttention, Duo)}


def policy_class(name: str) -> type[Policy]:
    """The class a ``policy`` knob names: a built-in, or ``package.module:Class`` (a ``ScoredPolicy``).

    Called before any model loads, so a bad plug-in fails first."""
    if name in POLICIES:
        return POLICIES[name]
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"policy={name}: cannot import module {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"policy={name}: module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, ScoredPolicy)) or cls.score is ScoredPolicy.score:
        raise ValueError(
            f"policy={name}: {class_name} must subclass streaming_lm.policy.ScoredPolicy and implement "
            "score(keys, values, attention) (see docs/policies.md)"
        )
    return cls


def policy_for(settings) -> Policy:
    """The policy the settings name, with its parameters."""
    return policy_class(settings.policy)(settings)
