"""What every compression method declares, and the three kinds of method (docs/policies.md, docs/methods.md).

A method is one class in one module of this package: its name, its parameters (``Param``: model args checked before
any model loads), the paths that serve it exactly, what its events read (``observes``) and its math. The kinds:

- ``EvictionPolicy`` (``kind = "index"``): the held set follows from token indices alone (sink+window);
- ``HeadIndexPolicy`` (``kind = "heads"``): each key/value head holds its own set, from token indices and the head's
  pattern (DuoAttention);
- ``ScoredPolicy`` (``kind = "scored"``): at an event the protected tokens (the first ``S``, the last ``W``) stay and,
  while a head holds more than its budget, the held token of lowest score goes (ties: the older). The method only
  scores; ``methods/event.py`` applies the rule, the same for every path.

The registry (``methods/__init__.py``) is read by settings.py before any model loads, so no module of this package
imports torch at import time (``lazy_torch``).
"""

from __future__ import annotations

from typing import ClassVar

from .budgets import kept_count
from .lazy_torch import torch
from .params import Param
from .wrappers import WRAPPER_PARAMS


# The position modes (settings.check_declarations holds them to settings.POSITIONS).
BOTH = ("shifted", "original")
INDEX, HEADS, SCORED = "index", "heads", "scored"
# What an event of a scored method can read besides the held keys and values (``ScoredPolicy.observes``).
OBSERVATIONS = {
    "attention": "the step's softmax weights over the held keys, float32 [query_heads, K]",
    "queries": "the segment's queries since the last event (after RoPE), float32 [query_heads, s, head_dim]",
    "step": "the stream index of the event's token",
    "history": "a token's score is the sum of its scores over every step it has been held (H2O)",
    "scale": "the layer's attention scaling, the model's own (Gemma's query_pre_attn_scalar, Granite's multiplier)",
    "prerope_keys": "the held keys before RoPE as the model's key projection wrote them while the prefill was read "
                    "(float [kv_heads, K, head_dim]; None where the model fuses it: rotate back), the context regime",
    "layer": "the event's layer index (a method with parameters per layer: Q-Filter's filters)",
    "replay": "the scores of a replay pass the engine reads after the prefill (``replay_passes``, ``replay_scores``; "
              "the hidden states' norms where ``replay_reads_hidden_norms``) and drops; the budget is the whole "
              "model's (``model_keep``): KVzip",
}


Runs = list[tuple[int, int]]  # ascending, disjoint half-open ranges [a, b) of token indices


def check_context_regime(cls, settings, reason: str) -> None:
    """A method defined on the whole prefill (``reason``: why, as a clause after its name), not on a segment: refused
    unless ``evict_every=context`` (its ``check_settings`` calls this)."""
    if not settings.context_regime:
        raise ValueError(f"policy={cls.name} {reason} and is defined once after the context (kvpress: prefill only), "
                         f"not on a segment every K tokens: use evict_every=context (got "
                         f"evict_every={settings.evict_every})")


