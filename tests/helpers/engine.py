"""Shortcuts to the engine's paths for tests: the token loop (the reference) and the chunked path."""

from __future__ import annotations

import dataclasses

from helpers.reference import lm_eval_words, word_perplexity
from streaming_lm.rolling import score
from streaming_lm.settings import StreamingSettings
from streaming_lm.rotary import find_rotary


def score_stream(model, ids, settings: StreamingSettings, shift):
    """The token loop (one token per pass), whatever method the settings name."""
    return score(model, ids, dataclasses.replace(settings, method="token", stride=None), shift)


def score_stream_chunked(model, ids, settings: StreamingSettings, shift, chunk_size: int):
    """The chunked path with ``chunk_size`` tokens per pass."""
    return score(model, ids, dataclasses.replace(settings, method="chunked", chunk_size=chunk_size, stride=None), shift)


def token_loop_loglikelihood(lm, text: str) -> float:
    """What ``streaming_hf`` (``lm``, a ``StreamingHFLM``) must report for a rolling request on ``text``: the
    token loop's summed log-likelihood of the stream lm-eval builds, the prefix token then the text's tokens."""
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    return float(score_stream(lm.model, ids, lm.streaming, find_rotary(lm.model)).logprobs.double().sum())


def token_loop_word_perplexity(lm, texts) -> float:
    """lm-eval's ``word_perplexity`` of a rolling task on ``texts`` (its documents' targets), from the token loop."""
    return word_perplexity([token_loop_loglikelihood(lm, text) for text in texts], [lm_eval_words(t) for t in texts])
