"""kvpress's wrappers of a scored method, as parameters every scored method takes (``ScoredPolicy`` appends them to a
method's own ``params``; docs/methods.md "Wrappers"):

- ``chunk_length=N`` is ChunkKV: the held tokens fall into chunks of ``N`` consecutive columns (the last one may be
  shorter); a chunk's score is the method's score summed over the key/value heads and averaged over the chunk, and
  whole chunks are kept, the same in every head. Liu et al., *ChunkKV: Semantic-Preserving KV Cache Compression for
  Efficient Long-Context LLM Inference*, 2025, https://arxiv.org/abs/2502.00299
- ``critical=true`` is CriticalKV: the method's best ``first_stage_ratio`` share of the budget stays, then every other
  token is rescored ``(score + critical_epsilon) · ‖W_o v‖₁`` (its value through the layer's output projection, the
  L1 norm averaged over the key/value head's query heads). Feng et al., *Identify Critical KV Cache in LLM Inference
  from an Output Perturbation Perspective*, 2025, https://arxiv.org/abs/2502.03805
"""

from __future__ import annotations

from ..values import as_fraction
from .lazy_torch import torch
from .params import Param
from .budgets import adaptive_head_keep, kept_count, safeguard_count
from .ties import ABSENT, evict_lowest, keep_top

WRAPPER_PARAMS = (
    Param("chunk_length", int, 0, "ChunkKV: keep whole chunks of this many held tokens, ranked by their score summed "
          "over the heads and averaged over the chunk (0: off; kvpress's default is 20)", minimum=0),
    Param("critical", bool, False, "CriticalKV: keep the first_stage_ratio share of the budget by the method's score, "
          "then rescore the rest by (score + critical_epsilon) * ||W_o v||_1"),
    Param("first_stage_ratio", float, 0.5, "CriticalKV: the share of the budget kept by the method's own score",
          minimum=0.0, check=lambda value: as_fraction("first_stage_ratio", value)),
    Param("critical_epsilon", float, 1e-4, "CriticalKV: added to the score before the output-norm rescaling "
          "(kvpress's epsilon)", minimum=0.0),
)
WRAPPERS = ("chunk_length", "critical")  # the parameters that switch a wrapper on


def check_wrappers(settings) -> None:
    """Refuse what a wrapper cannot serve, before any model loads (the argument named, with why)."""
    params = settings.policy_params
    if params["chunk_length"]:
        if params.get("head_budgets", "uniform") == "adaptive":
            raise ValueError(f"chunk_length={params['chunk_length']} (ChunkKV) keeps the same chunks in every head; "
                             "head_budgets=adaptive keeps different tokens per head: use one of the two")
        if not settings.ratio_budget and params["chunk_length"] > settings.capacity:
            raise ValueError(f"chunk_length={params['chunk_length']} is longer than the cache (C = "
                             f"{settings.capacity}): an event keeps at least one chunk; lower chunk_length")
    if not params["critical"] and (params["first_stage_ratio"] != 0.5 or params["critical_epsilon"] != 1e-4):
        raise ValueError("first_stage_ratio and critical_epsilon are CriticalKV's: give critical=true with them")


def attention_modules(model, why: str = "critical=true rescores") -> dict:
    """{layer: the attention module}, those with an output projection (``o_proj``, as kvpress reads it); ValueError
    where a layer has none (``why`` names the method that needs it)."""
    from ..forward_args import num_decoder_layers

    found = {m.layer_idx: m for m in model.modules()
             if hasattr(m, "layer_idx") and isinstance(getattr(m, "o_proj", None), torch.nn.Linear)}
    missing = sorted(set(range(num_decoder_layers(model))) - set(found))
    if missing:
        raise ValueError(f"{why} by each attention layer's output projection (o_proj); {type(model).__name__} has "
                         f"none at layers {missing[:4]}: the method does not apply to it")
    return found


def output_projections(model, why: str = "critical=true rescores") -> dict[int, torch.Tensor]:
    """{layer: the attention's output projection weight [hidden, heads · head_dim]} (``attention_modules``)."""
    return {layer: module.o_proj.weight for layer, module in attention_modules(model, why).items()}


def head_outputs(values: torch.Tensor, weight: torch.Tensor):
    """Per query head ``h``: ``(h // group, h % group, v W_oᵀ)``, the values [kv_heads, K, head_dim] of its key/value
    head through its slice of the output projection ``weight`` [hidden, heads · head_dim] (float32 [K, hidden]). One
    query head at a time, so no [heads, K, hidden] tensor; the slices are a view: no copy of W_o at each event."""
    kv_heads, _, dim = values.shape
    heads = weight.shape[1] // dim
    group = heads // kv_heads
    slices = weight.detach().view(weight.shape[0], heads, dim).permute(1, 2, 0)  # [heads, head_dim, hidden]
    for head in range(heads):
        yield head // group, head % group, values[head // group].float() @ slices[head].float()


