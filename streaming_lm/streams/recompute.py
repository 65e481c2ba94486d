"""Sliding window with re-computation (``method="recompute"``): no cache, a fresh pass per window.

The StreamingLLM paper's quality ceiling for a budget of C tokens, and, with ``stride``, the
strided perplexity of Hugging Face's "perplexity of fixed-length models" guide. Position ``i``
of a stream predicts ``x_{i+1}``; the positions are scored in groups (docs/semantics.md):

- the first group is positions ``0 .. min(C, n-1) - 1``, scored by one dense pass over them;
- every later group is ``stride`` consecutive positions (the last may be shorter), scored by one
  dense pass over the window ending at the group's last position ``e``: the policy's held set after
  reading ``x_e`` (the first ``S`` tokens, then ``x_{e-W+1} .. x_e``), at positions ``0 .. C-1``.

With ``stride = W`` and ``S = 0`` these are exactly the windows of lm-eval's ``hf`` rolling
log-likelihood with ``max_length = C``. Windows of equal length are batched (``batch_size``).
A group's window depends on where the group ends, so scoring needs the whole stream: ``score`` and
``score_continuations`` take it at once; ``read``/``step`` (generation) use the window ending at
each token read, the last group of any stride.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..methods import policy_for
from ..loglik import ContinuationScore, StreamScore, target_logprobs
from ..settings import StreamingSettings
from ..forward_args import forward_takes
from .base import Stream, as_ids


def prediction_groups(n: int, settings: StreamingSettings) -> list[tuple[int, int]]:
    """The ranges ``[a, b)`` of positions scored by one pass each, for a stream of ``n`` tokens."""
    last = n - 1  # positions 0 .. n-2 predict a token
    if last <= 0:
        return []
    first = min(settings.capacity, last)
    return [(0, first)] + [(a, min(a + settings.stride, last)) for a in range(first, last, settings.stride)]


class RecomputeStream(Stream):
    """Nothing but the token ids is kept between passes."""

    uses_batch_size = True

    def __init__(self, model, settings: StreamingSettings, shift=None, batch_size: int = 1, policy=None):
        self.model, self.settings, self.batch_size = model, settings, batch_size
        self.policy = policy_for(settings) if policy is None else policy
        self.ids = torch.empty(0, dtype=torch.long, device=model.device)
        self.max_held = 0
        self._last = None
        self._can_keep = forward_takes(model, "logits_to_keep")

    @property
    def n(self) -> int:
        return self.ids.numel()

    @property
    def evicted(self) -> int:
        return max(0, self.n - self.settings.capacity)  # tokens that have left the window

    def kv_bytes(self) -> int:
        return 0  # no cache: every window is re-encoded

    def fork(self) -> RecomputeStream:
        return copy.copy(self)  # ids are never mutated in place, so sharing them is safe

    def _window(self, ids: torch.Tensor, end: int) -> torch.Tensor:
        """The tokens of the window whose last token is ``x_end``."""
        return ids[self.policy.held_index(end + 1).to(ids.device)]

    def _logits(self, windows: torch.Tensor, keep: int) -> torch.Tensor:
        """float32 logits of the last ``keep`` positions of each window ([B, keep, vocab]); no cache."""
        positions = torch.arange(windows.shape[1], device=windows.device).expand_as(windows)
        kwargs = {"logits_to_keep": keep} if self._can_keep else {}
        logits = self.model(input_ids=windows, position_ids=positions, use_cache=False, **kwargs).logits
        self.max_held = max(self.max_held, windows.shape[1])
        return logits[:, -keep:].float()

    @torch.inference_mode()
    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        first = self.n
        self.ids = torch.cat((self.ids, ids))
        ends = range(self.n - 1, self.n) if last_only else range(first, self.n)
        for end in ends:
            yield end - first, self._logits(self._window(self.ids, end)[None], 1)[0]

    def step(self, token: int) -> torch.Tensor:
        return self.read([token], last_only=True)[-1]

    def extend(self, ids) -> None:
        """Only recorded: with no cache there is nothing to share, and the windows that score a continuation
        depend on where it ends (``score_continuations`` computes them from the whole stream)."""
        self.ids = torch.cat((self.ids, as_ids(ids, self.model.device)))
        self._last = None

    @torch.inference_mode()
    def last_logits(self) -> torch.Tensor:
        """The pass over the window ending at the last token (what ``read(..., last_only=True)`` computes)."""
        if self._last is None:
            self._last = self._logits(self._window(self.ids, self.n - 1)[None], 1)[0]
        return self._last

    @torch.inference_mode()
    def _score_groups(self, ids: torch.Tensor, first_scored: int = 0, progress: bool = False):
        """log p and argmax hits of ``ids[1:]``; only groups holding a position ``>= first_scored`` are computed
        (a continuation after a context), the entries before it are NaN / False."""
        n = ids.numel()
        logprobs = torch.full((max(n - 1, 0),), float("nan"), dtype=torch.float32)
        greedy = torch.zeros(max(n - 1, 0), dtype=torch.bool)
        groups = [(a, b) for a, b in prediction_groups(n, self.settings) if b > first_scored]

        def record(a: int, b: int, logits: torch.Tensor) -> None:
            target = ids[a + 1 : b + 1]
            logprobs[a:b] = target_logprobs(logits, target).cpu()
            greedy[a:b] = (logits.argmax(-1) == target).cpu()

        total = sum(b - a for a, b in groups)
        with tqdm(total=total, disable=not progress, desc="recompute windows", leave=False) as bar:
            if groups and groups[0][0] == 0:
                # The first window: a dense pass over the start of the stream, every position scored.
                a, b = groups.pop(0)
                record(a, b, self._logits(ids[None, :b], b)[0])
                bar.update(b - a)
            # Every later window holds exactly C tokens, so they batch without padding.
            for i in range(0, len(groups), self.batch_size):
                batch = groups[i : i + self.batch_size]
                windows = torch.stack([self._window(ids, b - 1) for _, b in batch])
                logits = self._logits(windows, max(b - a for a, b in batch))
                for row, (a, b) in enumerate(batch):
                    record(a, b, logits[row, logits.shape[1] - (b - a) :])
                bar.update(sum(b - a for a, b in batch))
        self.ids = ids
        return logprobs, greedy

    def score(self, ids, progress: bool = False) -> StreamScore:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.model.device)
        logprobs, greedy = self._score_groups(ids, progress=progress)
        return StreamScore(logprobs, self.evicted, min(self.n, self.settings.capacity), greedy)

    def score_continuations(self, context, continuations) -> list[ContinuationScore]:
        """Each continuation's entries of ``score`` on ``tokens read + context + continuation`` (whole-stream
        groups); the stream is left after the context."""
        if len(context):
            self.extend(context)
        first = self.n - 1  # the position whose logits predict the first continuation token
        results = []
        for continuation in continuations:
            branch = self.fork()
            tail = torch.as_tensor(list(continuation), dtype=torch.long, device=self.model.device)
            ids = torch.cat((self.ids, tail))
            logprobs, greedy = branch._score_groups(ids, first_scored=first)
            results.append(ContinuationScore(float(logprobs[first:].double().sum()), bool(greedy[first:].all()),
                                             branch.evicted))
        return results
