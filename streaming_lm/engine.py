"""The engine for one model and one cache setting: the method bound to the model once (Expected Attention's rotary,
duo's pattern read once), every request type entered here. The adapter (lm_eval_model.py) and the tools hold one;
it knows nothing of lm-eval."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .continuation import score_requests
from .generation import GenerationRequest, generate_requests
from .methods import policy_for
from .rolling import score
from .rotary import RotaryShift, find_rotary
from .settings import StreamingSettings
from .streams import open_stream


class Engine:
    """``model`` read through ``settings`` (None: the dense baseline); its rotary (``rotary.find_rotary``) found once;
    ``tokenizer`` for a method that builds a prompt of its own (KVzip's replay)."""

    def __init__(self, model, settings: StreamingSettings | None, tokenizer=None):
        self.model, self.settings = model, settings
        self.shift: RotaryShift | None = find_rotary(model)
        # What the method needs of the model (Expected Attention: RoPE; duo: a pattern of its shape), refused now.
        self.policy = None if settings is None else policy_for(settings, model, self.shift, tokenizer)

    def open(self, batch_size: int = 1):
        """An empty stream (``streams.open_stream``) with the bound method."""
        return open_stream(self.model, self.settings, self.shift, batch_size, self.policy)

    def score(self, token_ids, progress: bool = False, batch_size: int = 1):
        """The rolling log-likelihood of one stream (``rolling.score``)."""
        return score(self.model, token_ids, self.settings, self.shift, progress, batch_size, self.policy)

    def score_requests(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], share: bool = True,
                       on_result: Callable | None = None):
        """Every ``(context, continuation)`` (``continuation.score_requests``)."""
        return score_requests(self.model, requests, self.settings, self.shift, share, on_result, self.policy)

    def generate_requests(self, requests: Sequence[GenerationRequest], share: bool = True,
                          on_result: Callable | None = None):
        """Every generation request (``generation.generate_requests``)."""
        return generate_requests(self.model, requests, self.settings, self.shift, share, on_result, self.policy)
