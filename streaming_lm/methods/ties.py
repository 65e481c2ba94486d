"""The tie rule of every eviction and compression, and keeping the top-B tokens by it.

Evicting ``m`` tokens is ``m`` single evictions in a row, each the lowest-scored remaining token; scores within
``TIE`` (relative) of the lowest count as tied and the oldest (leftmost column) of them goes
(docs/policies.md). A token that occurs twice has layer-0 keys equal but for float rounding, which differs
between a one-token and a many-token pass: without the margin two exact paths would break such ties apart.
"""

from __future__ import annotations


from .lazy_torch import torch

# Scores this close (relative) are a tie.
TIE = 1e-5
# A score below any real one, for (head, token) cells a head does not hold (finite: the tie margin is relative).
ABSENT = -1e30


def tied_with_lowest(score: torch.Tensor) -> torch.Tensor:
    """bool [..., n]: the scores of each row within ``TIE`` relative of the row's lowest."""
    low = score.min(dim=-1, keepdim=True).values
    return score <= low + TIE * low.abs()


def lowest_oldest(score: torch.Tensor) -> torch.Tensor:
    """long [...]: per row of ``score`` [..., n], the column of the lowest score; among scores within ``TIE``
    relative of it, the leftmost (the oldest token: columns are in token order)."""
    return tied_with_lowest(score).to(torch.uint8).argmax(dim=-1)


def _evict_row(score: torch.Tensor, count: int) -> torch.Tensor:
    """bool [n]: the tokens ``count`` single evictions by ``lowest_oldest`` leave, in O(n log n).

    In ascending order the scores fall into clusters separated by gaps wider than the tie margin. A later
    cluster is never tied with the lowest while an earlier one has a token left (``x + TIE·|x|`` grows with x),
    so whole clusters go in order and only the cluster straddling the cut needs the step-by-step rule. There,
    while a token of the lowest score remains the tied set stays put, so one round evicts, oldest first, the
    tied tokens up to the youngest of the lowest score: a round per distinct lowest value, not per token.
    """
    n = score.numel()
    keep = torch.ones(n, dtype=torch.bool, device=score.device)
    if count <= 0:
        return keep
    values, order = torch.sort(score, stable=True)
    cut = values[1:] > values[:-1] + TIE * values[:-1].abs()  # cut[i]: a cluster ends after sorted i
    if count == n or bool(cut[count - 1]):
        keep[order[:count]] = False
        return keep
    ends = torch.nonzero(cut).flatten() + 1  # sorted positions where a cluster begins
    start = int(ends[ends <= count - 1].max()) if bool((ends <= count - 1).any()) else 0
    later = ends[ends > count]
    stop = int(later.min()) if later.numel() else n
    keep[order[:start]] = False
    cluster = order[start:stop].sort().values  # the straddling cluster's columns, oldest first
    left = count - start
    while left > 0:
        rest = score[cluster]
        tied = tied_with_lowest(rest)
        tied[int((rest == rest.min()).nonzero().max()) + 1:] = False
        victims = tied.nonzero().flatten()[:left]
        keep[cluster[victims]] = False
        gone = torch.zeros_like(tied)
        gone[victims] = True
        cluster, left = cluster[~gone], left - victims.numel()
    return keep


def evict_lowest(score: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """bool [rows, n]: what each row of ``score`` [rows, n] keeps after evicting ``count`` (an int, or one per
    row) of its tokens one by one by ``lowest_oldest``. ``+inf`` scores (tokens a method always keeps) go
    last, the oldest first."""
    if score.dim() != 2:
        raise ValueError(f"score must be [rows, n]; got shape {tuple(score.shape)}")
    counts = torch.as_tensor(count).expand(score.shape[0]).tolist()
    if any(c < 0 or c > score.shape[1] for c in counts):
        raise ValueError(f"count must be in [0, {score.shape[1]}] (the tokens held); got {count}")
    return torch.stack([_evict_row(row, c) for row, c in zip(score, counts)]) if score.shape[0] else \
        torch.ones_like(score, dtype=torch.bool)


def keep_top(score: torch.Tensor, budget: int) -> torch.Tensor:
    """bool [rows, n]: each row keeps its ``budget`` best tokens by the tie rule (all of them if budget ≥ n)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an integer >= 0; got {budget!r}")
    return evict_lowest(score, max(score.shape[-1] - budget, 0))
