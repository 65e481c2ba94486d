"""The execution-path protocol: a stream read incrementally from an empty state.

Rolling scoring (``score``), continuations (``score_continuations``) and generation (``read`` then
``step``) all enter through it; each path implements the same interface with the same numbers
(docs/semantics.md).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..forward_args import cache_kwarg, forward_takes
from ..loglik import ContinuationScore, StreamScore, check_evicted, most_held, target_logprobs
from ..methods import policy_for
from ..positions import check_positions_fit, position_limit
from .attention import attention_function, run_pass


class Stream(ABC):
    """One stream: tokens ``x_0 .. x_{n-1}`` read so far, and whatever state the path keeps of them."""

    model = None
    settings = None  # StreamingSettings; None for the dense baseline
    n: int = 0  # tokens read so far: the next token is x_n
    max_held: int = 0  # the most tokens any layer held between passes (recompute: tokens in a window)
    held_per_layer: tuple[int, ...] = ()  # the most tokens each layer held between passes (cache paths)
    held_per_head: tuple[tuple[int, ...], ...] = ()  # the most each key/value head of each layer held (cache paths)
    uses_batch_size = False  # whether passes of one stream can be batched (recompute windows)

    @property
    @abstractmethod
    def evicted(self) -> int:
        """Tokens evicted so far."""

    @abstractmethod
    def read_passes(self, ids, last_only: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Read tokens ``x_n ..``, one forward pass at a time: yields ``(offset in ids, float32 logits)``.

        A caller that reduces each pass's logits at once never holds more than one pass of them.
        With ``last_only`` a pass yields the logits of its last token only.
        """

    @abstractmethod
    def step(self, token: int) -> torch.Tensor:
        """Read one token through the model's own attention; its float32 logits [vocab] (decoding)."""

    @abstractmethod
    def kv_bytes(self) -> int:
        """Bytes of keys and values held right now."""

    def kv_allocated_bytes(self) -> int:
        """Bytes of keys and values allocated right now (a preallocated decode cache holds less)."""
        return self.kv_bytes()

    def fork(self) -> Stream:
        """An independent copy of this state (keys and values copied; the model and tables shared)."""
        shared = {id(self.model): self.model, **{id(v): v for v in self._shared()}}
        return copy.deepcopy(self, memo=shared)

    def _shared(self) -> Sequence:
        return ()

    @torch.inference_mode()
    def read(self, ids, last_only: bool = False) -> torch.Tensor:
        """Read tokens and return the float32 logits after each ([len, vocab]; [1, vocab] if last_only)."""
        out = [logits for _, logits in self.read_passes(ids, last_only)]
        self._last = out[-1][-1:]
        return self._last if last_only else torch.cat(out)

    def extend(self, ids) -> None:
        """Read context tokens of which only the last one's logits matter (``last_logits``): a context, or a
        piece of one shared by several requests (``streams.shared``)."""
        self.read(ids, last_only=True)

    def kept_per_layer(self) -> tuple[float, ...]:
        """evict_every=context: tokens each layer held right after the event (per head on average); () otherwise."""
        return ()

    def last_logits(self) -> torch.Tensor:
        """The float32 logits [1, vocab] after the last token read by ``read`` or ``extend``."""
        last = getattr(self, "_last", None)
        if last is None:
            raise RuntimeError("last_logits() before any token was read")
        return last

    @torch.inference_mode()
    def score(self, ids, progress: bool = False) -> StreamScore:
        """log p(ids[t+1]) for every t, reading ``ids[:-1]`` (rolling log-likelihood of one whole stream)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.model.device)
        logprobs = torch.empty(max(ids.numel() - 1, 0), dtype=torch.float32)
        if ids.numel() > 1:
            with tqdm(total=ids.numel() - 1, disable=not progress, desc="streaming tokens", leave=False) as bar:
                for a, logits in self.read_passes(ids[:-1]):
                    b = a + logits.shape[0]
                    logprobs[a:b] = target_logprobs(logits, ids[a + 1 : b + 1]).cpu()
                    bar.update(b - a)
        return StreamScore(logprobs, self.evicted, self.max_held, held_per_layer=tuple(self.held_per_layer),
                           held_per_head=tuple(self.held_per_head))

    @torch.inference_mode()
    def score_continuations(self, context, continuations) -> list[ContinuationScore]:
        """Each continuation after ``context``, as the stream ``tokens read so far + context + continuation``:
        the context is read once, every continuation from a fork of that state. ``context`` may be empty
        when the stream has read it already (``streams.shared``); the stream is left after the context."""
        if len(context):
            self.extend(context)
        last = self.last_logits()  # predicts the first continuation token
        results = []
        for continuation in continuations:
            branch, logits = self, last
            if len(continuation) > 1:
                # Reading mutates the state: each continuation gets its own copy of the context state.
                branch = self.fork()
                logits = torch.cat((last, branch.read(continuation[:-1])))
            results.append(continuation_score(logits, continuation, branch.evicted, self.n, self.settings,
                                              branch.held_per_layer, self.kept_per_layer(), branch.held_per_head))
        return results


# Continuations of one context read in one pass (a batch): that many copies of the context state while
# they are read (docs/requests.md's memory bound).
CONTINUATION_ROWS = 8


def score_batched(stream, context, continuations, evicted_after, ahead=()) -> list[ContinuationScore]:
    """``Stream.score_continuations`` for a path that reads rows (``stream._read_rows``: [B, L] token ids, yielding
    ``(offset, float32 logits [B, q, vocab])``) from a state whose cache expands to a batch (``expand_batch``): the
    continuations of a context are read together, up to ``CONTINUATION_ROWS`` per forward pass as the rows of a batch
    (right-padded: a row's padding comes after its tokens, so no real token sees it). A pass of a few tokens costs
    about as much as reading the weights once, so this is what makes multiple choice fast; the numbers are the
    one-row ones to float rounding (other matmul shapes), as chunking is. ``evicted_after(n)``: tokens a row's own
    stream evicted after ``n`` tokens (its padding, read after it, is not its). ``ahead``: context tokens not read yet
    that every row reads before its continuation (the context regime's question after the event, where nothing is
    evicted: one pass fewer per context)."""
    if len(context):
        stream.extend(context)
    ahead = list(ahead)
    last, n = (None if ahead else stream.last_logits()), stream.n + len(ahead)
    kept = stream.kept_per_layer()
    results: list = [None] * len(continuations)
    # With tokens ahead every continuation is a row (its first token is predicted by the last of them).
    longer = sorted((i for i, c in enumerate(continuations) if ahead or len(c) > 1),
                    key=lambda i: -len(continuations[i]))
    for i, continuation in enumerate(continuations):
        if not ahead and len(continuation) == 1:
            results[i] = continuation_score(last, continuation, stream.evicted, n, stream.settings,
                                            stream.held_per_layer, kept, stream.held_per_head)
    for start in range(0, len(longer), CONTINUATION_ROWS):
        batch = longer[start : start + CONTINUATION_ROWS]  # longest first: rows of similar length together
        width = len(continuations[batch[0]]) - 1
        rows = torch.tensor([[*ahead, *c[:-1], *[c[0]] * (width + 1 - len(c))]
                             for c in (continuations[i] for i in batch)], dtype=torch.long, device=stream.model.device)
        branch = stream.fork()
        branch.cache.expand_batch(len(batch))
        logits = torch.cat([out for _, out in branch._read_rows(rows)], dim=1)
        # The longest row's (rows read alike; padding never reads past it).
        held, per_head = branch.held_per_layer, branch.held_per_head
        del branch  # B copies of the state: gone before the next batch
        for r, i in enumerate(batch):
            continuation = continuations[i]
            predicted = logits[r, len(ahead) - 1 : len(ahead) + len(continuation) - 1] if ahead else \
                torch.cat((last, logits[r, : len(continuation) - 1]))
            results[i] = continuation_score(predicted, continuation, evicted_after(n + len(continuation) - 1), n,
                                            stream.settings, held, kept, per_head)
    return results


def continuation_score(logits, continuation, evicted: int, n_context: int, settings,
                       held_per_layer=(), kept_per_layer=(), held_per_head=()) -> ContinuationScore:
    target = torch.as_tensor(continuation, dtype=torch.long, device=logits.device)
    if settings is not None:
        check_evicted(n_context + len(continuation), evicted, settings)
    chosen = target_logprobs(logits, target)
    return ContinuationScore(float(chosen.double().sum()), bool((logits.argmax(-1) == target).all()), evicted,
                             tuple(held_per_layer), tuple(kept_per_layer), tuple(held_per_head))


class CachedStream(Stream):
    """A path that keeps a cache storage in ``self.cache``: its accounting is the storage's."""

    cache = None

    def note_held(self) -> None:
        """After a pass: what each layer and head holds now raises ``held_per_layer``, ``held_per_head`` and
        ``max_held``, the most held."""
        held = self.cache.held_tokens()
        self.held_per_layer = most_held(self.held_per_layer, held)
        self.max_held = max(self.max_held, *held)
        self.held_per_head = most_held(self.held_per_head, self.cache.held_tokens_per_head())

    @property
    def evicted(self) -> int:
        return self.cache.evicted_tokens

    def kv_bytes(self) -> int:
        return self.cache.held_bytes()

    def kv_allocated_bytes(self) -> int:
        return self.cache.allocated_bytes()


class EvictingStream(CachedStream):
    """A stream read from empty into a cache that the settings' method trims: the token loop, the chunked paths and
    the context regime. Each builds its own storage (``new_cache``); the rest is common."""

    def __init__(self, model, settings, shift, batch_size: int = 1, policy=None):
        self.model, self.settings, self.shift = model, settings, shift
        # The method bound to the model: an engine's (bound once for every stream), or bound here.
        self.policy = policy_for(settings, model, shift) if policy is None else policy
        self._limit = position_limit(model, settings, shift is not None)
        self.n = 0
        self.max_held, self.held_per_layer, self.held_per_head = 0, (), ()
        self.cache = self.new_cache()
        self._kwargs = forward_kwargs(model, self.cache)

    @abstractmethod
    def new_cache(self):
        """The empty storage this path reads into."""

    def _shared(self):
        return (self.shift, self.policy)

    def _read_in_passes(self, rows: torch.Tensor, spans, name: str, plan, last_only: bool = False):
        """The one chunk loop of the paths that read several tokens a pass: ``rows`` ([B, L] token ids) in the
        passes ``spans`` (``(a, b)``: tokens ``a .. b-1`` of each row), every layer through the registered attention
        function ``name`` (``run_pass`` checks that each ran it); ``plan(a, b)`` (stream indices) gives the pass's
        state and its position ids [1, b - a]. Yields ``(a, float32 logits [B, q, vocab])``."""
        check_positions_fit(self.model, self.n + rows.shape[1], self._limit)
        kwargs, first = self._kwargs[last_only], self.n
        with attention_function(self.model, name):  # once around the loop: switching costs milliseconds
            for a, b in spans:
                state, positions = plan(first + a, first + b)
                logits = run_pass(self.model, name, state, input_ids=rows[:, a:b],
                                  position_ids=positions.expand(rows.shape[0], -1), **kwargs).logits
                self.note_held()
                self.n = first + b
                yield a, logits.float()


def chunk_spans(width: int, chunk: int, first: int | None = None) -> list[tuple[int, int]]:
    """Passes ``(a, b)`` over ``width`` tokens: ``chunk`` a pass, the first ``first`` long where given."""
    head = min(width, chunk if first is None else first)
    return [(0, head)] + [(a, min(a + chunk, width)) for a in range(head, width, chunk)]


def forward_kwargs(model, cache) -> tuple[dict, dict]:
    """Keyword arguments for a pass that needs every position's logits, and for one that needs the last only."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True}
    # Context tokens need no logits but the last: skip the vocabulary projection for the rest.
    return kwargs, kwargs | ({"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {})


def as_ids(ids, device) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(device)
    if ids.numel() == 0:
        raise ValueError("read() needs at least one token")
    return ids
