"""Rolling log-likelihood of one whole stream (lm-eval's ``loglikelihood_rolling``): token ids in, log-probabilities
out. ``continuation.py`` and ``generation.py`` are the other two request types."""

from __future__ import annotations

import torch

from .positions import check_positions_fit, position_limit
from .rotary import RotaryShift
from .loglik import StreamScore, check_evicted
from .settings import StreamingSettings
from .streams import open_stream


def score(
    model, token_ids, settings: StreamingSettings, shift: RotaryShift | None, progress: bool = False,
    batch_size: int = 1, policy=None,
) -> StreamScore:
    """log p(x_{t+1}) for every t, on the path the settings name (``batch_size``: recompute windows per pass;
    ``policy``: the settings' method bound once, ``engine.Engine``).

    Raises ``NoEvictionError`` when a stream longer than the cache evicted nothing.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).to(model.device)
    check_positions_fit(model, ids.numel(), position_limit(model, settings, shift is not None))
    scored = open_stream(model, settings, shift, batch_size, policy).score(ids, progress)
    check_evicted(ids.numel(), scored.evicted, settings)
    return scored
