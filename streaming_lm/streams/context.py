"""The context regime (``evict_every=context``, kvpress's): read a request's prefill (its context minus the last
``query_size`` tokens) with nothing evicted, compress the cache once (``compress``: every layer and head by the policy
and budgets), then read the question, the continuation or the generated tokens with nothing more evicted: at their
text positions (positions=original, kvpress's default), or, with positions=shifted, the kept keys re-rotated to
``0 .. kept - 1`` and what follows read on from ``kept`` (kvpress's KeyRerotationPress; docs/semantics.md "Events",
docs/kvpress.md).

Before the event every layer holds every token, so a pass is plain causal attention: ``chunk_size`` tokens at a time
(``method=chunked``) or one (``method=token``: the same numbers), through SDPA. The attention function records the
queries the event will read (``ScoredPolicy.query_window``) and, after the event, masks the padding of heads that
keep fewer tokens. Registered with transformers' ``AttentionInterface``; no model code is copied or patched.

The regime's storage is here too (``ContextCache``): every token held until the request's one event, then what the
event rule (methods/event.py) keeps, per layer and key/value head; nothing is evicted after it. Heads of a layer may
keep different counts (AdaKV, DuoAttention) and layers too (PyramidKV): a layer is as wide as its fullest head, kept
tokens packed in text order, the padding marked ``dead``. Memory is what each layer's fullest head holds, not a masked
full cache.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from transformers.cache_utils import Cache, DynamicLayer

from ..forward_args import num_decoder_layers
from ..methods.event import Observation, keep, keep_model
from ..methods.prerope import prerope_key_modules
from ..methods.snapkv import window_attention
from ..positions import check_positions_fit, context_position
from ..storage.accounting import KVAccounting
from ..storage.scored import keep_columns
from .attention import held_then_causal, pass_state, refuse_learned_sinks, run_pass
from .base import EvictingStream, as_ids, chunk_spans, score_batched

ATTENTION_NAME = "streaming_lm_context"
# The first pass of a stream (method=chunked): up to this many tokens in one causal pass with no mask, as kvpress and
# lm-eval's hf read a prefill: it holds this many tokens' activations, as theirs do (SDPA's causal kernel materialises no
# [tokens, tokens] logits; scripts/bench_memory.py measures the peak against hf's). Later passes are masked, and on a CPU
# cost up to 1.5x the causal pass's time at 16k tokens: hence one pass as long as hf's own for a 16k context.
PREFILL_PASS = 16384


def _context_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    cache: ContextCache = pass_state(ATTENTION_NAME)
    refuse_learned_sinks(kwargs)
    layer = cache.layers[module.layer_idx]
    layer.record(query[0], scaling)
    if layer.replay is not None:  # a replay pass (KVzip): the method scores the prefill from its queries
        layer.replay(module, query[0], key[0], value[0], scaling)
    # Every held key, then this pass's tokens causally (the mask transformers built is not used: layers differ).
    return held_then_causal(query, key, value, scaling, layer.dead, kwargs.get("softcap"))


AttentionInterface.register(ATTENTION_NAME, _context_attention)


class ContextLayer(DynamicLayer):
    """One layer: grows while the prefill is read (recording the queries its event will read), keeps what its one event
    keeps (``keep``), then grows again without eviction."""

    def __init__(self, window: int | None):
        super().__init__()
        self.window = window  # the prefill's last queries the event reads (None: all; 0: none)
        self._queries: list[torch.Tensor] = []  # float32 [query_heads, s, head_dim] pieces, joined when read
        self._room = 0  # tokens the read under way will still add (reserve)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # what keys/values are views of, with room
        self.scale: float | None = None  # the attention's scaling (the event recomputes weights)
        self.dead: torch.Tensor | None = None  # bool [kv_heads, K]: padding of heads keeping fewer
        self.head_counts: list[int] | None = None  # the tokens each head holds, on the host, where they differ
        self.compressed = False  # after the event
        self.kept_tokens: torch.Tensor | None = None  # long [kv_heads, width]: the prefill token in each kept slot
        self.evicted = 0.0  # tokens evicted, per key/value head on average
        self.kept: float | None = None  # tokens held right after the event, per key/value head on average
        self.replay = None  # during a replay pass: called with (module, query, keys, values, scale)
        self.prerope: list[torch.Tensor] = []  # the prefill's keys before RoPE, pass by pass ([kv_heads, s, d] each)

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1 and not self.compressed:  # after the event: continuations as rows of a batch
            raise ValueError("the evict_every=context cache reads one stream at a time until its event")
        if self._room and key_states.shape[0] == 1:
            keys, values = self._write(key_states, value_states)
        else:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.dead is not None:
            fresh = torch.zeros((self.dead.shape[0], key_states.shape[-2]), dtype=torch.bool, device=keys.device)
            self.dead = torch.cat((self.dead, fresh), dim=1)
            self.head_counts = [held + key_states.shape[-2] for held in self.head_counts]
        return keys, values

    def record(self, query: torch.Tensor, scale: float) -> None:
        """The pass's queries ([query_heads, q, head_dim], after RoPE), kept for the event while it is to come."""
        self.scale = scale
        if self.compressed or self.window == 0:
            return
        self._queries.append(query.float())
        if self.window is not None:  # a short window: joined now (a long prefill's queries are joined once, when read)
            self._queries = [torch.cat(self._queries, dim=1)[:, -self.window:].clone()]  # a view would hold the pass's

    @property
    def queries(self) -> torch.Tensor | None:
        """The queries recorded so far (float32 [query_heads, s, head_dim]), or None."""
        if len(self._queries) > 1:
            self._queries = [torch.cat(self._queries, dim=1)]
        return self._queries[0] if self._queries else None

    @queries.setter
    def queries(self, value: torch.Tensor | None) -> None:
        self._queries = [] if value is None else [value]

    def reserve(self, tokens: int) -> None:
        """Room for the ``tokens`` the read under way adds: a prefill read in many passes is then written in place
        into one allocation instead of being concatenated at every pass (which copies the whole cache each time)."""
        self._room = tokens

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held, new = self.get_seq_length(), key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or held + new > buffers[0].shape[-2]
                or (held and self.keys.data_ptr() != buffers[0].data_ptr())):  # keys replaced since (the event)
            size = held + max(new, self._room)
            buffers = tuple(states.new_empty((*states.shape[:-2], size, states.shape[-1]))
                            for states in (key_states, value_states))
            if held:
                buffers[0][..., :held, :] = self.keys
                buffers[1][..., :held, :] = self.values
            self._buffers = buffers
        buffers[0][..., held:held + new, :] = key_states
        buffers[1][..., held:held + new, :] = value_states
        self._room = max(0, self._room - new)
        self.keys, self.values = buffers[0][..., :held + new, :], buffers[1][..., :held + new, :]
        return self.keys, self.values

    def keep(self, alive: torch.Tensor | None, shift=None) -> None:
        """The event: keep the held columns ``alive`` marks (bool [kv_heads, n]; None: every one); with a rotary
        ``shift`` (positions=shifted) the kept keys move to positions ``0 .. kept - 1``."""
        if self.compressed:
            raise RuntimeError("an evict_every=context stream is compressed once")
        self.compressed, self.queries, self._buffers = True, None, None
        heads, n = self.keys.shape[1], self.keys.shape[-2]
        if alive is None:  # within the budget: every token stays where it is
            self.kept_tokens = torch.arange(n, device=self.keys.device).expand(heads, -1)
            self.kept, self.evicted = float(n), 0.0
            return
        # Columns are prefill tokens in text order: a kept key moves from its token's position to its slot (shifted).
        self.keys, self.values, self.kept_tokens, self.dead, counts = keep_columns(self.keys, self.values, alive,
                                                                                   shift)
        self.head_counts = None if self.dead is None else counts
        self.kept = float(torch.tensor(counts, dtype=torch.float32).mean())  # as the per-head mean always was
        self.evicted = n - self.kept


