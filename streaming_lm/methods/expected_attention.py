"""Expected Attention: score each held key by the attention future queries are expected to pay it.

Devoto et al., *Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution*, 2025, https://arxiv.org/abs/2510.00636
"""

from __future__ import annotations

import math

from ..values import as_choice, as_count, as_float
from .base import Param, ScoredPolicy
from .lazy_torch import F, torch
from .budgets import HEAD_BUDGETS, check_head_budgets
from .prerope import before_rope, bind_rotary


class ExpectedAttention(ScoredPolicy):
    """Expected Attention: at an event, the attention that future queries are expected to pay each held key, from
    the mean and covariance of the segment's queries before RoPE, rotated on average over the next
    ``n_future_positions`` positions, times the value's norm (docs/methods.md). The first ``n_sink`` tokens are
    kept. Original positions (the segment's queries are un-rotated from their text positions; kvpress keeps
    positions too).

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
    observes = frozenset({"queries", "step"})

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
        self.rotary, self.attention_scaling = bind_rotary(self.name, model, shift)
        self._tables: dict = {}
        self._table_rows = 0  # the queries the kept tables cover

    def _event_tables(self, step: int, segment: int, head_dim: int, device):
        """The rotation tables of the event at ``step`` (the segment's ``segment`` queries rotated back from their
        positions; the mean rotation from the next one): the same for every layer of the event, so computed once for
        them all (every K tokens the layers of a chunk's events come one after another: a chunk's events are kept)."""
        key = (step, segment, head_dim, device)
        if key not in self._tables:
            index = torch.arange(step - segment + 1, step + 1, device=device)
            rotation = mean_rotation(self.rotary.inv_freq.float(), step + 1, self.n_future_positions,
                                     head_dim, self.rotary.layout, self.attention_scaling).to(device)
            self._remember(key, segment, (index, self.rotary.tables(-index, device), rotation))
        return self._tables[key]

    def _row_tables(self, first_step: int, rows: int, head_dim: int, device):
        """``row_scorer``'s tables, for every layer of a chunk: its rows' indices, their inverse rotations and each
        row's mean rotation [rows, head_dim, head_dim] (each row an event: from the position after it)."""
        key = ("rows", first_step, rows, head_dim, device)
        if key not in self._tables:
            index = torch.arange(first_step, first_step + rows, device=device)
            # each row's from the position after it (built on the host: no device round trip)
            rotations = mean_rotation(self.rotary.inv_freq.float(), torch.arange(first_step + 1, first_step + rows + 1),
                                      self.n_future_positions, head_dim, self.rotary.layout,
                                      self.attention_scaling).to(device)
            self._remember(key, rows, (index, self.rotary.tables(-index, device), rotations))
        return self._tables[key]

    def _remember(self, key, rows: int, tables) -> None:
        # Bounded: a chunk's events at most, and one long segment alone (once after a 16k-token context its
        # tables are [16k, head_dim]; requests do not share them)
        if len(self._tables) >= 1024 or self._table_rows + rows > 8192:
            self._tables.clear()
            self._table_rows = 0
        self._table_rows += rows
        self._tables[key] = tables

    def before_rope(self, queries, step: int):
        """The segment's queries before RoPE (float32 [query_heads, s, head_dim]: rotated back from their text
        positions, the rotary scaling undone) and their stream indices, at the event after ``step``."""
        index, back, _ = self._event_tables(step, queries.shape[1], queries.shape[-1], queries.device)
        return before_rope(self.rotary, self.attention_scaling, queries, index, back), index

    def score(self, keys, values, attention, queries, step):
        before, index = self.before_rope(queries, step)
        rotation = self._event_tables(step, queries.shape[1], queries.shape[-1], queries.device)[2]  # before_rope's
        return expected_attention_scores(before, index, keys, values, rotation, n_sink=self.n_sink,
                                         use_covariance=self.use_covariance, use_vnorm=self.use_vnorm,
                                         epsilon=self.epsilon)


    def row_scorer(self, keys, values, queries, first_step, tokens):
        """Every event's segment one query (``evict_every=1``): no covariance, and each row's expected query
        (rotated back, then by the mean rotation from the next position) and its logits against every column are
        one batched product for the chunk; an event is then a softmax over the non-sink columns it holds. The math
        of ``expected_attention_scores``, the sinks being the columns of tokens ``< n_sink``."""
        heads, rows, d = queries.shape
        kv_heads, columns, _ = keys.shape
        index, back, rotations = self._row_tables(first_step, rows, d, queries.device)
        before = before_rope(self.rotary, self.attention_scaling, queries, index, back)  # [heads, rows, d]
        expected = torch.einsum("hri,rji->hrj", before, rotations).reshape(kv_heads, -1, rows, d)
        expected = expected.transpose(1, 2).reshape(kv_heads, -1, d)  # [kv_heads, rows * group, d], by row
        scale = 1.0 / math.sqrt(d)
        # [kv_heads, rows, group, columns]: row r's logits of every column, for each query head of the kv head (one
        # product per key/value head: a broadcast over rows would copy the keys per row)
        logits = (scale * torch.matmul(expected, keys.float().transpose(-1, -2))).view(kv_heads, rows, -1, columns)
        sink = tokens < self.n_sink
        norms = values.float().norm(dim=-1) if self.use_vnorm else None

        def scores(r: int, alive: torch.Tensor) -> torch.Tensor:
            weights = torch.softmax(logits[:, r].masked_fill(~(alive & ~sink)[:, None], float("-inf")), dim=-1)
            score = weights.mean(dim=1)
            if norms is not None:
                score = (score + self.epsilon) * norms
            return score.masked_fill(sink, float("inf"))

        return scores