def output_norms(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 [kv_heads, K]: ``‖v W_oᵀ‖₁`` of every held value (``head_outputs``), averaged over the key/value
    head's query heads (kvpress's ``vwl1norm``)."""
    out = torch.zeros(values.shape[:2], device=values.device)
    for kv_head, _, projected in head_outputs(values, weight):
        out[kv_head] += projected.abs().sum(-1)
    return out / (weight.shape[1] // values.shape[-1] // values.shape[0])


def critical_scores(score: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, alive: torch.Tensor,
                    first_stage: int, epsilon: float) -> torch.Tensor:
    """CriticalKV's scores of the held columns (``alive``): each head's ``first_stage`` best by the method's score
    (the tie rule, not top-k) score ``+inf``; the rest ``(score + epsilon) · output_norms``."""
    held = score.masked_fill(~alive, float("-inf"))
    first = keep_top(held, first_stage) & alive if first_stage else torch.zeros_like(alive)
    rescored = (score + epsilon) * output_norms(values, weight)
    return rescored.masked_fill(first, float("inf"))


def critical_adaptive_keep(grid: torch.Tensor, norms: torch.Tensor, absent: torch.Tensor, capacity: int,
                           alpha_safeguard: float, first_stage_ratio: float, epsilon: float) -> torch.Tensor:
    """bool [heads, n]: CriticalAdaKV (kvpress's ``CriticalAdaKVPress``) on a layer's (head, token) grid of the
    method's scores (``absent`` cells, tokens a head does not hold, lowest; protected ``+inf``). AdaKV's allocation on
    the scores gives each head its budget ``b``; each head's ``max(safe, int(b · first_stage_ratio))`` best tokens
    by the scores stay (``safe``: AdaKV's safeguard, ``int(C · alpha)``, at least 1), then its others are rescored
    ``(score + epsilon) · norms`` and the head keeps its ``b`` best."""
    _, budgets = adaptive_head_keep(grid, capacity, alpha_safeguard)
    n = grid.shape[1]
    first = torch.clamp((budgets * first_stage_ratio).long(), min=min(safeguard_count(capacity, alpha_safeguard), n))
    staged = evict_lowest(grid, n - first)
    rescored = ((grid + epsilon) * norms).masked_fill(staged | grid.isinf(), float("inf"))
    return evict_lowest(rescored.masked_fill(absent, ABSENT), n - budgets)


def first_stage_budget(policy, n: int, capacity: int) -> int:
    """The tokens CriticalKV's first stage keeps: kvpress's ``int((1 − r) · n · first_stage_ratio)`` (at least 1) under
    a compression ratio, else ``int(C · first_stage_ratio)``."""
    if policy.first_stage_ratio == 0:
        return 0
    settings = policy.settings
    if settings.ratio_budget:
        return max(1, int((1 - settings.compression_ratio) * n * policy.first_stage_ratio))
    return max(1, int(capacity * policy.first_stage_ratio))


def chunk_keep(score: torch.Tensor, protected: torch.Tensor, alive: torch.Tensor, chunk_length: int,
               capacity: int, ratio: float | None, strict: bool) -> torch.Tensor:
    """bool [kv_heads, K]: ChunkKV's event on the held columns (``alive``: as many in every head). Chunks of
    ``chunk_length`` held columns (the last may be shorter) score their summed-over-heads mean (a protected token
    ``+inf``); under a ratio ``max(1, int(chunks · (1 − r)))`` chunks stay (kvpress's count), under a token budget
    ``capacity // chunk_length``; the lowest chunks go by the tie rule."""
    kv_heads = alive.shape[0]
    index = alive.nonzero()[:, 1].reshape(kv_heads, -1)  # each head's held columns, in token order
    guarded = protected.gather(1, index).any(0)  # [n]
    held = score.gather(1, index).sum(0).masked_fill(guarded, float("inf"))  # [n]
    n = held.numel()
    chunks = -(-n // chunk_length)
    padded = torch.nn.functional.pad(held, (0, chunks * chunk_length - n))
    sizes = torch.full((chunks,), chunk_length, device=held.device)
    sizes[-1] = n - (chunks - 1) * chunk_length
    chunk_scores = padded.reshape(chunks, chunk_length).sum(1) / sizes
    if ratio is not None:
        kept = kept_count(chunks, ratio)  # kvpress's count, of chunks
    else:  # whole chunks within C (check_wrappers: chunk_length <= C)
        kept = min(capacity // chunk_length, chunks)
    # CriticalKV's first stage scores +inf too, but may go: only the protected tokens' chunks must stay
    if strict and int(torch.nn.functional.pad(guarded, (0, chunks * chunk_length - n)).reshape(chunks, -1).any(1)
                      .sum()) > kept:
        raise RuntimeError(f"chunk_length={chunk_length}: the chunks holding protected tokens exceed the layer's "
                           f"budget of {capacity}: lower start_size or recent_size, or raise heavy_size")
    chunk_kept = evict_lowest(chunk_scores[None], chunks - kept)[0]
    column_kept = chunk_kept.repeat_interleave(chunk_length)[:n]
    return torch.zeros_like(alive).scatter(1, index, column_kept.expand(kv_heads, -1))
