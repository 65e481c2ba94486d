"""``streaming_hf``: lm-eval's ``HFLM`` scored through a sink+window streaming cache.

Thin adapter: it maps lm-eval requests onto the engine (``engine.Engine``, built once: rolling log-likelihoods,
``loglikelihood`` continuations, ``generate_until``)
and leaves loading, tokenisation and everything else to ``HFLM``.
"""

from __future__ import annotations

import atexit
import difflib
import inspect
import logging

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm.auto import tqdm

from . import settings as settings_mod
from .engine import Engine
from .loglik import most_held
from .generation import SAMPLING_DEFAULTS, GenerationRequest, greedy, sampler
from .offline_models import resolve_pretrained
from .streams import uses_batch_size
from .support import check_model_supported, check_trust_positions, fall_back_to_token_loop

# Under lm-eval's logger, so its CLI shows our lines with its own.
eval_logger = logging.getLogger("lm_eval.models.streaming_hf")


def _refuse_misspelt_args(kwargs: dict) -> None:
    """Unknown model args go on to transformers' ``from_pretrained``; a misspelt streaming one is refused here."""
    hflm = inspect.signature(HFLM.__init__).parameters
    own = (*settings_mod.KNOBS, "trust_positions")
    for key in kwargs:
        close = difflib.get_close_matches(key, own, n=1, cutoff=0.7) if key not in hflm else []
        if close:
            raise ValueError(
                f"unknown model arg {key!r}; did you mean {close[0]!r}? "
                f"streaming_hf's own args: {', '.join(own)}"
            )