def check_expected_attention(n_future_positions=512, n_sink=4, epsilon=0.0) -> None:
    """Expected Attention's knobs: ``n_future_positions >= 1``, ``n_sink >= 0``, a finite ``epsilon >= 0``."""
    as_count("n_future_positions", n_future_positions, 1)
    as_count("n_sink", n_sink, 0)
    as_float("epsilon", epsilon, 0)


def mean_rotation(inv_freq: torch.Tensor, first_position, count: int, head_dim: int,
                  layout: str = "rotate_half", attention_scaling: float = 1.0) -> torch.Tensor:
    """float32 [head_dim, head_dim]: the mean of the RoPE matrices of positions ``first_position ..
    first_position + count - 1`` (``R x`` rotates ``x`` as the model rotates a query at that position); for a
    tensor of first positions [n], the n matrices [n, head_dim, head_dim].

    ``inv_freq`` [rotary_dim / 2] and ``attention_scaling`` are the model's rotary module's (transformers'
    ``rotary_emb.inv_freq`` / ``.attention_scaling``, which already fold in theta and RoPE scaling); angles are
    computed as the model computes them (float32 position times float32 frequency). ``layout``: ``rotate_half``
    pairs feature ``i`` with ``i + rotary_dim/2`` (Llama, Mistral, Qwen), ``interleaved`` pairs ``2i`` and
    ``2i + 1``. Features beyond ``rotary_dim`` are not rotated.
    """
    from ..rotary import HALF, LAYOUTS

    as_choice("layout", layout, LAYOUTS)
    as_count("n_future_positions", count, 1)
    one = not isinstance(first_position, torch.Tensor)
    firsts = torch.tensor([as_count("first_position", first_position, 0)]) if one else first_position.long().cpu()
    if firsts.numel() and int(firsts.min()) < 0:
        raise ValueError(f"first_position must be an integer >= 0, got {int(firsts.min())}")
    inv_freq = inv_freq.detach().float().cpu()
    half = inv_freq.numel()
    if 2 * half > head_dim:
        raise ValueError(f"inv_freq has {half} frequencies: more than head_dim={head_dim} features can pair")
    positions = (firsts[:, None] + torch.arange(count)).float()  # [n, count]
    angles = positions[..., None] * inv_freq  # [n, count, half]
    cos = (angles.cos() * attention_scaling).mean(1)
    sin = (angles.sin() * attention_scaling).mean(1)
    first = torch.arange(half) if layout == HALF else 2 * torch.arange(half)
    second = first + half if layout == HALF else first + 1
    rotation = torch.eye(head_dim).repeat(firsts.numel(), 1, 1)
    rotation[:, first, first], rotation[:, second, second] = cos, cos
    rotation[:, first, second], rotation[:, second, first] = -sin, sin
    return rotation[0] if one else rotation


