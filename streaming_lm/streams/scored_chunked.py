"""The chunked path of scored methods, and of methods whose heads hold different tokens (``method="chunked"``,
original positions): many tokens per pass, the token loop's numbers.

In a causal model the inputs of layer l for a chunk of queries do not depend on layer l's evictions:
the model still runs layer by layer, and inside each layer's attention (a function registered with
transformers' ``AttentionInterface``) the rows are taken in order. Row t attends to the tokens its head
held before step t plus t itself; at an event its observation goes to the event rule (methods/event.py) and
what it evicts is dropped before row t + 1. Projections and MLPs run once per chunk;
only the events are sequential: the rows of a segment (between two events) share one masked softmax. With original positions every key keeps the rotation it was read with,
so nothing moves.
"""

from __future__ import annotations


import torch
from transformers import AttentionInterface

from ..forward_args import num_decoder_layers
from ..storage import ScoredDynamicCache
from ..methods.base import SCORED
from ..methods.event import Observation, keep, step_scores
from .attention import grouped_rows, held_then_causal, pass_state, refuse_learned_sinks, soft_capped
from .base import EvictingStream, as_ids, chunk_spans, score_batched

ATTENTION_NAME = "streaming_lm_scored_rows"


def _rows_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    layer = pass_state(ATTENTION_NAME).layers[module.layer_idx]
    refuse_learned_sinks(kwargs)
    if query.shape[0] > 1:
        return _rows_without_event(layer, query, key, value, scaling, kwargs.get("softcap"))
    policy = layer.policy
    _, heads, q_len, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group, first = heads // kv_heads, columns - q_len  # columns 0..first-1: held before this chunk
    # Every row's logits at once (they do not depend on evictions); only the masks are sequential.
    logits = torch.matmul(grouped_rows(query.float(), kv_heads)[0], key[0].float().transpose(-1, -2))
    logits = soft_capped((logits * scaling).reshape(kv_heads, group, q_len, columns), kwargs.get("softcap"))
    alive = torch.zeros((kv_heads, columns), dtype=torch.bool, device=key.device)
    alive[:, :first] = True if layer.dead is None else ~layer.dead[:, :first]  # AdaKV: heads hold different counts
    weights = torch.empty_like(logits)
    t0 = layer.seen - q_len
    observes = policy.observes
    # A token's score from its own key and value alone (key-norm) is the same at every row: once per chunk.
    fixed = None
    if policy.kind == SCORED and policy.per_token and not observes - {"layer"}:
        fixed = step_scores(policy, Observation(key[0], value[0], t0 + q_len - 1, layer=layer.index), kv_heads)
    # Every row its own segment (evict_every=1): the method may prepare the chunk's events at once (row_scorer).
    rows_scorer = None
    if policy.kind == SCORED and fixed is None and policy.schedule.every == 1 and not layer.history:
        rows_scorer = policy.row_scorer(key[0], value[0], query[0], t0, layer.tokens)
    segment = 0  # the first row of this chunk in the current segment (earlier rows: layer.queries)
    columns_at = torch.arange(columns, device=key.device)
    a = 0  # the first row of the next block
    for r in _block_ends(policy, t0, q_len):
        # Rows a..r in one softmax: between events nothing is evicted, so row i sees what ``alive`` marks up to
        # its own token (causal). An accumulating method scores every row: its blocks are single rows.
        alive[:, first + a : first + r + 1] = True
        seen = alive[:, None, :]  # [kv_heads, rows, columns]
        if r > a:
            seen = seen & (columns_at[None, :] <= first + torch.arange(a, r + 1, device=key.device)[:, None])
        weights[:, :, a : r + 1] = torch.softmax(logits[:, :, a : r + 1].masked_fill(~seen[:, None], float("-inf")),
                                                 dim=-1)
        a = r + 1
        event = policy.schedule.event_after(t0 + r)
        if layer.history or event:  # the row's observation, as the token loop's step would make it
            attention = weights[:, :, r].reshape(heads, columns) if "attention" in observes else None
            queries = None
            if event and "queries" in observes and rows_scorer is None:
                # the segment's: earlier chunks' (held by the layer), then these rows
                mine = query[0, :, segment : r + 1].float()
                queries = mine if layer.queries is None else torch.cat((layer.queries, mine), dim=1)
            obs = Observation(key[0], value[0], t0 + r, attention, queries, fixed, scaling, layer.index)
            if rows_scorer is not None:
                obs.score_of = lambda r=r, alive=alive: rows_scorer(r, alive)
            if layer.history:  # totals are per column: score every column (dead ones are never chosen)
                obs.scores = step_scores(policy, obs, kv_heads, layer.totals)
            if event:
                kept = keep(policy, layer.index, layer.layers, obs, alive, layer.tokens)
                alive = alive if kept is None else kept
                layer.queries, segment = None, r + 1
    out = torch.matmul(weights.to(value.dtype).reshape(kv_heads, group * q_len, columns), value[0])
    layer.keep(alive)
    if segment < q_len:
        layer.observe(query[0, :, segment:])  # the rest of the segment, for the next chunk's event
    return out.reshape(1, heads, q_len, -1).transpose(1, 2).contiguous(), None


