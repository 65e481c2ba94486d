"""A deliberately naive reference for scored eviction policies (docs/policies.md).

Nothing here imports streaming_lm. Step t re-runs the model over the whole prefix x_0..x_t, with no cache, with an
eager attention function written here: row t of layer l, head h attends exactly to the tokens that head held
before step t plus t itself, at their original positions or (shifted) at their ranks 0..|K|-1; the rows of the
earlier tokens get the outputs their own steps computed (from the same inputs), so every key and value is the one
computed at its own step (one row per step: the loop costs O(n) rows, not O(n²)). Row t's softmax weights then
score the held tokens,
and the lowest-scored unprotected token of each head (or layer) is dropped, again until C are left, after
every ``evict_every`` steps (docs/semantics.md, "Events"; between them nothing is dropped).

It serves any model whose attention goes through transformers' ``AttentionInterface`` (the key/value heads are
read off the keys the model hands it). Shifted positions: token s is read at its slot, the count its head held
before it (the model's own position ids, so learned absolute positions are served too), and at step t each held
key is moved from the slot it was read at to its rank by ``rotate`` (see ``scored_logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface

NAME = "test_scored_reference"


def pyramid(n: int, layers: int, budget: int, window: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets for a token budget (docs/methods.md), written again here."""
    low = budget / beta
    high = 2 * budget - low
    if high >= n - window:
        high = n - window
        low = 2 * budget - high
    if not (n >= high >= low >= window):
        return [max(1, round(budget))] * layers
    return [round(high - layer * (high - low) / (layers - 1)) for layer in range(layers)]


def lagkv(keys: torch.Tensor, values: torch.Tensor, sinks: int, lag: int, cross: bool) -> list[float]:
    """LagKV's scores of one head's held tokens (keys, values [K, dim]), written again from the paper's definition as
    kvpress implements it: partitions of ``lag`` after the sinks, each normalised by the next one's per-feature
    range; the std over features, softmaxed in the partition, key and value averaged; ranks unless ``cross``."""
    n = len(keys)
    if n < sinks + 2 * lag:
        return [1.0] * sinks + [i / (n - sinks) for i in range(n - sinks)] if n > sinks else [1.0] * n
    end = sinks + (n - sinks) // lag * lag
    parts = (end - sinks) // lag
    scores = []
    for p in range(parts - 1):
        own = slice(sinks + p * lag, sinks + (p + 1) * lag)
        ref = slice(sinks + (p + 1) * lag, sinks + (p + 2) * lag)
        both = []
        for x in (keys, values):
            low, high = x[ref].min(0).values, x[ref].max(0).values
            both.append(torch.softmax(((x[own] - low) / (high - low)).std(-1), -1))
        part = (both[0] + both[1]) / 2
        scores += (part.argsort().argsort() / lag).tolist() if not cross else part.tolist()
    return [1.0] * sinks + scores + [1.0] * (n - sinks - len(scores))