def _leave_process_group() -> None:
    """At exit, while the interpreter is still whole: lm-eval never destroys the process group, and gloo's worker
    threads torn down during interpreter finalisation abort the process (SIGABRT, "terminate called without an
    active exception"; pytorch issue 190489), now and then, after the results were written."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class StreamingHFLM(HFLM):
    """``HFLM`` whose every request type is computed through a bounded streaming cache.

    Extra model args: the fields of ``StreamingSettings`` (``settings.KNOBS``: ``start_size``,
    ``recent_size`` or ``compression_ratio``, ``positions``, ``method``, ``chunk_size``, ``stride``,
    ``policy``, ``heavy_size``, ``evict_every``, ``query_size``; docs/semantics.md, docs/policies.md), the chosen policy's own
    parameters (its class's ``params``) and ``trust_positions=rope``
    (``support.check_model_supported``). Every other argument is HFLM's.
    """

    # Read common context prefixes once across a run's requests (same numbers; docs/requests.md). False
    # reads every distinct context from an empty stream: the baseline of scripts/bench_prefix.py.
    share_prefixes = True
    prefix_stats = None  # the last loglikelihood / generate_until call's streams.shared.WalkStats

    def __init__(self, pretrained, **kwargs) -> None:
        pretrained, kwargs = resolve_pretrained(pretrained, kwargs)  # pretrained=smollm2: offline_models
        # Validate before HFLM loads anything; the ratio needs max_length, known later.
        self._streaming_args = {name: kwargs.pop(name, default) for name, default in settings_mod.ARG_DEFAULTS.items()}
        # About the model, not the cache (so no settings knob): accept an unlisted RoPE type after a self-check.
        self._trust_positions = check_trust_positions(kwargs.pop("trust_positions", None))
        # The policy's own parameters (policy=<name>,<param>=<value>); a plug-in is imported and checked here.
        self._streaming_args["policy_params"] = settings_mod.pop_policy_params(self._streaming_args["policy"], kwargs)
        _refuse_misspelt_args(kwargs)
        self._max_length_arg = kwargs.get("max_length")
        self.streaming = settings_mod.resolve(**self._streaming_args, max_length=self._max_length_arg)
        self._resolved_for = self._max_length_arg
        super().__init__(pretrained, **kwargs)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
            # HFLM splits requests across `accelerate launch` processes only with 2+ GPUs; on CPU
            # (or one GPU) every process would score every request. Split them as on GPUs.
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if accelerator is not None and accelerator.num_processes > 1:
            atexit.register(_leave_process_group)
        if self._streaming_args["compression_ratio"] is not None and self.max_length != self._resolved_for:
            self.streaming = settings_mod.resolve(**self._streaming_args, max_length=self.max_length)
        # A type no chunked path serves reads with the token loop by default (same numbers), and says so.
        self.streaming, fallback = fall_back_to_token_loop(self.model, self.streaming,
                                                           self._streaming_args["method"] is not None)
        if fallback:
            eval_logger.warning(fallback)
        check_model_supported(self.model, self.streaming, self._trust_positions)
        # The method bound to the model once (what it needs of it refused now), for every request.
        self.engine = Engine(self.model, self.streaming, self.tokenizer)
        self._evicted = 0
        self._held_per_layer: tuple[int, ...] = ()  # the most each layer held, over every request
        self._held_per_head: tuple[tuple[int, ...], ...] = ()  # the most each key/value head of each layer held
        self._kept: list = [0, None]  # evict_every=context: requests, and per layer the sum held after their event
        eval_logger.info("streaming_hf cache: %s", self.streaming.as_dict())

    def _create_model(self, pretrained, *args, **kwargs) -> None:
        # Config and tokenizer are loaded, weights not yet: resolve the ratio budget here so a
        # ratio leaving no recent token fails before the (slow) weight load.
        if self._streaming_args["compression_ratio"] is not None:
            max_length = self._max_length_arg or resolve_max_length(
                self.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH
            )
            self.streaming = settings_mod.resolve(**self._streaming_args, max_length=max_length)
            self._resolved_for = max_length  # HFLM's max_length is the same unless it finds another: resolved once
        super()._create_model(pretrained, *args, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows_per_pass = self._windows_per_pass()
        results = []
        show = not disable_tqdm and self.rank == 0
        for request in tqdm(requests, disable=not show, desc="streaming requests"):
            (string,) = request.args
            scored = self.engine.score(self.rolling_ids(string), progress=show, batch_size=windows_per_pass)
            self._evicted += scored.evicted
            self._note_held(scored)
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

    def rolling_ids(self, text: str) -> list[int]:
        """One stream: the prefix token, then every token of the text (all scored but the prefix)."""
        return [self.prefix_token_id, *self.tok_encode(text)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """``loglikelihood`` after HFLM's own tokenisation (``TemplateLM.loglikelihood``).

        Each request is the stream ``context + continuation`` from an empty cache, with no
        ``max_length`` truncation; common context prefixes are read once (``continuation.score_requests``).
        """
        self._warn_batch_size()
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="streaming loglikelihood")

        def done(i, scored):
            self._evicted += scored.evicted
            self._note_held(scored)
            self.cache_hook.add_partial("loglikelihood", requests[i][0], (scored.logprob, scored.is_greedy))
            bar.update(1)

        pairs = [(context, continuation) for _, context, continuation in requests]
        scores, stats = self.engine.score_requests(pairs, self.share_prefixes, done)
        bar.close()
        self._log_done("loglikelihood", len(requests), stats)
        return [(scored.logprob, scored.is_greedy) for scored in scores]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled generation, the context streamed in and the cache trimmed after every token.

        Stop sequences, ``max_gen_toks``, EOS and post-processing are HFLM's; the context is not
        left-truncated to ``max_length - max_gen_toks``. Common context prefixes are read once.
        """
        self._warn_batch_size()
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        prepared, untils = [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            pick = self._picker(kwargs)
            # HFLM encodes generation contexts with tok_batch_encode (its add_special_tokens rules).
            context_ids = self.tok_batch_encode([context])[0][0].tolist() or [self.prefix_token_id]
            # lm-eval's stop-sequence check, given only the generated ids (it skips the context anyway).
            criteria = stop_sequences_criteria(self.tokenizer, until, 0, 1)
            stop = lambda tokens, criteria=criteria: bool(criteria(torch.tensor([tokens]), None).all())  # noqa: E731
            prepared.append(GenerationRequest(context_ids, max_gen_toks,
                                              dict(pick=pick, eos_token_ids=eos_ids, stop=stop)))
            untils.append(until)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="streaming generate_until")

        def done(i, out):
            self._evicted += out.evicted
            self._note_held(out)
            results[i] = self._postprocess(out.tokens, untils[i])
            self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
            bar.update(1)

        _, stats = self.engine.generate_requests(prepared, self.share_prefixes, done)
        bar.close()
        self._log_done("generate_until", len(requests), stats)
        return results

    def _picker(self, kwargs: dict):
        """Greedy or sampling from the normalised generation kwargs; anything else is refused."""
        do_sample = kwargs.pop("do_sample", False)
        temperature = kwargs.pop("temperature", 0.0)
        sampling = {k: kwargs.pop(k) for k in ("top_k", "top_p") if k in kwargs}
        if kwargs:
            raise NotImplementedError(
                f"streaming_hf generate_until does not support generation kwargs {sorted(kwargs)}; "
                "supported: until, max_gen_toks, do_sample, temperature, top_k, top_p"
            )
        if not do_sample:
            return greedy
        if temperature <= 0:
            raise ValueError(f"do_sample=True needs a temperature > 0, got {temperature}")
        config = self.model.generation_config

        def resolved(key):  # request > the model's generation config > transformers' default
            value = sampling.get(key, getattr(config, key, None))
            return SAMPLING_DEFAULTS[key] if value is None else value

        return sampler(float(temperature), int(resolved("top_k")), float(resolved("top_p")))

    def _postprocess(self, tokens: list[int], until: list[str]) -> str:
        # As HFLM.generate_until: thinking tokens, decoding without special tokens, stop sequences.
        think = self.think_end_token
        if isinstance(think, int) and think in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(think) :]
        text = self.tok_decode(tokens)
        if isinstance(think, int):
            text = text.lstrip()
        return postprocess_generated_text(
            generation=text, stop=until, think_end_token=think if isinstance(think, str) else None
        )

    def _windows_per_pass(self) -> int:
        """``method=recompute`` batches its windows by ``batch_size``; the cache methods read one stream at a time."""
        if not uses_batch_size(self.streaming):
            self._warn_batch_size()
            return 1
        if isinstance(self.batch_size, int):
            return self.batch_size
        eval_logger.warning("streaming_hf recompute: batch_size=%s is not a number; one window per pass", self.batch_size)
        return 1

    def _warn_batch_size(self) -> None:
        if str(self.batch_size) != "1":
            # Same numbers either way: each request is one stream, scored on its own.
            eval_logger.warning("streaming_hf scores one stream at a time; batch_size=%s is not used", self.batch_size)

    def _log_done(self, kind: str, n: int, stats) -> None:
        self.prefix_stats = stats
        eval_logger.info(
            "streaming_hf: %d %s requests with cache %s; %d tokens evicted so far; shared prefixes: %d context "
            "tokens read instead of %d, at most %d stream states alive",
            n, kind, self.streaming.as_dict(), self._evicted, stats.tokens_read, stats.tokens_unshared,
            stats.max_alive,
        )

    def barrier(self) -> None:
        # lm-eval calls this on every rank after each request type; get_model_info runs on rank 0
        # only, so this is where the ranks' eviction counts are added up for the results file.
        super().barrier()
        if self.world_size > 1:
            counts = [None] * self.world_size
            torch.distributed.all_gather_object(counts, self._evicted)
            self._evicted_all_ranks = sum(counts)

    def _note_held(self, result) -> None:
        """A request's memory (a ``StreamScore``, ``ContinuationScore`` or ``Generation``) into the run's."""
        kept = getattr(result, "kept_per_layer", ())
        self._held_per_layer = most_held(self._held_per_layer, result.held_per_layer)
        self._held_per_head = most_held(self._held_per_head, result.held_per_head)
        if kept:
            total = self._kept[1] or (0.0,) * len(kept)
            self._kept = [self._kept[0] + 1, tuple(a + b for a, b in zip(total, kept))]

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        evicted = getattr(self, "_evicted_all_ranks", self._evicted) if self.world_size > 1 else self._evicted
        info["streaming"] = self.streaming.as_dict() | {"evicted_tokens": evicted} | held_report(self._held_per_layer, self._held_per_head)
        if self._kept[0]:  # evict_every=context: what each layer kept at the requests' events, on average
            info["streaming"]["held_tokens_after_event_per_layer"] = [round(total / self._kept[0], 2)
                                                                      for total in self._kept[1]]
        return info


def held_report(per_layer: tuple[int, ...], per_head: tuple[tuple[int, ...], ...] = ()) -> dict:
    """The results file's memory: the most tokens each layer held between passes over the run (this rank's: its
    storage's width, what it allocates), and per key/value head the mean and maximum of the most each head held (heads
    hold different counts with AdaKV and duo: the mean is theirs exactly, not the widths'). Empty for recompute (no
    cache) and before any request."""
    if not per_layer:
        return {}
    heads = [count for layer in per_head for count in layer] or list(per_layer)
    return {"held_tokens_per_layer": list(per_layer),
            "held_tokens_per_head": {"mean": sum(heads) / len(heads), "max": max(per_layer)}}
