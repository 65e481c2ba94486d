"""The chunked path of scored policies (``method="chunked"``, original positions): many tokens per pass,
the token loop's numbers.

In a causal model the inputs of layer l for a chunk of queries do not depend on layer l's evictions:
the model still runs layer by layer, and inside each layer's attention (a function registered with
transformers' ``AttentionInterface``) the rows are taken in order. Row t attends to the tokens its head
held before step t plus t itself; at an event its softmax weights score the held tokens and the policy's
victims are dropped before row t + 1 (storage/scored.py's rule). Projections and MLPs run once per chunk;
only the events are sequential: the rows of a segment (between two events) share one masked softmax. With original positions every key keeps the rotation it was read with,
so nothing moves.
"""

from __future__ import annotations


import torch
from transformers import AttentionInterface

from ..forward_args import num_decoder_layers
from ..storage import ScoredDynamicCache
from ..storage.scored import adaptive_compress, compress, held_scores, step_scores
from .attention import grouped_rows, pass_state, refuse_learned_sinks, soft_capped
from .base import EvictingStream, as_ids, chunk_spans

ATTENTION_NAME = "streaming_lm_scored_rows"


def _rows_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    layer = pass_state(ATTENTION_NAME).layers[module.layer_idx]
    refuse_learned_sinks(kwargs)
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
    # A score that reads neither attention nor history (key-norm) is the same for every row: once per chunk.
    fixed = None if policy.needs_attention or policy.needs_queries or policy.accumulate or policy.holds_by_head \
        else step_scores(policy, key[0], value[0], None, None, kv_heads)
    segment = 0  # the first row of this chunk in the current segment (earlier rows: layer.queries)
    columns_at = torch.arange(columns, device=key.device)
    a = 0  # the first row of the next block
    for r in _block_ends(policy, t0, q_len):
        # Rows a..r in one softmax: between events nothing is evicted, so row i sees what ``alive`` marks up to
        # its own token (causal). An accumulating policy scores every row: its blocks are single rows.
        alive[:, first + a : first + r + 1] = True
        seen = alive[:, None, :]  # [kv_heads, rows, columns]
        if r > a:
            seen = seen & (columns_at[None, :] <= first + torch.arange(a, r + 1, device=key.device)[:, None])
        weights[:, :, a : r + 1] = torch.softmax(logits[:, :, a : r + 1].masked_fill(~seen[:, None], float("-inf")),
                                                 dim=-1)
        a = r + 1
        row = weights[:, :, r]
        event = policy.schedule.event_after(t0 + r)
        if policy.holds_by_head:  # an index rule per head (duo)
            alive = policy.event_keep(layer.index, alive) if event else alive
            over = False
        else:
            capacity = layer.capacity(t0 + r + 1) if event else None  # asked for at events only (pyramid)
            over = event and int(alive.sum()) > capacity * kv_heads
        if policy.accumulate or over:
            attention = row.reshape(heads, columns) if policy.needs_attention else None
            queries = None
            if policy.needs_queries:  # the segment's queries: earlier chunks' (held by the layer), then these rows
                mine = query[0, :, segment : r + 1].float()
                queries = mine if layer.queries is None else torch.cat((layer.queries, mine), dim=1)
            if fixed is not None:
                score = fixed
            elif policy.accumulate:  # totals are per column: score every column (dead ones are never chosen)
                score = step_scores(policy, key[0], value[0], attention, layer.totals, kv_heads, queries, t0 + r)
            else:
                score = held_scores(policy, key[0], value[0], attention, alive, queries, t0 + r)
            if over:
                evict = adaptive_compress if policy.adaptive_heads else compress
                alive = evict(score, layer.tokens, t0 + r, policy, alive, capacity)
        if event:
            layer.queries, segment = None, r + 1
    out = torch.matmul(weights.to(value.dtype).reshape(kv_heads, group * q_len, columns), value[0])
    layer.keep(alive)
    if segment < q_len:
        layer.observe(query[0, :, segment:])  # the rest of the segment, for the next chunk's event
    return out.reshape(1, heads, q_len, -1).transpose(1, 2).contiguous(), None


def _block_ends(policy, t0: int, q_len: int) -> list[int]:
    """The chunk's rows (its first token is ``t0``) after which something may change: each event's row and the last
    row; every row for a policy that accumulates scores."""
    if policy.accumulate:
        return list(range(q_len))
    ends = [r for r in range(q_len) if policy.schedule.event_after(t0 + r)]
    return ends if ends and ends[-1] == q_len - 1 else ends + [q_len - 1]


AttentionInterface.register(ATTENTION_NAME, _rows_attention)



class ScoredChunkedStream(EvictingStream):
    """``method="chunked"`` for a scored policy (positions=original): ``chunk_size`` tokens per pass."""

    def __init__(self, model, settings, shift, batch_size: int = 1):
        if settings.positions != "original":
            raise ValueError("the scored chunked path serves positions=original only")
        super().__init__(model, settings, shift)

    def new_cache(self):
        # Original positions: every key keeps the rotation it was read with, so the storage rotates nothing.
        return ScoredDynamicCache(num_decoder_layers(self.model), self.policy, None, rows=True)

    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        # Original positions: a pass's position ids are its tokens' stream indices.
        passes = self._read_in_passes(ids[None], chunk_spans(ids.numel(), self.settings.chunk_size), ATTENTION_NAME,
                                      lambda a, b: (self.cache, torch.arange(a, b, device=ids.device)[None]), last_only)
        for a, logits in passes:
            yield a, logits[0]

    def step(self, token: int) -> torch.Tensor:
        return self.read([token])[-1]