def _rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., seq, dim] (rotate_half layout, every dim rotary) by per-position deltas [seq]."""
    angles = delta.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@torch.no_grad()
def scored_logprobs(model, ids: torch.Tensor, policy: str, start: int, recent: int, heavy: int,
                    positions: str, evict_every: int = 1, params: dict | None = None,
                    rotate: Callable | None = None, trace: list | None = None,
                    snapkv_votes: str = "scale") -> torch.Tensor:
    """``params``: the policy's own (snapkv: ``window_size``, ``kernel_size``; duo: ``streaming`` [layers][heads] of
    bools, ``sink_size``, ``recent_size``: the pattern read by hand). ``rotate(x, delta, layer)``
    (shifted positions): head vectors ``x`` [..., seq, dim] of decoder layer ``layer`` moved by per-position
    deltas [seq]; by default a rotate_half RoPE over the whole head with ``model.model.rotary_emb.inv_freq``
    (the Llama layout). A model whose keys carry no rotation (learned absolute positions) passes the identity.
    ``trace``: a list that gets, after every step, the tokens each head of each layer holds ([layers][heads]).
    ``snapkv_votes``: the window's attention SnapKV pools (and observed_attention sums): ``scale`` (logits times the
    model's own attention scaling, no soft-cap: docs/methods.md), ``kvpress`` (times 1/sqrt(head_dim), kvpress's
    fixed scale) or ``model`` (the model's own weights: its scaling and soft-cap)."""
    params = params or {}
    capacity = start + recent + heavy
    if positions == "shifted" and rotate is None:
        inv_freq = model.model.rotary_emb.inv_freq

        def rotate(x, delta, layer):
            return _rotate(x, delta, inv_freq)
    visible: dict = {}  # (layer, head, s) -> tokens row s attends to
    held: dict = {}  # layer -> per key/value head, the tokens held (set up at the layer's first call)
    totals: dict = {}  # h2o: (layer, head) -> {token: attention accumulated while held}
    slot: list = []  # shifted: the position token s was read at (the tokens its head held before it)
    last: dict = {}  # layer -> (weights [group, K], keys [K, dim], values [K, dim]) per kv head, of the newest row
    every_row: dict = {}  # (layer, head, s) -> row s's weights [group, its visible tokens] (snapkv's window)
    every_dot: dict = {}  # (layer, head, s) -> row s's unscaled logits q·k, [group, its visible tokens]
    scales, dims = {}, {}  # layer -> the model's attention scaling, its head_dim
    done: dict = {}  # (layer, s) -> row s's attention output [heads, dim], computed at step s

    def vote_row(layer, h, s):
        """Row s's weights as SnapKV's window (and observed_attention) sees them (``snapkv_votes``)."""
        if snapkv_votes == "model":
            return every_row[(layer, h, s)]
        scale = scales[layer] if snapkv_votes == "scale" else dims[layer] ** -0.5
        return torch.softmax(every_dot[(layer, h, s)] * scale, -1)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer, q_len, kv_heads = module.layer_idx, query.shape[2], key.shape[1]
        group = query.shape[1] // kv_heads
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scales[layer], dims[layer] = scaling, query.shape[-1]
        heads_held = held.setdefault(layer, [[] for _ in range(kv_heads)])
        out = torch.zeros_like(query[0].transpose(0, 1))  # [q_len, heads, dim]
        for s in range(q_len - 1):  # the rows of earlier steps: as their own step computed them
            out[s] = done[(layer, s)]
        rows, s = {}, q_len - 1
        for h in range(kv_heads):
            tokens = visible[(layer, h, s)] = heads_held[h] + [s]
            index = torch.tensor(tokens)
            q = query[0, h * group : (h + 1) * group, s : s + 1]  # at s's position (its slot, if shifted)
            k = key[0, h, index]  # each at its own position
            if positions == "shifted":  # from the slot each key was read at to its rank now
                k = rotate(k, torch.arange(len(tokens)) - torch.tensor(slot)[index], layer)
            every_dot[(layer, h, s)] = dot = (q @ k.T)[:, 0].float()
            logits = dot * scaling
            if kwargs.get("softcap") is not None:
                logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
            weights = torch.softmax(logits.float(), -1)
            every_row[(layer, h, s)] = weights
            out[s, h * group : (h + 1) * group] = weights @ value[0, h, index]
            # The keys as held: at their ranks (shifted) or their own positions; the norm (knorm) does not care.
            rows[h] = (weights, k, value[0, h, index])
        done[(layer, s)] = out[s].clone()
        last[layer] = rows
        return out[None], None

    def lowest(cells: dict, order) -> tuple:
        """The cell one eviction takes: the lowest score; among those within 1e-5 relative, the first by ``order``."""
        low = min(cells.values())
        return min((key for key, value in cells.items() if value <= low + 1e-5 * abs(low)), key=order)

    def adaptive(by_head: dict, held_layer: list, t: int) -> None:
        """AdaKV at an event (docs/methods.md): each head's int(C·alpha) best are safe, then the
        lowest (head, token) cells of the layer go one at a time (ties: the older token, then the lower head)
        until the heads hold C per head."""
        if (t + 1) % evict_every or sum(len(tokens) for tokens, _ in by_head.values()) <= capacity * len(by_head):
            for h, (tokens, _) in by_head.items():
                held_layer[h] = tokens
            return
        alpha = params["alpha_safeguard"]
        safe = max(1, int(capacity * alpha)) if alpha > 0 and capacity > 0 else 0
        cells = {}
        for h, (tokens, score) in by_head.items():
            mine = {(h, j): float("inf") if j < start or j > t - recent else s for j, s in zip(tokens, score)}
            rest = dict(mine)
            while len(rest) > safe:  # the safe ones are what evicting down to ``safe`` leaves
                del rest[lowest(rest, lambda key: key[1])]
            cells.update({key: float("inf") if key in rest else value for key, value in mine.items()})
        while len(cells) > capacity * len(by_head):
            del cells[lowest(cells, lambda key: (key[1], key[0]))]
        for h in by_head:
            held_layer[h] = sorted(j for head, j in cells if head == h)

    AttentionInterface.register(NAME, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    out = []
    try:
        for t in range(ids.numel() - 1):
            slot.append(len(held[0][0]) if held else 0)
            read_at = torch.tensor(slot) if positions == "shifted" else torch.arange(t + 1)
            logits = model(ids[None, : t + 1], position_ids=read_at[None], use_cache=False).logits
            out.append(torch.log_softmax(logits[0, -1].float(), -1)[ids[t + 1]])
            for layer in sorted(held):
                by_head = {}  # head_budgets=adaptive: every head's (tokens, scores), decided together
                rows, kv_heads = last[layer], len(held[layer])
                if policy == "tova":  # all heads of the layer (they hold the same tokens)
                    tova = torch.stack([rows[h][0] for h in range(kv_heads)]).mean((0, 1))
                if policy == "random":  # one draw for the layer's heads, from a generator seeded at the event
                    generator = torch.Generator().manual_seed(params.get("seed", 0))
                    draws = torch.rand(kv_heads, len(visible[(layer, 0, t)]), generator=generator)
                for h in range(kv_heads):
                    tokens = visible[(layer, h, t)]
                    weights, keys, values = rows[h]
                    if policy == "duo":  # a streaming head keeps its first sink_size and last recent_size held
                        if params["streaming"][layer][h] and (t + 1) % evict_every == 0:
                            sink, window = params["sink_size"], params["recent_size"]
                            tokens = tokens[:sink] + tokens[max(sink, len(tokens) - window):]
                        held[layer][h] = tokens
                        continue
                    if policy == "h2o":
                        total = totals.setdefault((layer, h), {})
                        for i, j in enumerate(tokens):
                            total[j] = total.get(j, 0.0) + float(weights[:, i].sum())
                        score = [total[j] for j in tokens]
                    elif policy == "tova":
                        score = tova.tolist()
                    elif policy == "knorm":
                        score = (-keys.norm(dim=-1)).tolist()
                    elif policy == "qfilter":  # minus the key's dot product with its layer's and head's filter
                        score = (-(keys @ params["q_filters"][layer, h].to(keys.dtype))).tolist()
                    elif policy == "keydiff":  # minus the cosine with the mean of the head's normalised held keys
                        anchor = (keys / keys.norm(dim=-1, keepdim=True)).mean(0)
                        score = (-(keys @ anchor) / (keys.norm(dim=-1) * anchor.norm())).tolist()
                    elif policy == "random":
                        score = draws[h].tolist()
                    elif policy == "observed_attention":  # the segment's rows, each over what it saw
                        got, seen = {}, {}
                        for row in range(t - (t % evict_every) if (t + 1) % evict_every else t + 1 - evict_every,
                                         t + 1):
                            weights = vote_row(layer, h, row)
                            for i, j in enumerate(visible[(layer, h, row)]):
                                got[j] = got.get(j, 0.0) + weights[:, i]
                                seen[j] = seen.get(j, 0) + 1
                        score = [float((got[j] / seen[j]).mean()) for j in tokens]
                    elif policy == "cur":  # kv_product leverage, normalised in local windows, then over the held
                        w = params.get("local_window_size", 16)
                        k2, v2 = (keys ** 2).sum(-1).tolist(), (values ** 2).sum(-1).tolist()
                        local = [[x[i] / sum(x[i - i % w : i - i % w + w]) for i in range(len(x))] for x in (k2, v2)]
                        product = [a * b for a, b in zip(*local)]
                        score = [p / sum(product) for p in product]
                        score[: params.get("num_sinks", 4)] = [1.0] * min(params.get("num_sinks", 4), len(score))
                    elif policy == "lagkv":
                        score = lagkv(keys, values, params.get("n_sink", 4), params.get("lag_size", 128),
                                      params.get("cross_scoring", False))
                    elif policy == "snapkv":
                        # Row s of the segment saw the held tokens and the segment up to s: the window's last w rows
                        # all see the tokens before the window, the first n - w of their visible lists.
                        w, kernel, n = params["window_size"], params["kernel_size"], len(tokens)
                        if n - w > 0:
                            window = [vote_row(layer, h, s) for s in range(t - w + 1, t + 1)]
                            votes = torch.stack([row[:, : n - w] for row in window]).mean(0)  # [group, n - w]
                            pooled = torch.nn.functional.avg_pool1d(votes[:, None], kernel, 1, kernel // 2,
                                                                    count_include_pad=True)[:, 0].mean(0)
                            score = pooled.tolist() + [float("inf")] * w
                        else:
                            score = [float("inf")] * n
                    else:
                        raise ValueError(policy)
                    kept = capacity
                    if params.get("head_budgets") == "adaptive":
                        by_head[h] = (tokens, score)
                        continue
                    if params.get("layer_budgets") == "pyramid":
                        kept = pyramid(t + 1, len(held), capacity, params["window_size"], params["beta"])[layer]
                    while len(tokens) > kept and (t + 1) % evict_every == 0:
                        # Protected: the sinks and the last W tokens; ties (within a relative 1e-5: float
                        # rounding) go to the older token. One at a time, each the lowest left.
                        candidates = [i for i, j in enumerate(tokens) if j >= start and j <= t - recent]
                        low = min(score[i] for i in candidates)
                        victim = min(i for i in candidates if score[i] <= low + 1e-5 * abs(low))
                        tokens = tokens[:victim] + tokens[victim + 1 :]
                        score = score[:victim] + score[victim + 1 :]
                    held[layer][h] = tokens
                if by_head:
                    adaptive(by_head, held[layer], t)
            if trace is not None:
                trace.append([[len(tokens) for tokens in held[layer]] for layer in sorted(held)])
    finally:
        model.set_attn_implementation(previous)
    return torch.stack(out)
