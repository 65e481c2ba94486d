"""The StreamingLLM paper's own families on the token loop: Falcon (RoPE), falcon-rw, MPT and BLOOM (ALiBi)
(issues #20, #25).

MPT's and BLOOM's attention runs in model code that the engine's attention functions cannot reach, and falcon-rw
adds its ALiBi bias through the mask its model code builds; all of them read keys and values from the cache they
are given: the token loop serves them. Falcon with RoPE runs its attention through transformers' attention
interface (transformers 5.25), so every path serves it (tests/test_architectures.py proves the chunked ones);
here its token loop is checked too. Each case is checked against a plain loop written here, with nothing from
streaming_lm: one token per pass through the model's own attention, and transformers' own ``DynamicCache`` cut
after every step (to the first S and last W tokens; for a scored policy, per head the lowest-scored unprotected
token, scored from the keys or from the weights the model's eager attention returns). Falcon takes its positions
through ``position_ids`` (``original``: the text's; ``shifted``: cache slots, the kept keys behind an evicted one
re-rotated back by one slot, docs/semantics.md); the ALiBi types bias attention by the distance in cache slots,
which is ``shifted`` itself.
"""

import dataclasses
import inspect
import logging
import sys

import pytest
import torch
import transformers
from lm_eval.models.huggingface import HFLM
from helpers.models import save_tiny, tiny_tokenizer
from helpers.reference import _rope, dense_logprobs
from helpers.requests import generations, pairs, rolling

from streaming_lm import StreamingHFLM
from streaming_lm.rolling import score
from streaming_lm.settings import StreamingSettings
from streaming_lm.streams import open_stream
from streaming_lm.rotary import find_rotary
from streaming_lm.streams.attention import attention_reach
from streaming_lm.support import (
    ALIBI, ARCHITECTURES as ROWS, FALCON_ALIBI, TOKEN_LOOP_PATHS, VARIANTS, architecture_of, check_model_supported,
    serving_paths,
)

START, RECENT = 3, 8  # C = 11
CAPACITY = START + RECENT
LONG = 40  # 3.6 C: 28 evictions
TOL = 2e-5


def _falcon(vocab, **extra):
    return transformers.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     initializer_range=0.1, bos_token_id=1, eos_token_id=2, **extra)


# name -> config from the vocabulary size; the released variants: Falcon-7B (multi-query, parallel attention,
# transformers' defaults) and Falcon-40B/180B (new_decoder_architecture: grouped keys/values).
ARCHITECTURES = {
    "falcon-7b-style": lambda v: _falcon(v, multi_query=True, parallel_attn=True),
    "falcon-40b-style": lambda v: _falcon(v, new_decoder_architecture=True, num_kv_heads=2),
    # falcon-rw-1b's layout: ALiBi, one key/value head per query head, sequential attention and MLP.
    "falcon-rw": lambda v: _falcon(v, alibi=True, multi_query=False, parallel_attn=False),
    "mpt": lambda v: transformers.MptConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                                            initializer_range=0.1, bos_token_id=1, eos_token_id=2),
    "bloom": lambda v: transformers.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=4,
                                                initializer_range=0.1, bos_token_id=1, eos_token_id=2),
}
ROTARY = {"falcon-7b-style", "falcon-40b-style"}  # ALiBi types serve positions=shifted only
CASES = [(name, positions) for name in ARCHITECTURES for positions in
         (("shifted", "original") if name in ROTARY else ("shifted",))]


def build(name, vocab=64):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[name](vocab)).eval()


def settings(positions="shifted"):
    return StreamingSettings(START, RECENT, positions, method="token")


@pytest.fixture(scope="module")
def models(one_thread):
    return {name: build(name) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 64, (LONG,))


@pytest.fixture(scope="module")
def sink_window(models, ids):
    """The plain sink+window loop on the long stream, once per type and position mode."""
    done = {}

    def run(name, positions):
        if (name, positions) not in done:
            done[name, positions] = PlainLoop(models[name], START, RECENT, positions).logprobs(ids)
        return done[name, positions]
    return run


def test_every_token_loop_type_is_covered():
    """Every row (or released variant) that only the token loop serves is here, and each config finds its row."""
    token_only = {arch for arch in ROWS + VARIANTS if arch.paths == TOKEN_LOOP_PATHS}
    covered = {architecture_of(ARCHITECTURES[name](64)) for name in ARCHITECTURES}
    assert token_only <= covered and FALCON_ALIBI in covered


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_probe_says_which_reach_the_engine(models, name):
    """Falcon with RoPE calls transformers' attention interface in every layer; MPT and BLOOM in none; falcon-rw in
    every layer, but with ALiBi in the mask, which the engine's functions would replace: not served."""
    model = models[name]
    reach = attention_reach(model)
    # Read off the model's own code, independently of the probe: does its attention call the interface?
    calls = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[type(model).__module__])
    assert reach.called == (reach.layers if calls else 0)
    assert reach.biased == (calls and name == "falcon-rw")
    assert reach.served == (calls and name in ROTARY)
    assert ("chunked" in serving_paths(model, architecture_of(model.config))) == reach.served


