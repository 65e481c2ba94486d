"""A deliberately naive reference for scored eviction policies (shared/docs/eviction-policies.md).

Nothing here imports streaming_lm. Step t re-runs the model over the whole prefix x_0..x_t with an eager
attention function written here: row s of layer l, head h attends exactly to the tokens that head held
before step s plus s itself, at their original positions or (shifted) at their ranks 0..|K|-1, so every
key and value is the one computed at its own step. Row t's softmax weights then score the held tokens,
and the lowest-scored unprotected token of each head (or layer) is dropped, again until C are left, after
every ``evict_every`` steps (docs/semantics.md, "Events"; between them nothing is dropped).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "test_scored_reference"


def pyramid(n: int, layers: int, budget: int, window: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets for a token budget (shared/docs/compression-methods.md), written again here."""
    low = budget / beta
    high = 2 * budget - low
    if high >= n - window:
        high = n - window
        low = 2 * budget - high
    if not (n >= high >= low >= window):
        return [max(1, round(budget))] * layers
    return [round(high - layer * (high - low) / (layers - 1)) for layer in range(layers)]


def _rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., seq, dim] (rotate_half layout, every dim rotary) by per-position deltas [seq]."""
    angles = delta.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@torch.no_grad()
def scored_logprobs(model, ids: torch.Tensor, policy: str, start: int, recent: int, heavy: int,
                    positions: str, evict_every: int = 1, params: dict | None = None) -> torch.Tensor:
    """``params``: the policy's own (snapkv: ``window_size``, ``kernel_size``)."""
    params = params or {}
    capacity = start + recent + heavy
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    group = config.num_attention_heads // kv_heads
    inv_freq = model.model.rotary_emb.inv_freq
    visible: dict = {}  # (layer, head, s) -> tokens row s attends to
    held = [[[] for _ in range(kv_heads)] for _ in range(layers)]
    totals = [[{} for _ in range(kv_heads)] for _ in range(layers)]  # h2o: accumulated attention per token
    last: dict = {}  # layer -> (weights per kv head [group, K], keys per kv head [K, dim]) of the newest row
    every_row: dict = {}  # (layer, head, s) -> row s's weights [group, its visible tokens] (snapkv's window)

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer, q_len = module.layer_idx, query.shape[2]
        out = torch.zeros_like(query[0].transpose(0, 1))  # [q_len, heads, dim]
        rows = {}
        for h in range(kv_heads):
            for s in range(q_len):
                tokens = visible[(layer, h, s)]
                index = torch.tensor(tokens)
                q = query[0, h * group : (h + 1) * group, s : s + 1]  # rotated at s by the model
                k = key[0, h, index]  # rotated at their own indices
                if positions == "shifted":
                    q = _rotate(q, torch.tensor([len(tokens) - 1 - s]), inv_freq)
                    k = _rotate(k, torch.arange(len(tokens)) - index, inv_freq)
                logits = (q @ k.T)[:, 0] * scaling
                if kwargs.get("softcap") is not None:
                    logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
                weights = torch.softmax(logits.float(), -1)
                every_row[(layer, h, s)] = weights
                out[s, h * group : (h + 1) * group] = weights @ value[0, h, index]
                if s == q_len - 1:
                    rows[h] = (weights, key[0, h, index])
        last[layer] = rows
        return out[None], None

    def lowest(cells: dict, order) -> tuple:
        """The cell one eviction takes: the lowest score; among those within 1e-5 relative, the first by ``order``."""
        low = min(cells.values())
        return min((key for key, value in cells.items() if value <= low + 1e-5 * abs(low)), key=order)

    def adaptive(by_head: dict, held_layer: list, t: int) -> None:
        """AdaKV at an event (shared/docs/compression-methods.md): each head's int(C·alpha) best are safe, then the
        lowest (head, token) cells of the layer go one at a time (ties: the older token, then the lower head)
        until the heads hold C per head."""
        if (t + 1) % evict_every or sum(len(tokens) for tokens, _ in by_head.values()) <= capacity * kv_heads:
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
        while len(cells) > capacity * kv_heads:
            del cells[lowest(cells, lambda key: (key[1], key[0]))]
        for h in by_head:
            held_layer[h] = sorted(j for head, j in cells if head == h)

    AttentionInterface.register(NAME, attention)
    previous = config._attn_implementation
    model.set_attn_implementation(NAME)
    out = []
    try:
        for t in range(ids.numel() - 1):
            for layer in range(layers):
                for h in range(kv_heads):
                    visible[(layer, h, t)] = held[layer][h] + [t]
            logits = model(ids[None, : t + 1], position_ids=torch.arange(t + 1)[None], use_cache=False).logits
            out.append(torch.log_softmax(logits[0, -1].float(), -1)[ids[t + 1]])
            for layer in range(layers):
                by_head = {}  # head_budgets=adaptive: every head's (tokens, scores), decided together
                rows = last[layer]
                if policy == "tova":  # all heads of the layer (they hold the same tokens)
                    tova = torch.stack([rows[h][0] for h in range(kv_heads)]).mean((0, 1))
                for h in range(kv_heads):
                    tokens = visible[(layer, h, t)]
                    weights, keys = rows[h]
                    if policy == "h2o":
                        for i, j in enumerate(tokens):
                            totals[layer][h][j] = totals[layer][h].get(j, 0.0) + float(weights[:, i].sum())
                        score = [totals[layer][h][j] for j in tokens]
                    elif policy == "tova":
                        score = tova.tolist()
                    elif policy == "knorm":
                        score = (-keys.norm(dim=-1)).tolist()
                    elif policy == "snapkv":
                        # Row s of the segment saw the held tokens and the segment up to s: the window's last w rows
                        # all see the tokens before the window, the first n - w of their visible lists.
                        w, kernel, n = params["window_size"], params["kernel_size"], len(tokens)
                        if n - w > 0:
                            votes = torch.stack([every_row[(layer, h, s)][:, : n - w]
                                                 for s in range(t - w + 1, t + 1)]).mean(0)  # [group, n - w]
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
                        kept = pyramid(t + 1, layers, capacity, params["window_size"], params["beta"])[layer]
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
    finally:
        model.set_attn_implementation(previous)
    return torch.stack(out)