class Policy:
    """What every method declares on its class (settings.py reads it before any model loads)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    # method -> the position modes in which that path serves the method exactly
    paths: ClassVar[dict[str, tuple[str, ...]]]
    default_positions: ClassVar[str]
    observes: ClassVar[frozenset[str]] = frozenset()  # of OBSERVATIONS: what an event reads (scored methods)
    needs_tokenizer: ClassVar[bool] = False  # bind_tokenizer is called with the model's tokenizer (KVzip's prompt)
    # chunk_size's default (speed only): a scored path decides a chunk's rows one by one, so longer chunks cost it more
    # at evict_every=1 (scripts/bench_eval.py, SmolLM2, CPU: key-norm and TOVA 15-20 % slower at 256 than at 128)
    default_chunk_size: ClassVar[int] = 128

    def __init__(self, settings):  # a settings.StreamingSettings (settings.py imports this package)
        self.settings = settings
        self.capacity = settings.capacity
        self.schedule = settings.schedule
        for param in self.params:  # resolved by settings: every parameter is there, checked
            setattr(self, param.name, settings.policy_params[param.name])

    @classmethod
    def check_settings(cls, settings) -> None:
        """Refuse settings the method cannot serve (a ``ValueError`` naming the knobs), before any model loads:
        settings.py calls it once every knob is checked. Nothing by default."""

    def bind(self, model, shift) -> None:
        """The model a stream reads with, and its rotary (``rotary.find_rotary``), for a method that needs more than
        the cache (Expected Attention's RoPE frequencies, DuoAttention's pattern shape). Called once per model and
        settings (``engine.Engine``). Nothing by default."""

    def bind_tokenizer(self, tokenizer) -> None:
        """The model's tokenizer, for a method that ``needs_tokenizer`` (a prompt of its own). Nothing by default."""

    @property
    def heads_differ(self) -> bool:
        """Whether the key/value heads of a layer may hold different tokens (the storage pads and masks them)."""
        return False

    def budget(self, n: int) -> int:
        """Tokens a layer keeps (per head on average) at an event with ``n`` tokens held: ``C``, or under
        ``evict_every=context`` with ``compression_ratio`` r kvpress's ``int(n·(1 − r))`` (at least 1)."""
        if self.settings.ratio_budget:
            return kept_count(n, self.settings.compression_ratio)
        return self.capacity

    def layer_capacity(self, layer: int, layers: int, n: int) -> int:
        """Tokens layer ``layer`` (of ``layers``) keeps at an event after ``n`` tokens read: ``budget(n)`` at every
        layer unless the method's budgets differ by layer (``layer_budgets=pyramid``)."""
        return self.budget(n)

    @classmethod
    def default_method(cls, positions: str) -> str:
        """chunked where an exact chunked path serves the method in this position mode, else the token loop."""
        return "chunked" if positions in cls.paths.get("chunked", ()) else "token"


class EvictionPolicy(Policy):
    """What a cache of ``capacity`` tokens keeps, from token indices alone; implement ``compressed``.

    Events (docs/semantics.md "Events"; ``schedule.py``): an index-only method answers one question,
    ``compressed(n)``: the token indices a layer keeps when an event falls after ``n`` tokens read (at most
    ``capacity``). Everything else follows from it and is derived here, once:

    - ``held(n)``: what a layer holds after reading ``n`` tokens: ``compressed(e)`` of the last event ``e <= n``,
      plus the tokens ``e .. n-1`` read since (with ``evict_every=1``, ``compressed(n)`` itself);
    - step ``t`` attends to ``held(t) ∪ {t}`` (``visible_mask``, for the chunked path's mask);
    - after step ``t`` the cache keeps ``held(t + 1)`` (the dynamic storage's trim, the static storage's
      free slots: ``evicted_after``);
    - ``method=recompute`` re-encodes ``held(end + 1)`` as the window that ends at ``end``;
    - ``evict_every=context``: ``event_keep`` keeps the same shape of set, sized by the event's budget.
    """

    kind = INDEX
    paths = {"token": BOTH, "chunked": BOTH, "recompute": ("shifted",)}
    default_positions = "shifted"
    # The mask-only chunked path: fewer passes pay (SmolLM2 rolling, 4,096 tokens: 1.13-1.19x dense hf at 256,
    # 0.91-0.96x at 128; the bf16 gpu_check shape 0.80-0.82x against 0.50x), while C + max(chunk_size, 256), the
    # positions it reaches, stays as it was (support.py)
    default_chunk_size = 256

    def compressed(self, n: int) -> Runs:
        """Token indices kept when an event falls after reading tokens ``0 .. n-1``: at most ``capacity`` of
        them, ascending, and among those held before the event (an evicted token never comes back)."""
        raise NotImplementedError

    def event_keep(self, layer: int, alive: torch.Tensor, budget: int) -> torch.Tensor:
        """``evict_every=context``: bool [kv_heads, K], of the held columns ``alive`` marks (each head's in token
        order), what layer ``layer`` keeps at the request's one event with a budget of ``budget`` per head."""
        raise NotImplementedError

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
        runs = [self.held(int(t)) for t in queries]
        width = max(len(r) for r in runs)
        lo = torch.tensor([[a for a, _ in r] + [0] * (width - len(r)) for r in runs])
        hi = torch.tensor([[b for _, b in r] + [0] * (width - len(r)) for r in runs])
        k = keys[None, :]
        inside = keys[None, :] == queries[:, None]
        for w in range(width):  # a few runs a query: [Q, K] comparisons per run, no [Q, K, runs] tensor
            inside |= (k >= lo[:, w : w + 1]) & (k < hi[:, w : w + 1])
        return inside


