"""``streaming_hf``: lm-eval's ``HFLM`` scored through a sink+window streaming cache.

Thin adapter: it maps lm-eval requests onto the engine (``streaming_lm.scoring``) and
leaves loading, tokenisation and everything else to ``HFLM``.
"""

from __future__ import annotations

import logging

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import resolve_max_length
from tqdm.auto import tqdm

from . import settings as settings_mod
from .cache import check_model_supported
from .rotary import find_rotary
from .scoring import score

# Under lm-eval's logger, so its CLI shows our lines with its own.
eval_logger = logging.getLogger("lm_eval.models.streaming_hf")

MODEL_NAME = "streaming_hf"


class StreamingHFLM(HFLM):
    """``HFLM`` whose rolling log-likelihoods come from a bounded streaming cache.

    Extra model args: ``start_size``, ``recent_size`` or ``compression_ratio``,
    ``positions`` (shifted|original), ``method`` (chunked|token), ``chunk_size``.
    Every other argument is HFLM's.
    """

    def __init__(
        self,
        pretrained,
        start_size=settings_mod.DEFAULT_START_SIZE,
        recent_size=None,
        compression_ratio=None,
        positions="shifted",
        method=settings_mod.DEFAULT_METHOD,
        chunk_size=settings_mod.DEFAULT_CHUNK_SIZE,
        **kwargs,
    ) -> None:
        # Validate before HFLM loads anything; the ratio needs max_length, known later.
        self._streaming_args = dict(
            start_size=start_size,
            recent_size=recent_size,
            compression_ratio=compression_ratio,
            positions=positions,
            method=method,
            chunk_size=chunk_size,
        )
        self.streaming = settings_mod.resolve(**self._streaming_args, max_length=kwargs.get("max_length"))
        super().__init__(pretrained, **kwargs)
        if compression_ratio is not None:
            self.streaming = settings_mod.resolve(**self._streaming_args, max_length=self.max_length)
        check_model_supported(self.model)
        self._rotary = find_rotary(self.model)
        self._evicted = 0
        eval_logger.info("streaming_hf cache: %s", self.streaming.as_dict())

    def _create_model(self, pretrained, *args, **kwargs) -> None:
        # Config and tokenizer are loaded, weights not yet: resolve the ratio budget here so a
        # ratio leaving no recent token fails before the (slow) weight load.
        if self._streaming_args["compression_ratio"] is not None:
            max_length = resolve_max_length(self.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH)
            settings_mod.resolve(**self._streaming_args, max_length=max_length)
        super()._create_model(pretrained, *args, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if str(self.batch_size) != "1":
            # Same numbers either way: each request is one stream, scored on its own.
            eval_logger.warning("streaming_hf scores one stream at a time; batch_size=%s is not used", self.batch_size)
        results = []
        show = not disable_tqdm and self.rank == 0
        for request in tqdm(requests, disable=not show, desc="streaming requests"):
            (string,) = request.args
            # One stream: the prefix token, then every token of the text, all scored but the prefix.
            tokens = [self.prefix_token_id, *self.tok_encode(string)]
            scored = score(self.model, tokens, self.streaming, self._rotary, progress=show)
            self._evicted += scored.evicted
            total = float(scored.logprobs.double().sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        eval_logger.info(
            "streaming_hf: %d requests scored with cache %s; %d tokens evicted",
            len(requests),
            self.streaming.as_dict(),
            self._evicted,
        )
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "streaming_hf does not stream loglikelihood requests yet; refusing to fall back to dense "
            "scoring. Use --model hf for this task."
        )

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "streaming_hf does not stream generate_until requests yet; refusing to fall back to dense "
            "generation. Use --model hf for this task."
        )

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["streaming"] = self.streaming.as_dict() | {"evicted_tokens": self._evicted}
        return info