def _rows_without_event(layer, query, key, value, scaling, softcap):
    """Continuations of one state read as the rows of a batch, where no event falls while they are read
    (``ScoredChunkedStream.score_continuations`` checks): every row sees the columns its heads held before the pass,
    then its own tokens causally; nothing is observed or evicted (the rows' state is thrown away after)."""
    q_len = query.shape[2]
    if _event_among(layer.policy.schedule, layer.seen - q_len, layer.seen):
        raise RuntimeError("rows of a batch were read across an event: each row's evictions would be its own")
    return held_then_causal(query, key, value, scaling, layer.dead, softcap)


def _event_among(schedule, a: int, b: int) -> bool:
    """Whether an event falls after one of the tokens ``a .. b-1``."""
    return any(schedule.event_after(t) for t in range(a, b))


def _block_ends(policy, t0: int, q_len: int) -> list[int]:
    """The chunk's rows (its first token is ``t0``) after which something may change: each event's row and the last
    row; every row for a method that accumulates scores."""
    if "history" in policy.observes:
        return list(range(q_len))
    ends = [r for r in range(q_len) if policy.schedule.event_after(t0 + r)]
    return ends if ends and ends[-1] == q_len - 1 else ends + [q_len - 1]


AttentionInterface.register(ATTENTION_NAME, _rows_attention)



class ScoredChunkedStream(EvictingStream):
    """``method="chunked"`` for a scored policy (positions=original): ``chunk_size`` tokens per pass."""

    def __init__(self, model, settings, shift, batch_size: int = 1, policy=None):
        if settings.positions != "original":
            raise ValueError("the scored chunked path serves positions=original only")
        super().__init__(model, settings, shift, policy=policy)

    def new_cache(self):
        # Original positions: every key keeps the rotation it was read with, so the storage rotates nothing.
        return ScoredDynamicCache(num_decoder_layers(self.model), self.policy, None)

    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        for a, logits in self._read_rows(ids[None], last_only):
            yield a, logits[0]

    def step(self, token: int) -> torch.Tensor:
        return self.read([token])[-1]

    def _read_rows(self, rows: torch.Tensor, last_only: bool = False):
        """Read ``rows`` ([B, L] token ids; B > 1 only where no event falls, on a state thrown away after:
        ``score_batched``): yields ``(offset, float32 logits [B, q, vocab])`` per pass. Original positions: a pass's
        position ids are its tokens' stream indices."""
        return self._read_in_passes(rows, chunk_spans(rows.shape[1], self.settings.chunk_size), ATTENTION_NAME,
                                    lambda a, b: (self.cache, torch.arange(a, b, device=rows.device)[None]), last_only)

    @torch.inference_mode()
    def score_continuations(self, context, continuations):
        """The continuations in which no event falls while they are read (their tokens but the last) are read together
        as the rows of a batch (``score_batched``: nothing is evicted, every row sees the same held keys); the others
        one by one, each from a fork."""
        if len(context):
            self.extend(context)
        crossing = [_event_among(self.policy.schedule, self.n, self.n + len(c) - 1) for c in continuations]
        rows = [i for i, crosses in enumerate(crossing) if not crosses]
        alone = [i for i, crosses in enumerate(crossing) if crosses]
        results: list = [None] * len(continuations)
        if rows:
            for i, scored in zip(rows, score_batched(self, [], [continuations[i] for i in rows],
                                                     lambda n: self.evicted), strict=True):
                results[i] = scored
        if alone:
            for i, scored in zip(alone, super().score_continuations([], [continuations[i] for i in alone]),
                                 strict=True):
                results[i] = scored
        return results