class ContextCache(KVAccounting, Cache):
    """A ``Cache`` of ``ContextLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, window: int | None):
        super().__init__(layers=[ContextLayer(window) for _ in range(num_layers)])

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted per key/value head, on average over the layers (they differ with budgets by layer)."""
        return round(sum(layer.evicted for layer in self.layers) / len(self.layers))

    def kept_per_layer(self) -> tuple[float, ...]:
        """Tokens each layer held right after the event (per key/value head on average); () before it."""
        return tuple(layer.kept for layer in self.layers) if self.layers[0].compressed else ()


class ContextStream(EvictingStream):
    """``evict_every=context``: a stream that is compressed once, when ``compress`` is called (the request walk calls it
    after each prefill: continuation.py, generation.py)."""

    def __init__(self, model, settings, shift, batch_size: int = 1, policy=None):
        self._layers = num_decoder_layers(model)
        super().__init__(model, settings, shift, policy=policy)
        # the prefill's token ids, for a method that replays them (KVzip)
        self._prefill: list[int] | None = [] if "replay" in self.policy.observes else None
        # where the keys before RoPE are written, for a method that scores them (Leverage, Compactor)
        self._key_modules = prerope_key_modules(model) if "prerope_keys" in self.policy.observes else {}
        self._pending: list[int] = []  # after the event: tokens deferred to the next read (``defer``)

    def new_cache(self):
        return ContextCache(self._layers, getattr(self.policy, "query_window", 0))

    @property
    def compressed(self) -> bool:
        return self.cache.layers[0].compressed

    @torch.inference_mode()
    def compress(self) -> None:
        """The request's one event, after its prefill: every layer keeps what the event rule says of what it holds
        (every prefill token, in text order). The observation: the prefill's last queries (``query_window``) and, for a
        method that reads attention, the last one's weights, recomputed from its query (SDPA returns none; as
        kvpress's TOVA does)."""
        observes = self.policy.observes
        if "replay" in observes:
            self._compress_by_replay()
            return
        for index, layer in enumerate(self.cache.layers):
            if layer.compressed:
                raise RuntimeError("an evict_every=context stream is compressed once")
            if not layer.is_initialized or layer.keys.shape[-2] == 0:
                layer.compressed, layer.queries, layer.kept = True, None, 0.0
                continue
            keys, values, n = layer.keys[0], layer.values[0], layer.keys.shape[-2]
            attention = window_attention(layer.queries[:, -1:], keys, layer.scale)[:, 0] if "attention" in observes \
                else None
            prerope = torch.cat(layer.prerope, dim=1) if layer.prerope else None
            if prerope is not None and prerope.shape[1] != n:
                raise RuntimeError(f"layer {index} recorded {prerope.shape[1]} keys before RoPE for {n} prefill tokens")
            layer.prerope = []
            obs = Observation(keys, values, n - 1, attention, layer.queries if "queries" in observes else None,
                              scale=layer.scale, layer=index, prerope_keys=prerope)
            tokens = torch.arange(n, device=keys.device).expand(keys.shape[0], -1)
            layer.keep(keep(self.policy, index, self._layers, obs, None, tokens, context_regime=True),
                       self._rotate(index))
        self.note_held()

    def _compress_by_replay(self) -> None:
        """The event of a method scored by a replay pass (KVzip): each pass (``replay_passes``) is read after the
        prefill at the positions that follow it, every layer handing its queries, keys and values to the method
        (``replay_scores``; KVzip+ also reads the norms of the layer's hidden states), then cropped back to the
        prefill; the model's lowest cells go (``event.keep_model``)."""
        layers, n = self.cache.layers, self.n
        if any(not layer.is_initialized or layer.keys.shape[-2] != n for layer in layers):
            raise RuntimeError("a replay-scored event needs every layer to hold the whole prefill")
        scores = torch.zeros((len(layers), layers[0].keys.shape[1], n), device=layers[0].keys.device)
        passes = self.policy.replay_passes(self._prefill)
        norms, hooks = {}, []
        if self.policy.replay_reads_hidden_norms:
            def hidden_norms(module, args, kwargs):
                states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                norms[module.layer_idx] = states[0].float().norm(dim=-1)

            hooks = [module.register_forward_pre_hook(hidden_norms, with_kwargs=True)
                     for module in self.policy.attention_modules.values()]

        def scorer(start, end):
            def score(module, query, keys, values, scale):
                index = module.layer_idx
                scores[index, :, start:end] = self.policy.replay_scores(index, query, keys, values, start, end, scale,
                                                                        norms.get(index))
            return score

        try:
            for start, end, ids in passes:
                check_positions_fit(self.model, n + len(ids), self._limit)
                for layer in layers:
                    layer.replay = scorer(start, end)
                run_pass(self.model, ATTENTION_NAME, self.cache,
                         input_ids=torch.tensor([ids], device=self.model.device),
                         position_ids=torch.arange(n, n + len(ids), device=self.model.device)[None],
                         **self._kwargs[True])
                for layer in layers:  # the replay scored, its keys and values go
                    layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        finally:
            for layer in layers:
                layer.replay = None
            for hook in hooks:
                hook.remove()
        kept = keep_model(self.policy, scores, n - 1)
        for index, layer in enumerate(layers):
            layer.keep(None if bool(kept[index].all()) else kept[index], self._rotate(index))
        self.note_held()

    def _rotate(self, layer: int):
        """The rotary shift that moves layer ``layer``'s kept keys (positions=shifted), or None."""
        if self.settings.positions != "shifted" or self.shift is None:
            return None  # original positions, or keys that carry no position (learned absolute positions)
        return self.shift.for_layer(layer)

    def kept_per_layer(self) -> tuple[float, ...]:
        """Tokens each layer held right after the event (per key/value head on average)."""
        return self.cache.kept_per_layer()

    def defer(self, ids) -> None:
        """After the event: tokens of the context (the question) read with whatever is read next, not in a pass of
        their own: the continuations' batch reads them in every row (``score_continuations``: one pass fewer a
        context); any other read, or ``last_logits``, reads them first."""
        if not self.compressed:
            raise RuntimeError("defer() is for the tokens after the event: the prefill is read before it")
        self._pending.extend(int(i) for i in as_ids(ids, "cpu"))

    def _read_pending(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self.read(pending, last_only=True)

    def last_logits(self) -> torch.Tensor:
        self._read_pending()
        return super().last_logits()

    def fork(self):
        self._read_pending()  # read once, not by every copy
        return super().fork()

    def read_passes(self, ids, last_only: bool = False):
        self._read_pending()
        ids = as_ids(ids, self.model.device)
        if self._prefill is not None and not self.compressed:
            self._prefill.extend(ids.tolist())
        with self._recording_keys_before_rope():
            for a, logits in self._read_rows(ids[None], last_only):
                yield a, logits[0]

    @contextlib.contextmanager
    def _recording_keys_before_rope(self):
        """While the prefill is read, each layer's keys before RoPE, as its key projection (``k_proj``, or
        ``k_norm`` where it has one) outputs them (``prerope.prerope_key_modules``), for a method that observes
        ``prerope_keys``: kvpress recomputes them from the hidden states with the same modules."""
        if not self._key_modules or self.compressed:
            yield
            return
        layers = self.cache.layers

        def recorder(index, head_dim):
            def record(module, args, output):
                keys = output[0].reshape(output.shape[1], -1, head_dim).transpose(0, 1)  # [kv_heads, s, d]
                layers[index].prerope.append(keys.detach())
            return record

        hooks = [module.register_forward_hook(recorder(index, head_dim))
                 for index, (module, head_dim) in self._key_modules.items()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @torch.inference_mode()
    def score_continuations(self, context, continuations):
        """After the event the continuations of a context are read together, as the rows of a batch (nothing is
        evicted after it: every row's evictions are the event's)."""
        if not self.compressed:
            return super().score_continuations(context, continuations)
        ahead, self._pending = [*self._pending, *context], []  # read in every row: no pass of their own
        return score_batched(self, [], continuations, lambda n: self.evicted, ahead=ahead)

    def _read_rows(self, rows: torch.Tensor, last_only: bool = False):
        """Read ``rows`` ([B, L] token ids; B > 1 only after the event, on a state thrown away after): yields
        ``(offset, float32 logits [B, q, vocab])`` per pass."""
        chunked = self.settings.method == "chunked"
        chunk = self.settings.chunk_size if chunked else 1
        # From an empty cache every key is visible causally: the first PREFILL_PASS tokens in one pass through SDPA's
        # causal kernel, no mask (as kvpress reads a prefill); later passes are masked, chunk_size long, so that no pass
        # materialises more than [heads, chunk_size, keys] of attention.
        first = max(chunk, PREFILL_PASS) if chunked and self.n == 0 else None
        if not self.compressed and rows.shape[0] == 1:
            for layer in self.cache.layers:
                layer.reserve(rows.shape[1])
        evicted = self.cache.evicted_tokens  # 0 until the event; then as many in every layer and head where shifted
        return self._read_in_passes(rows, chunk_spans(rows.shape[1], chunk, first), ATTENTION_NAME,
                                    lambda a, b: (self.cache, context_position(
                                        torch.arange(a, b, device=rows.device)[None], evicted, self.settings)),
                                    last_only)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        return self.read([token])[-1]

    def score(self, ids, progress: bool = False):
        raise ValueError("evict_every=context compresses once, after a request's context; a rolling log-likelihood "
                         "(loglikelihood_rolling: perplexity tasks such as wikitext) has no context: use evict_every=K "
                         "(an integer, e.g. evict_every=1)")
