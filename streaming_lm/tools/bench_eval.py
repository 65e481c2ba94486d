"""Rolling-perplexity throughput: dense ``hf`` vs ``streaming_hf`` token mode vs chunked mode.

One run, one model (loaded once and shared), one text: prints tokens/s of each method, the
ratios chunked/token and chunked/dense, and the perplexities. ``--methods`` may add ``bare``:
a plain transformers token loop with a DynamicCache and no eviction, the floor under token mode;
and ``recompute``: sliding window with re-computation over the same C tokens, once per
``--strides`` value.

    python scripts/bench_eval.py --model_args pretrained=DIR,dtype=float32 \\
        --start_size 4 --recent_size 1020 --tokens 8192 --json bench.json
    python scripts/bench_eval.py --model_args pretrained=DIR,dtype=float32 --tokens 4096 \\
        --start_size 4 --recent_size 252 --methods dense,chunked,recompute --strides 1,16,252
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .. import settings
from .common import add_knob_flags, default_text, knob_args, read_head

METHODS = ("dense", "token", "chunked", "bare", "recompute")
# Knobs set through the bench's own lists: --methods names the rows (dense and bare are no cache),
# --strides makes one recompute row each.
LIST_FLAGS = {"method": "--methods", "stride": "--strides"}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and {knob: flag} for every streaming knob."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_args", "--model-args", default="", help="lm-eval style: pretrained=...,dtype=...,gguf_file=...")
    p.add_argument("--pretrained", help="model name or folder (or pretrained= in --model_args)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--text_file", "--text-file", type=Path, help="text to score (default: WikiText-2 test if present, else the shipped sample)")
    p.add_argument("--tokens", type=int, default=8192, help="cap the text at its first N tokens (default 8192)")
    # recent_size: DEFAULT_RECENT_SIZE unless --compression_ratio; chunk_size: the adapter's unless given.
    flags = add_knob_flags(p, underscores=True, defaults={"recent_size": None, "chunk_size": None},
                           covered=LIST_FLAGS)
    p.add_argument("--methods", default="dense,token,chunked", help="comma-separated, from " + ",".join(METHODS))
    p.add_argument("--strides", default="1", help="recompute's strides, comma-separated (default 1)")
    p.add_argument("--recompute_start_size", "--recompute-start-size", type=int,
                   help="recompute's start_size (default --start_size; 0 gives the plain sliding window of C tokens)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=1, help="recompute windows per forward pass")
    p.add_argument("--caches", default="",
                   help="more caches, comma-separated POLICY:S+W+H (e.g. tova:0+0+256,h2o:0+128+128): each is scored "
                   "with the token loop and, where one serves it, the chunked path; default positions per policy")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p, flags


def parse_args(argv=None):
    args = build_parser()[0].parse_args(argv)
    if args.recent_size is None and args.compression_ratio is None:
        args.recent_size = settings.DEFAULT_RECENT_SIZE
    return args


def parse_caches(text: str) -> dict[str, dict]:
    """``POLICY:S+W+H`` entries -> {row name: streaming_hf args}: a token-loop row each, and a chunked row where the
    policy has an exact chunked path. Validated before anything loads."""
    rows = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        policy, _, sizes = entry.partition(":")
        try:
            start, recent, heavy = (int(v) for v in (sizes.split("+") + ["0"])[:3])
        except ValueError:
            sys.exit(f"--caches: {entry!r} is not POLICY:S+W+H (e.g. tova:0+0+256)")
        knobs = dict(policy=policy, start_size=start, recent_size=recent, heavy_size=heavy)
        resolved = settings.resolve(**knobs)  # fails before loading
        for method in ("token", "chunked"):
            if method == "token" or settings.default_method(policy, resolved.positions) == "chunked":
                rows[f"{policy} {start}+{recent}+{heavy} {method}"] = knobs | {"method": method}
    return rows


def bare_token_loop(model, ids) -> float:
    """Total log-likelihood of ids[1:], one token per pass, transformers' own DynamicCache, no eviction."""
    from ..streams import open_stream

    return float(open_stream(model, None).score(ids).logprobs.double().sum())