class HeadIndexPolicy(Policy):
    """Each key/value head keeps its own set of token indices (DuoAttention's streaming and retrieval heads); implement
    ``event_keep``. Every ``K`` tokens it runs on the scored storage's padded layout, the heads holding fewer masked."""

    kind = HEADS
    paths = {"token": ("original",), "chunked": ("original",)}
    default_positions = "original"

    @property
    def heads_differ(self) -> bool:
        return True

    def event_keep(self, layer: int, alive: torch.Tensor, budget: int) -> torch.Tensor:
        """bool [kv_heads, K]: of the held columns ``alive`` marks (each head's in token order), what layer
        ``layer``'s heads keep at an event (``budget``: the settings', which a pattern may ignore)."""
        raise NotImplementedError


class ScoredPolicy(Policy):
    """Evicts by a score; implement ``score`` (the shape of kvpress's ``ScorerPress.score``) and declare what it reads
    (``observes``, names of ``OBSERVATIONS``: ``attention`` by default). Whether heads decide alone follows from the
    shape ``score`` returns."""

    kind = SCORED
    name = "scored"
    paths = {"token": BOTH}  # a plug-in runs on the token loop
    default_positions = "original"  # the methods' own papers and code
    observes = frozenset({"attention"})
    # Whether check_settings proves that an event can always reach the budget (what it never evicts fits in C): the
    # built-ins' checks do; a plug-in's infinite scores are checked at every event (methods/event.py).
    reaches_budget = False
    # evict_every=context: the last token of the prefill always stays (kvpress's TOVAPress)
    keeps_last_in_context_regime = False
    # A token's score depends on its own key and value alone (key-norm), not on what else is held: the chunked path
    # then scores a chunk once for all its events.
    per_token = False
    # kvpress's wrappers (ChunkKV, CriticalKV) apply to the method's per-layer scores (False: KVzip's model budget)
    takes_wrappers = True

    def __init_subclass__(cls, **kwargs):
        """Every scored method takes kvpress's wrappers as parameters of its own (methods/wrappers.py)."""
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("takes_wrappers", True):
            return
        own = {param.name for param in cls.params}
        cls.params = (*cls.params, *(param for param in WRAPPER_PARAMS if param.name not in own))

    @property
    def query_window(self) -> int | None:
        """evict_every=context: how many of the prefill's last queries the event reads (None: all of them)."""
        return None if "queries" in self.observes else 1 if "attention" in self.observes else 0

    @property
    def heads_differ(self) -> bool:
        """``head_budgets=adaptive`` (AdaKV): the heads of a layer keep different counts."""
        return getattr(self, "head_budgets", "uniform") == "adaptive"

    def score(self, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """Scores of the held tokens of one layer (low goes first): [kv_heads, K] (each key/value head evicts on its
        own), or [K] (the whole layer evicts one token).

        ``keys``/``values``: [kv_heads, K, head_dim] as held (this step's token last); ``attention``: float32
        [query_heads, K], this step's softmax weights (None unless ``observes`` has it). Query head ``q``
        reads key/value head ``q // (query_heads // kv_heads)``. A method that observes ``queries`` (or ``step``) is
        called as ``score(keys, values, attention, queries=..., step=...)`` (``OBSERVATIONS``).
        """
        raise NotImplementedError

    def row_scorer(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, first_step: int,
                   tokens: torch.Tensor):
        """Speed only, optional: at ``evict_every=1`` the chunked path's events of one chunk, prepared at once (every
        event's segment is its own row). ``keys``/``values`` [kv_heads, columns, head_dim]: what the layer held before
        the chunk and the chunk's own, ``queries`` [query_heads, rows, head_dim] the chunk's (after RoPE), row ``r``
        at stream index ``first_step + r``; ``tokens`` [kv_heads, columns] the columns' token indices. Returns
        ``scores(r, alive)``: float32 [kv_heads, columns], at the event after row ``r`` what ``score`` gives the
        columns ``alive`` marks (the others: any value), computed without gathering them. None (the default):
        ``score`` on the held columns at every event."""
        return None
