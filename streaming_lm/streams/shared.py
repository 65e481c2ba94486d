"""Shared prefixes read once: a trie over the contexts of a run, walked with one stream forked where they diverge.

Every request of a run starts from an empty stream, so two requests whose contexts begin with the same
tokens (a few-shot prefix, the stream so far in StreamEval) would read those tokens twice. Here the
distinct contexts go into a compressed trie (an edge is the run of tokens between two branch points);
the walk reads each edge once and ``Stream.fork``s where contexts diverge, so each context ends up read
into a state equal to reading it alone (the passes over a shared piece are the same passes; only the
chunked path's chunk grid moves, docs/requests.md). What a path may share is the stream's business:
``Stream.extend`` reads a piece (recompute only records it: it keeps no cache to share).

Under ``evict_every=context`` (``read_contexts`` with a ``ContextSchedule``) the trie is over the requests' prefills
(each context minus its last ``query_size`` tokens): the dense reading is shared up to each request's own event,
each distinct prefill is compressed once, and each distinct question is read once from that compressed state.

Memory: the walk is depth first and a node's state is kept only while a child other than the one being
read is still waiting (the last child takes it over without a copy). Alive at once: one state per
branching node on the current root-to-leaf path, plus the one being read, plus the visitor's branch:
at most ``Trie.branch_depth + 2`` states, whatever the number of requests (``WalkStats.max_alive``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .base import Stream


@dataclasses.dataclass(eq=False)
class Node:
    depth: int  # tokens from the root to the end of this node's edge
    ref: tuple  # a context through this node: its edge is ref[parent.depth : depth]
    children: list[Node] = dataclasses.field(default_factory=list)
    members: list[int] = dataclasses.field(default_factory=list)  # requests whose context ends here


class Trie:
    """The distinct contexts (token ids) as a compressed trie; ``share=False`` keeps every context whole
    (one leaf per distinct context under the root: requests with identical contexts still read it once)."""

    def __init__(self, contexts: Sequence[Sequence[int]], share: bool = True):
        by_context: dict[tuple, list[int]] = {}
        for i, context in enumerate(contexts):
            if len(context) == 0:
                raise ValueError("every context needs at least one token")
            by_context.setdefault(tuple(context), []).append(i)
        self.root = Node(0, ())
        stack, previous = [self.root], ()
        # Sorted, a context's trie neighbours are adjacent: the classic stack build from longest common prefixes.
        for context in sorted(by_context):
            common = _common_prefix(previous, context) if share else 0
            popped = None
            while stack[-1].depth > common:
                popped = stack.pop()
            if stack[-1].depth < common:  # the previous context's edge splits here
                split = Node(common, context, [popped])
                stack[-1].children[-1] = split
                stack.append(split)
            leaf = Node(len(context), context, members=by_context[context])
            stack[-1].children.append(leaf)
            stack.append(leaf)
            previous = context
        self.requests = len(contexts)

    def nodes(self):
        todo = [self.root]
        while todo:
            node = todo.pop()
            yield node
            todo.extend(node.children)

    @property
    def tokens(self) -> int:
        """Tokens the walk reads: the sum of the edges."""
        return sum(child.depth - node.depth for node in self.nodes() for child in node.children)

    @property
    def branch_depth(self) -> int:
        """The most nodes with two or more children on one root-to-leaf path, the root not counted (the root
        holds no state: each of its children starts from an empty stream)."""
        deepest, todo = 0, [(child, 0) for child in self.root.children]
        while todo:
            node, branches = todo.pop()
            branches += len(node.children) > 1
            deepest = max(deepest, branches)
            todo.extend((child, branches) for child in node.children)
        return deepest


def _common_prefix(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on C-speed slice compares
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass
class WalkStats:
    requests: int  # requests walked
    contexts: int  # distinct contexts
    tokens_read: int  # context tokens read (each trie edge once)
    tokens_unshared: int  # what reading every distinct context from an empty stream would read
    max_alive: int  # most stream states alive at once (the visitor's branch included)
    forks: int


def walk(trie: Trie, open_stream: Callable[[], Stream], visit: Callable[[Stream, list[int], bool], None]
         ) -> WalkStats:
    """Read every context of ``trie`` once through shared prefixes; ``visit(stream, members, spare)`` at each.

    ``stream`` has read exactly that context (its ``last_logits()`` predict the next token); ``members`` are
    the indices of the requests with that context, in order. Unless ``spare`` (no longer context goes through
    this one, so nothing reads ``stream`` after the visit: it may take it over instead of copying it), ``visit``
    must not change ``stream``: it forks (``Stream.fork``) before reading anything, and its branch counts as one
    state alive.
    """
    stats = WalkStats(trie.requests, 0, 0, 0, 0, 0)
    # (node, the parent's stream, whether this node may take that stream over instead of forking it)
    todo: list[tuple[Node, Stream | None, bool]] = [(child, None, False) for child in reversed(trie.root.children)]
    waiting = 0  # states kept on the stack for children still to come (one per such node)
    while todo:
        node, parent, owned = todo.pop()
        if parent is None:
            stream = open_stream()
        elif owned:
            stream, waiting = parent, waiting - 1
        else:
            stream, stats.forks = parent.fork(), stats.forks + 1
        edge = node.ref[stream.n : node.depth]
        stream.extend(list(edge))
        stats.tokens_read += len(edge)
        # Alive: the waiting states, this one, and the visitor's branch.
        stats.max_alive = max(stats.max_alive, waiting + 1 + (1 if node.members else 0))
        if node.members:
            stats.contexts += 1
            stats.tokens_unshared += node.depth
            visit(stream, node.members, not node.children)
        if node.children:
            waiting += 1
        for k, child in enumerate(reversed(node.children)):
            todo.append((child, stream, k == 0))  # pushed first, popped last: the last child takes the state
        stream = parent = None  # a finished state must not outlive its turn (it would count while the next forks)
    return stats


def read_contexts(contexts: Sequence[Sequence[int]], open_stream: Callable[[], Stream],
                  visit: Callable[[Stream, list[int], bool], None], share: bool = True, schedule=None) -> WalkStats:
    """``visit(stream, members, spare)`` once per distinct context, ``stream`` having read it (``walk``'s
    contract).

    With a ``schedule.ContextSchedule``: ``stream`` has read the context's prefill and been compressed once
    (``ContextStream.compress``); the rest of the context (the question) is deferred to its next read
    (``ContextStream.defer``: the continuations' batch reads it in every row), nothing evicted after the event."""
    if not hasattr(schedule, "prefill"):
        return walk(Trie(contexts, share=share), open_stream, visit)
    split = [schedule.prefill(len(context)) for context in contexts]

    def after_prefill(stream: Stream, members: list[int], spare: bool) -> None:
        # The dense state stays for longer prefills through this node; none: compress it in place (no copy).
        compressed = stream if spare else stream.fork()
        compressed.compress()
        questions: dict[tuple, list[int]] = {}
        for i in members:
            questions.setdefault(tuple(contexts[i][split[i]:]), []).append(i)
        for k, (question, group) in enumerate(questions.items()):
            branch = compressed if k == len(questions) - 1 else compressed.fork()
            if question:
                branch.defer(list(question))  # read by the visit's next read (with the continuations: one pass)
            visit(branch, group, True)  # each branch is this visit's own

    with_prefill = [i for i, n in enumerate(split) if n > 0]
    stats = walk(Trie([contexts[i][: split[i]] for i in with_prefill], share=share), open_stream,
                 lambda stream, members, spare: after_prefill(stream, [with_prefill[m] for m in members], spare))
    short = [i for i, n in enumerate(split) if n == 0]  # contexts of at most query_size tokens: nothing to compress
    if short:
        after_prefill(open_stream(), short, True)
    return stats
