"""What every cache storage reports (tokens held and evicted, bytes held and allocated), and its batch expansion."""

from __future__ import annotations


class KVAccounting:
    """Mixin for a ``transformers`` ``Cache``; a storage that allocates more than it holds overrides both byte counts."""

    def held_tokens(self) -> list[int]:
        """Tokens held by each layer right now."""
        return [layer.get_seq_length() for layer in self.layers]

    def held_tokens_per_head(self) -> list[list[int]]:
        """Tokens each key/value head of each layer holds right now: its layer's count, or, where a storage pads
        heads that hold fewer (AdaKV, duo), the counts it keeps on the host (``head_counts``: no device sync); none
        for a layer that holds nothing yet (its heads are not known)."""
        out = []
        for count, layer in zip(self.held_tokens(), self.layers):
            counts = getattr(layer, "head_counts", None)
            keys = getattr(layer, "keys", None) if getattr(layer, "is_initialized", False) else None
            out.append(list(counts) if counts is not None else [] if keys is None else [count] * keys.shape[1])
        return out

    @property
    def evicted_tokens(self) -> int:
        return 0

    def held_bytes(self) -> int:
        """Bytes of keys and values held right now (every layer)."""
        return sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self.layers
            if getattr(layer, "is_initialized", False) and layer.keys is not None
        )

    def allocated_bytes(self) -> int:
        """Bytes of keys and values allocated: a growing cache allocates exactly what it holds."""
        return self.held_bytes()

    def expand_batch(self, rows: int) -> None:
        """Make a one-row cache ``rows`` rows (views: the next update writes new tensors), so that several
        continuations of one state are read as a batch (``streams.base.score_batched``)."""
        for layer in self.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                layer.keys = layer.keys.expand(rows, -1, -1, -1)
                layer.values = layer.values.expand(rows, -1, -1, -1)

    @property
    def overhead_tokens(self) -> float:
        """What the layout allocates beyond the tokens held, in tokens' worth of keys and values (declared, so
        that a check comparing it with ``allocated_bytes()`` catches a cache that grew)."""
        return 0.0
