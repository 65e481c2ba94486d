"""Sliding window with re-computation (``method="recompute"``): no cache, a fresh pass per window.

The StreamingLLM paper's quality ceiling for a budget of C tokens, and, with ``stride``, the
strided perplexity of Hugging Face's "perplexity of fixed-length models" guide. Position ``i``
of a stream predicts ``x_{i+1}``; the positions are scored in groups (docs/semantics.md):

- the first group is positions ``0 .. min(C, n-1) - 1``, scored by one dense pass over them;
- every later group is ``stride`` consecutive positions (the last may be shorter), scored by one
  dense pass over the window ending at the group's last position ``e``: the first ``S`` tokens of
  the stream, then ``x_{e-W+1} .. x_e``, at positions ``0 .. C-1``.

With ``stride = W`` and ``S = 0`` these are exactly the windows of lm-eval's ``hf`` rolling
log-likelihood with ``max_length = C``. Windows of equal length are batched.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from .scoring import StreamScore, check_evicted, forward_takes, target_logprobs
from .settings import StreamingSettings


def prediction_groups(n: int, settings: StreamingSettings) -> list[tuple[int, int]]:
    """The ranges ``[a, b)`` of positions scored by one pass each, for a stream of ``n`` tokens."""
    last = n - 1  # positions 0 .. n-2 predict a token
    if last <= 0:
        return []
    first = min(settings.capacity, last)
    return [(0, first)] + [(a, min(a + settings.stride, last)) for a in range(first, last, settings.stride)]


def window_index(end: int, settings: StreamingSettings) -> torch.Tensor:
    """Stream indices of the window whose last token is ``x_end``: the sinks, then the ``W`` tokens up to ``end``."""
    start, recent = settings.start_size, settings.recent_size
    if end < settings.capacity:
        return torch.arange(end + 1)  # the stream so far fits: a dense prefix
    return torch.cat((torch.arange(start), torch.arange(end - recent + 1, end + 1)))


def _logits(model, windows: torch.Tensor, keep: int, can_keep: bool) -> torch.Tensor:
    """float32 logits of the last ``keep`` positions of each window ([B, keep, vocab]); no cache.

    ``can_keep``: the forward takes ``logits_to_keep`` (looked up once per stream by the caller).
    """
    positions = torch.arange(windows.shape[1], device=windows.device).expand_as(windows)
    kwargs = {"logits_to_keep": keep} if can_keep else {}
    logits = model(input_ids=windows, position_ids=positions, use_cache=False, **kwargs).logits
    return logits[:, -keep:].float()


@torch.inference_mode()
def score_stream_recompute(
    model,
    token_ids,
    settings: StreamingSettings,
    batch_size: int = 1,
    progress: bool = False,
    first_scored: int = 0,
) -> StreamScore:
    """Log-probabilities of ``token_ids[1:]`` under sliding-window re-computation.

    Only groups holding a position ``>= first_scored`` are computed (a continuation after a
    context); the entries before it are NaN. ``batch_size`` windows run per forward pass.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).to(model.device)
    n = ids.numel()
    logprobs = torch.full((max(n - 1, 0),), float("nan"), dtype=torch.float32)
    greedy = torch.zeros(max(n - 1, 0), dtype=torch.bool)
    groups = [(a, b) for a, b in prediction_groups(n, settings) if b > first_scored]
    can_keep = forward_takes(model, "logits_to_keep")

    def record(a: int, b: int, logits: torch.Tensor) -> None:
        target = ids[a + 1 : b + 1]
        logprobs[a:b] = target_logprobs(logits, target).cpu()
        greedy[a:b] = (logits.argmax(-1) == target).cpu()

    with tqdm(total=sum(b - a for a, b in groups), disable=not progress, desc="recompute windows", leave=False) as bar:
        if groups and groups[0][0] == 0:
            # The first window: a dense pass over the start of the stream, every position scored.
            a, b = groups.pop(0)
            record(a, b, _logits(model, ids[None, :b], b, can_keep)[0])
            bar.update(b - a)
        # Every later window holds exactly C tokens, so they batch without padding.
        for i in range(0, len(groups), batch_size):
            batch = groups[i : i + batch_size]
            windows = torch.stack([ids[window_index(b - 1, settings).to(ids.device)] for _, b in batch])
            logits = _logits(model, windows, max(b - a for a, b in batch), can_keep)
            for row, (a, b) in enumerate(batch):
                record(a, b, logits[row, logits.shape[1] - (b - a) :])
            bar.update(sum(b - a for a, b in batch))
    evicted = max(0, n - settings.capacity)  # tokens that have left the window by the end
    check_evicted(n, evicted, settings)
    return StreamScore(logprobs, evicted, min(n, settings.capacity), greedy)


class RecomputeStream:
    """``Stream``'s interface for generation: every read token's logits from the window ending at it.

    That is the last group of any stride, so generation does not depend on ``stride``. Nothing
    but the token ids is kept between passes.
    """

    def __init__(self, model, settings: StreamingSettings):
        self.model, self.settings = model, settings
        self.ids = torch.empty(0, dtype=torch.long, device=model.device)
        self.max_held = 0
        self._can_keep = forward_takes(model, "logits_to_keep")

    @property
    def n(self) -> int:
        return self.ids.numel()

    @property
    def evicted(self) -> int:
        return max(0, self.n - self.settings.capacity)

    def fork(self) -> RecomputeStream:
        other = copy.copy(self)  # ids are never mutated in place, so sharing them is safe
        return other

    @torch.inference_mode()
    def read(self, ids, last_only: bool = False) -> torch.Tensor:
        """Read tokens and return the float32 logits after each ([len, vocab]; [1, vocab] if last_only)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.model.device)
        if ids.numel() == 0:
            raise ValueError("read() needs at least one token")
        first = self.n
        self.ids = torch.cat((self.ids, ids))
        ends = range(self.n - 1, self.n) if last_only else range(first, self.n)
        out = []
        for end in ends:
            window = self.ids[window_index(end, self.settings).to(self.ids.device)]
            out.append(_logits(self.model, window[None], 1, self._can_keep)[0])
            self.max_held = max(self.max_held, window.numel())
        return torch.cat(out)

    def step(self, token: int) -> torch.Tensor:
        return self.read([token], last_only=True)[-1]
