"""``evict_every=context``: read a request's prefill (its context minus the last ``query_size`` tokens) with nothing
evicted, compress the cache once (``compress``: every layer and head by the policy and budgets), then read the
question, the continuation or the generated tokens with nothing more evicted, at original positions (kvpress's
regime; docs/semantics.md "Events", docs/kvpress.md).

Before the event every layer holds every token, so a pass is plain causal attention: ``chunk_size`` tokens at a time
(``method=chunked``) or one (``method=token``: the same numbers), through SDPA. The attention function records the
queries the event will read (``ScoredPolicy.query_window``) and, after the event, masks the padding of heads that
keep fewer tokens (storage/context.py). Registered with transformers' ``AttentionInterface``; no model code is
copied or patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..forward_args import num_decoder_layers
from ..storage.context import ContextCache
from .attention import pass_state, refuse_learned_sinks, soft_capped
from .base import EvictingStream, as_ids, chunk_spans, score_batched

ATTENTION_NAME = "streaming_lm_context"
# The first pass of a stream (method=chunked): up to this many tokens in one causal pass with no mask, as kvpress reads
# a prefill (it holds this many tokens' activations; SDPA's causal kernel materialises no [tokens, tokens] logits).
PREFILL_PASS = 4096


def _context_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    cache: ContextCache = pass_state(ATTENTION_NAME)
    refuse_learned_sinks(kwargs)
    layer = cache.layers[module.layer_idx]
    layer.record(query[0], scaling)
    heads, q_len, columns = query.shape[1], query.shape[2], key.shape[2]
    group = heads // key.shape[1]
    softcap = kwargs.get("softcap")
    if softcap is None and layer.dead is None and q_len in (1, columns):
        # Nothing masked but causality: a pass from an empty cache (the prefill, read in one pass where it fits) or
        # one query over every held key; SDPA's causal kernels (flash on a GPU) need no mask.
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    # Every held key, then this pass's tokens causally (the mask transformers built is not used: layers differ).
    allowed = torch.ones((q_len, columns), dtype=torch.bool, device=query.device).tril(columns - q_len)[None, None]
    if layer.dead is not None:
        allowed = allowed & ~layer.dead.repeat_interleave(group, dim=0)[None, :, None, :]
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=True)
    else:  # Gemma-style soft-capping: eager, float32 softmax
        keys, values = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        logits = soft_capped(torch.matmul(query, keys.transpose(-1, -2)) * scaling, softcap)
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32)
        out = torch.matmul(weights.to(values.dtype), values)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _context_attention)


class ContextStream(EvictingStream):
    """``evict_every=context``: a stream that is compressed once, when ``compress`` is called (the request walk calls it
    after each prefill: continuation.py, generation.py)."""

    def __init__(self, model, settings, shift, batch_size: int = 1):
        self._layers = num_decoder_layers(model)
        super().__init__(model, settings, shift)

    def new_cache(self):
        return ContextCache(self._layers, getattr(self.policy, "query_window", 0))

    @property
    def compressed(self) -> bool:
        return self.cache.layers[0].compressed

    def compress(self) -> None:
        """The request's one event, after its prefill: every layer keeps what the policy says."""
        for index, layer in enumerate(self.cache.layers):
            layer.compress(self.policy, index, self._layers)
        self.note_held()

    def kept_per_layer(self) -> tuple[float, ...]:
        """Tokens each layer held right after the event (per key/value head on average)."""
        return self.cache.kept_per_layer()

    def read_passes(self, ids, last_only: bool = False):
        for a, logits in self._read_rows(as_ids(ids, self.model.device)[None], last_only):
            yield a, logits[0]

    @torch.inference_mode()
    def score_continuations(self, context, continuations):
        """After the event the continuations of a context are read together, as the rows of a batch (nothing is
        evicted after it: every row's evictions are the event's)."""
        if not self.compressed:
            return super().score_continuations(context, continuations)
        return score_batched(self, context, continuations, lambda n: self.evicted)

    def _read_rows(self, rows: torch.Tensor, last_only: bool = False):
        """Read ``rows`` ([B, L] token ids; B > 1 only after the event, on a state thrown away after): yields
        ``(offset, float32 logits [B, q, vocab])`` per pass."""
        chunked = self.settings.method == "chunked"
        chunk = self.settings.chunk_size if chunked else 1
        # From an empty cache every key is visible causally: the first PREFILL_PASS tokens in one pass through SDPA's
        # causal kernel, no mask (as kvpress reads a prefill); later passes are masked, chunk_size long, so that no pass
        # materialises more than [heads, chunk_size, keys] of attention.
        first = max(chunk, PREFILL_PASS) if chunked and self.n == 0 else None
        return self._read_in_passes(rows, chunk_spans(rows.shape[1], chunk, first), ATTENTION_NAME,
                                    lambda a, b: (self.cache, torch.arange(a, b, device=rows.device)[None]), last_only)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        return self.read([token])[-1]

    def score(self, ids, progress: bool = False):
        raise ValueError("evict_every=context compresses once, after a request's context; a rolling log-likelihood "
                         "(loglikelihood_rolling: perplexity tasks such as wikitext) has no context: use evict_every=K "
                         "(an integer, e.g. evict_every=1)")