def expected_attention_scores(queries: torch.Tensor, query_index: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor, rotation: torch.Tensor, *, n_sink: int = 4,
                              use_covariance: bool = True, use_vnorm: bool = True, epsilon: float = 0.0,
                              scale: float | None = None) -> torch.Tensor:
    """float32 [kv_heads, n]: the expected attention of every held key; the first ``n_sink`` score ``+inf``.

    - ``queries`` [query_heads, N, d]: the segment's queries *before* RoPE, ``query_index`` [N] their stream
      indices (ascending); those with index ``< n_sink`` are left out of the statistics.
    - ``keys``, ``values`` [kv_heads, n, d] as held (keys after RoPE); the first ``n_sink`` held tokens are the
      stream's first ``n_sink`` (never evicted) and are kept.
    - ``rotation`` [d, d]: ``mean_rotation`` over the next ``n_future_positions`` positions from the position
      of the next token.

    Per query head: ``μ``, ``Σ`` (divided by N) of the queries, ``μ' = Rμ``, ``Σ' = RΣRᵀ``; for each non-sink key
    ``z = s·k·μ' + s²·kᵀΣ'k / 2`` with ``s = scale`` (default ``1/sqrt(d)``, giving ``k·μ'/√d + kᵀΣ'k/(2d)``;
    without ``use_covariance`` the second term is left out), softmax over the non-sink keys, mean over the
    query heads of each key/value head, then with ``use_vnorm`` ``(score + epsilon)·‖v‖``.
    """
    check_expected_attention(n_sink=n_sink, epsilon=epsilon)
    heads, _, d = queries.shape
    kv_heads, n, _ = keys.shape
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if n <= n_sink:
        raise ValueError(f"expected_attention needs more held tokens ({n}) than n_sink={n_sink}")
    observed = queries[:, int((query_index < n_sink).sum()):].float()  # the indices ascend: a slice, not a mask
    if observed.shape[1] == 0:
        raise ValueError(f"expected_attention needs a query at stream index >= n_sink={n_sink} in the segment")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rotation = rotation.float()
    mean = observed.mean(dim=1)  # [heads, d]
    held = keys[:, n_sink:].float()
    group = heads // kv_heads
    # k · μ' for each query head of each key/value head, without copying the keys per query head.
    expected = (mean @ rotation.T).reshape(kv_heads, group, d)
    logits = scale * torch.matmul(held, expected.transpose(1, 2)).transpose(1, 2).reshape(heads, -1)
    if use_covariance and observed.shape[1] > 1:  # one query (an event every token): its covariance is 0
        grouped = held.repeat_interleave(group, dim=0)  # [heads, n', d]
        centered = observed - mean[:, None, :]
        cov = torch.einsum("hsi,hsj->hij", centered, centered) / observed.shape[1]
        cov = rotation @ cov @ rotation.T
        logits = logits + scale * scale / 2 * torch.einsum("hni,hij,hnj->hn", grouped, cov, grouped)
    score = torch.softmax(logits, dim=-1).reshape(kv_heads, heads // kv_heads, -1).mean(dim=1)
    if use_vnorm:
        score = (score + epsilon) * values[:, n_sink:].float().norm(dim=-1)
    return F.pad(score, (n_sink, 0), value=float("inf"))