class PlainLoop:
    """One token per pass through the model's own attention; transformers' DynamicCache cut after each step."""

    def __init__(self, model, start, recent, positions="shifted", heavy=0, policy="sink_window"):
        self.model, self.start, self.recent, self.positions, self.policy = model, start, recent, positions, policy
        self.capacity = start + recent + heavy
        self.cache = transformers.DynamicCache(config=model.config)
        rotary = getattr(model.transformer, "rotary_emb", None)
        rope = model.config.model_type == "falcon" and not model.config.alibi
        self.inv_freq = rotary.inv_freq if rope else None
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tokens = {}  # layer -> long [heads, K]: the token in each slot
        self.totals = {}  # h2o: layer -> float [heads, K], attention summed while held
        self.t = 0

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        t, kwargs = self.t, {self.cache_arg: self.cache, "use_cache": True}
        if self.inv_freq is not None:
            kwargs["position_ids"] = torch.tensor([[min(t, self.capacity) if self.positions == "shifted" else t]])
        weights = self.policy in ("tova", "h2o")
        previous = self.model.config._attn_implementation
        if weights and previous != "eager":  # SDPA returns no weights
            self.model.set_attn_implementation("eager")
        try:
            out = self.model(torch.tensor([[token]]), output_attentions=weights, **kwargs)
        finally:
            if weights and previous != "eager":
                self.model.set_attn_implementation(previous)
        for i, layer in enumerate(self.cache.layers):
            heads = layer.keys.shape[1]
            self.tokens[i] = torch.cat((self.tokens.get(i, torch.empty(heads, 0, dtype=torch.long)),
                                        torch.full((heads, 1), t)), dim=1)
            score = self._score(i, layer, out.attentions[i][0, :, -1].float() if out.attentions else None)
            if layer.keys.shape[-2] > self.capacity:
                self._cut(i, layer, t, score)
        self.t += 1
        return out.logits[0, -1].float()

    def _score(self, i, layer, weights):
        """[heads, K]: knorm -||k||; tova this step's weights averaged over the layer's query heads; h2o the
        weights of the head's query heads, summed over every step the token was held."""
        heads = layer.keys.shape[1]
        if self.policy == "knorm":
            return -layer.keys[0].float().norm(dim=-1)
        if self.policy == "tova":
            return weights.mean(0).expand(heads, -1)
        if self.policy == "h2o":
            step = weights.reshape(heads, -1, weights.shape[-1]).sum(1)
            held = self.totals.get(i, torch.zeros(heads, 0))
            self.totals[i] = torch.cat((held, torch.zeros(heads, 1)), dim=1) + step
            return self.totals[i]
        return None

    def _cut(self, i, layer, t, score):
        keys, values, tokens = layer.keys, layer.values, self.tokens[i]
        if score is not None:  # per head: the lowest-scored unprotected token goes
            protected = (tokens < self.start) | (tokens > t - self.recent)
            scores = score.masked_fill(protected, float("inf"))
            # Ties (scores within a relative 1e-5, docs/policies.md: a repeated token's layer-0 keys differ only by
            # rotation) go to the older token, the first such column.
            low = scores.min(dim=1, keepdim=True).values
            victim = (scores <= low + 1e-5 * low.abs()).int().argmax(dim=1)
        else:  # the first S and the last W stay
            victim = torch.full((keys.shape[1],), self.start)
        slots = torch.arange(keys.shape[-2])
        keep = (slots[None, :] != victim[:, None]).nonzero()[:, 1].reshape(keys.shape[1], -1)  # [heads, K - 1]
        index = keep[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
        keys, values, tokens = keys.gather(2, index), values.gather(2, index), tokens.gather(1, keep)
        if i in self.totals:
            self.totals[i] = self.totals[i].gather(1, keep)
        if self.positions == "shifted" and self.inv_freq is not None:
            # Positions are slots: every key after the evicted one moves back one slot, so rotate it by -1.
            moved = (keep > torch.arange(keep.shape[1])[None, :])[None, :, :, None]
            back = _rope(keys, torch.full((keys.shape[-2],), -1), self.inv_freq)
            keys = torch.where(moved, back, keys)
        layer.keys, layer.values, self.tokens[i] = keys, values, tokens

    def logprobs(self, ids) -> torch.Tensor:
        logits = torch.stack([self.step(int(token)) for token in ids[:-1]])
        return torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("name, positions", CASES)
def test_short_stream_equals_dense(models, ids, name, positions):
    model, short = models[name], ids[: CAPACITY + 1]
    check_model_supported(model, settings(positions))
    scored = score(model, short, settings(positions), find_rotary(model))
    assert scored.evicted == 0
    torch.testing.assert_close(scored.logprobs, dense_logprobs(model, short), rtol=0, atol=TOL)


@pytest.mark.parametrize("name, positions", CASES)
def test_token_loop_equals_the_plain_loop(models, ids, sink_window, name, positions):
    model = models[name]
    scored = score(model, ids, settings(positions), find_rotary(model))
    assert scored.evicted == LONG - 1 - CAPACITY and scored.max_held == CAPACITY
    torch.testing.assert_close(scored.logprobs, sink_window(name, positions), rtol=0, atol=TOL)
    assert (scored.logprobs - dense_logprobs(model, ids)).abs().max() > 1e-2  # it streamed


def test_falcon_position_modes_differ(sink_window):
    """The plain loop can tell the modes apart: shifted re-rotation is exercised, not a no-op."""
    shifted, original = (sink_window("falcon-7b-style", mode) for mode in ("shifted", "original"))
    torch.testing.assert_close(shifted[:CAPACITY], original[:CAPACITY], rtol=0, atol=TOL)
    assert (shifted[CAPACITY:] - original[CAPACITY:]).abs().max() > 1e-2


@pytest.mark.parametrize("name, positions", CASES)
def test_decode_steps_equal_the_token_loop(models, ids, sink_window, name, positions):
    """generate_until's path (a context read, then one step per generated token) gives the plain loop's numbers."""
    model = models[name]
    stream = open_stream(model, settings(positions), find_rotary(model))
    logits = torch.cat([stream.read(ids[:15])] + [stream.step(int(token))[None] for token in ids[15:-1]])
    stepped = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
    torch.testing.assert_close(stepped, sink_window(name, positions), rtol=0, atol=TOL)
    assert stream.evicted == LONG - 1 - CAPACITY and stream.max_held == CAPACITY


@pytest.mark.parametrize("policy", ["knorm", "tova", "h2o"])
@pytest.mark.parametrize("name, positions", CASES)
def test_scored_policies_equal_the_plain_loop(models, ids, sink_window, name, positions, policy):
    """Key-norm scores keys; TOVA and H2O attention weights: Falcon's (RoPE) from streaming_lm's weights function,
    which its attention reaches; the others' from the weights their eager attention returns (output_attentions)."""
    model, heavy = models[name], RECENT - RECENT // 2
    scored_settings = StreamingSettings(START, RECENT // 2, positions, "token", policy=policy, heavy_size=heavy)
    check_model_supported(model, scored_settings)
    scored = score(model, ids, scored_settings, find_rotary(model))
    reference = PlainLoop(model, START, RECENT // 2, positions, heavy=heavy, policy=policy).logprobs(ids)
    assert scored.evicted == LONG - 1 - CAPACITY
    torch.testing.assert_close(scored.logprobs, reference, rtol=0, atol=TOL)
    assert (scored.logprobs - sink_window(name, positions)).abs().max() > 1e-3  # the scores decided, not the window


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_recompute_windows_are_dense_passes(models, ids, name):
    """method=recompute needs no cache: every window of C tokens is one dense pass of the model."""
    model = models[name]
    scored = score(model, ids, dataclasses.replace(settings(), method="recompute", stride=1), find_rotary(model))
    expected = list(dense_logprobs(model, ids[:CAPACITY + 1])[:CAPACITY])
    for end in range(CAPACITY, LONG - 1):
        window = torch.cat((ids[:START], ids[end + 1 - RECENT : end + 2]))  # held after x_end, then x_{end+1}
        expected.append(dense_logprobs(model, window)[-1])
    torch.testing.assert_close(scored.logprobs, torch.stack(expected), rtol=0, atol=TOL)


REFUSALS = [
    ("falcon-rw", dataclasses.replace(settings(), method="chunked"),
     r"method=chunked cannot serve model_type 'falcon': falcon-rw adds ALiBi to the attention mask.*Use method=token"),
    ("falcon-rw", settings("original"), r"positions=original cannot serve falcon \(ALiBi\).*Use positions=shifted"),
    ("mpt", dataclasses.replace(settings(), method="chunked"),
     r"method=chunked cannot serve model_type 'mpt': ALiBi is added inside.*Use method=token"),
    ("bloom", settings("original"), r"positions=original cannot serve bloom \(ALiBi\).*Use positions=shifted"),
    ("mpt", settings("original"), r"positions=original cannot serve mpt \(ALiBi\)"),
    ("mpt", StreamingSettings(4, 124, method="token"),
     r"mpt builds its ALiBi bias for at most max_seq_len = 128 keys, but a step attends to C \+ 1 = 129"),
]


@pytest.mark.parametrize("name, given, message", REFUSALS)
def test_what_these_types_cannot_serve_is_refused(models, name, given, message):
    with pytest.raises(NotImplementedError, match=message):
        check_model_supported(models[name], given)


def test_falcon_rw_adds_its_bias_once(models, ids):
    """falcon-rw is served because transformers 5.25 adds its ALiBi bias once, in eager and SDPA attention alike
    (earlier releases added it twice in eager attention: this test would then fail, and the row with it)."""
    model = models["falcon-rw"]
    assert architecture_of(model.config).scheme == ALIBI and find_rotary(model) is None
    logits, previous = {}, model.config._attn_implementation
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids[None, :20]).logits
    model.set_attn_implementation(previous)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=0, atol=1e-5)


# --- through lm-eval ------------------------------------------------------------------------------

SHORT_TEXT = "A tall tower."  # 13 bytes: with the prefix token, a stream of 14 <= C + 1
LONG_TEXT = " The tower is 324 metres tall, about 81 storeys."  # 48 bytes: 32 evictions
ADAPTER = dict(start_size=4, recent_size=12, device="cpu", dtype="float32")  # C = 16


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, one_thread):
    """name -> (streaming_hf with method unset, its checkpoint folder, the warnings logged while it was built)."""
    made = {}

    def get(name):
        if name not in made:
            folder = save_tiny(tmp_path_factory.mktemp(name), ARCHITECTURES[name](len(tiny_tokenizer())))
            logger, records = logging.getLogger("lm_eval.models.streaming_hf"), []
            handler = logging.Handler(logging.WARNING)
            handler.emit = records.append
            logger.addHandler(handler)
            try:
                made[name] = StreamingHFLM(pretrained=str(folder), **ADAPTER), folder, records
            finally:
                logger.removeHandler(handler)
        return made[name]
    return get