def main(argv=None) -> dict:
    args = parse_args(argv)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    from ..lm_eval_model import StreamingHFLM

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"--methods: unknown {sorted(unknown)}; allowed: {', '.join(METHODS)}")
    recompute_args = {}
    if "recompute" in methods:
        try:
            strides = [int(v) for v in args.strides.split(",")]
        except ValueError:
            sys.exit(f"--strides must be comma-separated integers, got {args.strides!r}")
        # The same C as the cache: with fewer sinks the window holds more recent tokens.
        start = args.start_size if args.recompute_start_size is None else args.recompute_start_size
        window = ({"compression_ratio": args.compression_ratio} if args.recent_size is None
                  else {"recent_size": args.start_size + args.recent_size - start})
        for stride in strides:
            knobs = dict(start_size=start, **window, method="recompute", stride=stride)
            settings.resolve(**knobs)  # fails before loading
            recompute_args[f"recompute:{stride}"] = knobs | {"batch_size": args.batch_size}
        methods = [m for m in methods if m != "recompute"] + list(recompute_args)
    cache_args = parse_caches(args.caches)
    methods += list(cache_args)
    model_args = simple_parse_args_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    if "pretrained" not in model_args:
        sys.exit("give --pretrained or pretrained= in --model_args")
    # The knobs given or defaulted here; the rest are the adapter's defaults.
    streaming_args = {k: v for k, v in knob_args(args).items() if v is not None}
    settings.resolve(**streaming_args)  # bad sizes fail here, before the model loads
    if args.tokens < 2:  # the prefix token plus at least one scored token
        sys.exit(f"--tokens must be an integer >= 2, got {args.tokens}")
    text_file = args.text_file or default_text()
    if text_file is None or not Path(text_file).exists():
        sys.exit(f"--text_file: no such file {text_file}")

    dense = HFLM(device=args.device, **model_args)
    ids = dense.tok_encode(read_head(text_file, args.tokens))[: args.tokens - 1]
    text = dense.tokenizer.decode(ids)
    stream_ids = [dense.prefix_token_id, *dense.tok_encode(text)]  # what every method scores
    n_scored = len(stream_ids) - 1
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    shared = dict(pretrained=dense.model, tokenizer=dense.tokenizer, device=args.device)
    if "max_length" in model_args:
        shared["max_length"] = model_args["max_length"]

    results = {"text_file": str(text_file), "tokens_scored": n_scored, "cache": streaming_args, "methods": {}}
    for method in methods:
        print(f"[{method}] scoring {n_scored} tokens ...", file=sys.stderr, flush=True)
        if method == "bare":
            started = time.perf_counter()
            loglik = bare_token_loop(dense.model, stream_ids)
            seconds = time.perf_counter() - started
            results["methods"][method] = {"seconds": seconds, "tokens_per_s": n_scored / seconds,
                                          "ppl": math.exp(-loglik / n_scored)}
            continue
        if method == "dense":
            lm = dense
        elif method in recompute_args:
            lm = StreamingHFLM(**shared, **recompute_args[method])
        elif method in cache_args:
            lm = StreamingHFLM(**shared, **cache_args[method])
        else:
            lm = StreamingHFLM(**shared, **streaming_args, method=method)
        started = time.perf_counter()
        (loglik,) = lm.loglikelihood_rolling(request)
        seconds = time.perf_counter() - started
        results["methods"][method] = {
            "seconds": seconds,
            "tokens_per_s": n_scored / seconds,
            "ppl": math.exp(-loglik / n_scored),
            **({"chunk_size": lm.streaming.chunk_size} if method == "chunked" else {}),
            **({"max_length": dense.max_length} if method == "dense" else {}),
            **({k: getattr(lm.streaming, k) for k in ("start_size", "recent_size", "stride")}
               if method in recompute_args else {}),
            **({k: getattr(lm.streaming, k) for k in ("policy", "start_size", "recent_size", "heavy_size", "positions",
                                                       "method")} if method in cache_args else {}),
        }
    speed = {m: r["tokens_per_s"] for m, r in results["methods"].items()}
    if "chunked" in speed:
        results["ratios"] = {f"chunked/{m}": speed["chunked"] / speed[m] for m in ("token", "dense") if m in speed}

    print(f"\n{n_scored} tokens of {Path(text_file).name}; cache {streaming_args}")
    width = max(14, *(len(m) + 2 for m in results["methods"]))
    print(f"{'method':<{width}}{'tokens/s':>12}{'seconds':>10}{'PPL':>12}")
    for method, r in results["methods"].items():
        print(f"{method:<{width}}{r['tokens_per_s']:>12.1f}{r['seconds']:>10.1f}{r['ppl']:>12.4f}")
    for name, ratio in results.get("ratios", {}).items():
        print(f"{name}: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