def plain(lm) -> PlainLoop:
    return PlainLoop(lm.model, lm.streaming.start_size, lm.streaming.recent_size)


@pytest.mark.parametrize("name", [name for name in ARCHITECTURES if name not in ROTARY])
def test_adapter_falls_back_to_the_token_loop_and_says_so(name, adapters):
    """The default method (chunked) cannot serve the ALiBi types: streaming_hf reads with the token loop (the same
    numbers), logs one line saying why, and records the method that ran; method=chunked given is refused."""
    lm, folder, records = adapters(name)
    fallback = [r.getMessage() for r in records if "reading with method=token instead" in r.getMessage()]
    model_type = lm.model.config.model_type
    assert len(fallback) == 1 and f"the chunked path cannot serve model_type '{model_type}'" in fallback[0]
    assert lm.streaming.method == "token" and lm.get_model_info()["streaming"]["method"] == "token"
    refusal = f"method=chunked cannot serve model_type '{model_type}'.*method=token"
    with pytest.raises(NotImplementedError, match=refusal):
        StreamingHFLM(pretrained=str(folder), method="chunked", **ADAPTER)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_adapter_gives_the_plain_loop_on_every_request_type(name, adapters):
    lm = adapters(name)[0]
    dense = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer)
    assert len(lm.tok_encode(SHORT_TEXT)) + 1 <= lm.streaming.capacity + 1
    (expected,) = dense.loglikelihood_rolling(rolling(SHORT_TEXT))
    assert lm.loglikelihood_rolling(rolling(SHORT_TEXT))[0] == pytest.approx(expected, rel=1e-5)

    stream = [lm.prefix_token_id, *lm.tok_encode(LONG_TEXT)]
    (streamed,) = lm.loglikelihood_rolling(rolling(LONG_TEXT))
    assert streamed == pytest.approx(float(plain(lm).logprobs(stream).double().sum()), rel=1e-5)
    assert abs(streamed - dense.loglikelihood_rolling(rolling(LONG_TEXT))[0]) > 1e-2  # it streamed

    context, continuation = LONG_TEXT[:32], LONG_TEXT[32:]
    (got, _), = lm.loglikelihood(pairs((context, continuation)))
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    logprobs = plain(lm).logprobs(context_ids + continuation_ids)
    assert len(context_ids) > lm.streaming.capacity + 1  # the context alone evicts
    assert got == pytest.approx(float(logprobs[-len(continuation_ids):].double().sum()), rel=1e-5)

    until = ["<<never>>"]
    (generated,) = lm.generate_until(generations((LONG_TEXT, {"until": until, "max_gen_toks": 6})))
    loop, tokens = plain(lm), []
    for token in lm.tok_batch_encode([LONG_TEXT])[0][0].tolist():
        logits = loop.step(token)
    while len(tokens) < 6 and (not tokens or tokens[-1] != lm.eot_token_id):
        tokens.append(int(logits.argmax()))
        logits = loop.step(tokens[-1])
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    assert generated == lm._postprocess(tokens, [*until, eos])
