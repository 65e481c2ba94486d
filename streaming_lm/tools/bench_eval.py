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

``--caches`` adds caches of any policy, ``[LABEL=]POLICY:S+W+H[:PARAM=VALUE,...]`` (the policy's own parameters,
e.g. ``pyramidkv=snapkv:4+0+252:window_size=32,layer_budgets=pyramid,beta=7``), each read by the token loop and by
the chunked path where an exact one serves it; ``--evict_every 1,64`` repeats every cache row (the flags' own
token/chunked rows too) once per value; a row no path serves prints as n/a with the reason. Every row reports the
keys held (the most any layer held between passes), its tokens/s over sink_window chunked's at the same
evict_every, and the bench checks that each cache's fastest path (chunked where it serves, else the token loop)
gives the token loop's PPL to 1e-4 relative (exit 1 if not). ``--methods_suite`` is the grid of issue 18: every
method of docs/methods.md at C = 256 (``bench_caches.SUITE``), evict_every 1 and 64, beside dense:

    OMP_NUM_THREADS=1 python scripts/bench_eval.py --model_args pretrained=DIR,dtype=float32 --tokens 4096 \\
        --methods_suite --token_tokens 1024 --json methods.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from .. import settings
from . import bench_caches
from .common import add_knob_flags, default_text, knob_args, read_head

METHODS = ("dense", "token", "chunked", "bare", "recompute")
# Knobs set through the bench's own lists: --methods names the rows (dense and bare are no cache),
# --strides makes one recompute row each, --evict_every one row of every cache each.
LIST_FLAGS = {"method": "--methods", "stride": "--strides", "evict_every": "--evict_every"}


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
    p.add_argument("--methods", help="comma-separated, from " + ",".join(METHODS) + " (default dense,token,chunked; "
                   f"with --methods_suite {bench_caches.SUITE_METHODS})")
    p.add_argument("--strides", default="1", help="recompute's strides, comma-separated (default 1)")
    p.add_argument("--recompute_start_size", "--recompute-start-size", type=int,
                   help="recompute's start_size (default --start_size; 0 gives the plain sliding window of C tokens)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=1, help="recompute windows per forward pass")
    p.add_argument("--caches", default="",
                   help="more caches, comma-separated " + bench_caches.FORMAT + ": each is scored with the token "
                   "loop and, where one serves it, the chunked path; default positions per policy")
    p.add_argument("--evict_every", "--evict-every", dest="evict_everies",
                   help="comma-separated evict_every values: every cache row once per value (default 1; with "
                   f"--methods_suite {bench_caches.SUITE_EVICT_EVERY})")
    p.add_argument("--methods_suite", "--methods-suite", action="store_true",
                   help="issue 18's grid: --caches of every method of docs/methods.md at C = 256 (added to any "
                   "--caches given), --evict_every 1,64 and --methods dense unless given")
    p.add_argument("--token_tokens", "--token-tokens", type=int,
                   help="the token-loop rows read only the first N tokens (default: --tokens), for a slow loop; "
                   "the fastest path is then also scored on those N tokens for the PPL check")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p, flags


def parse_args(argv=None):
    args = build_parser()[0].parse_args(argv)
    if args.recent_size is None and args.compression_ratio is None:
        args.recent_size = settings.DEFAULT_RECENT_SIZE
    suite = args.methods_suite
    if args.methods is None:
        args.methods = bench_caches.SUITE_METHODS if suite else "dense,token,chunked"
    if args.evict_everies is None:
        args.evict_everies = bench_caches.SUITE_EVICT_EVERY if suite else "1"
    return args


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
    everies = bench_caches.parse_everies(args.evict_everies)
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
    model_args = simple_parse_args_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    if "pretrained" not in model_args:
        sys.exit("give --pretrained or pretrained= in --model_args")
    # The knobs given or defaulted here; the rest are the adapter's defaults.
    streaming_args = {k: v for k, v in knob_args(args).items() if v is not None}
    settings.resolve(**streaming_args)  # bad sizes fail here, before the model loads
    # The flags' own cache (token and chunked in --methods), then --caches: every row validated before loading.
    own_paths = tuple(m for m in bench_caches.PATHS if m in methods)
    rows = bench_caches.cache_rows("", streaming_args, {}, everies, own_paths) if own_paths else []
    speed_only = {"chunk_size": args.chunk_size} if args.chunk_size is not None else {}
    cache_rows = bench_caches.parse_caches(args.caches, everies)
    if args.methods_suite:  # a suite cache no evict_every given serves is n/a, not an error
        cache_rows += bench_caches.parse_caches(bench_caches.SUITE, everies, strict=False)
    rows += [dataclasses.replace(row, args=speed_only | row.args) for row in cache_rows]
    if args.tokens < 2:  # the prefix token plus at least one scored token
        sys.exit(f"--tokens must be an integer >= 2, got {args.tokens}")
    token_tokens = args.tokens if args.token_tokens is None else args.token_tokens
    if not 2 <= token_tokens <= args.tokens:
        sys.exit(f"--token_tokens must be an integer in [2, --tokens={args.tokens}], got {token_tokens}")
    text_file = args.text_file or default_text()
    if text_file is None or not Path(text_file).exists():
        sys.exit(f"--text_file: no such file {text_file}")

    dense = HFLM(device=args.device, **model_args)
    ids = dense.tok_encode(read_head(text_file, args.tokens))[: args.tokens - 1]
    texts = {args.tokens: dense.tokenizer.decode(ids), token_tokens: dense.tokenizer.decode(ids[: token_tokens - 1])}
    shared = dict(pretrained=dense.model, tokenizer=dense.tokenizer, device=args.device)
    if "max_length" in model_args:
        shared["max_length"] = model_args["max_length"]

    def run(name: str, lm, text: str) -> dict:
        """Score ``text`` as one rolling request (``lm`` None: the bare loop): seconds, tokens/s, PPL."""
        stream_ids = [dense.prefix_token_id, *dense.tok_encode(text)]  # what every method scores
        n_scored = len(stream_ids) - 1
        print(f"[{name}] scoring {n_scored} tokens ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        if lm is None:
            loglik = bare_token_loop(dense.model, stream_ids)
        else:
            (loglik,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        seconds = time.perf_counter() - started
        return {"tokens": n_scored, "seconds": seconds, "tokens_per_s": n_scored / seconds,
                "ppl": math.exp(-loglik / n_scored)}

    results = {"text_file": str(text_file), "tokens_scored": len(ids), "cache": streaming_args, "methods": {},
               "not_run": {}}
    for name in [m for m in methods if m not in bench_caches.PATHS and m != "recompute"] + list(recompute_args):
        if name == "bare":
            results["methods"][name] = run(name, None, texts[args.tokens])
        elif name == "dense":
            results["methods"][name] = run(name, dense, texts[args.tokens]) | {"max_length": dense.max_length}
        else:
            lm = StreamingHFLM(**shared, **recompute_args[name])
            results["methods"][name] = run(name, lm, texts[args.tokens]) | {
                k: getattr(lm.streaming, k) for k in ("start_size", "recent_size", "stride")}
    # Grouped by evict_every in the order given, the caches in order; run each group's fastest paths first (a long
    # run stopped early has them), and write the JSON after each row ("complete": false until the end).
    rows.sort(key=lambda row: everies.index(row.evict_every))
    for row in sorted(rows, key=lambda row: (everies.index(row.evict_every), not row.fastest)):
        name = row.name
        if row.reason is not None:
            results["not_run"][name] = row.reason
            continue
        lm = StreamingHFLM(**shared, **row.args)
        record = run(name, lm, texts[token_tokens if row.path == "token" else args.tokens])
        if row.fastest and row.path != "token" and token_tokens < args.tokens:
            # the PPL check compares the token loop's tokens
            record["ppl_on_token_text"] = run(f"{name} (PPL check)", lm, texts[token_tokens])["ppl"]
        info = lm.get_model_info()["streaming"]
        record |= {"cache": row.cache, "path": row.path, "fastest": row.fastest,
                   **{k: info[k] for k in ("policy", "start_size", "recent_size", "heavy_size", "positions",
                                           "evict_every", "policy_params")},
                   "held_max": info["held_tokens_per_head"]["max"], "held_per_layer": info["held_tokens_per_layer"],
                   **({"chunk_size": info["chunk_size"]} if row.path == "chunked" else {})}
        results["methods"][name] = record
        if args.json:
            args.json.write_text(json.dumps(results | {"complete": False}, indent=2))
    order = [row.name for row in rows]  # the table's order, not the run's
    results["methods"] = dict(sorted(results["methods"].items(),
                                     key=lambda item: order.index(item[0]) if item[0] in order else -1))
    results["not_run"] = dict(sorted(results["not_run"].items(), key=lambda item: order.index(item[0])))
    speed = {m: r["tokens_per_s"] for m, r in results["methods"].items()}
    if "chunked" in speed:
        results["ratios"] = {f"chunked/{m}": speed["chunked"] / speed[m] for m in ("token", "dense") if m in speed}
    reference = bench_caches.sink_window_ratios(rows, results["methods"])
    results["ppl_checks"] = bench_caches.ppl_checks(rows, results["methods"])
    goals = bench_caches.goal_lines(rows, results["methods"], reference)
    print_table(results, streaming_args, Path(text_file).name, token_tokens)
    for line in goals:
        print(line)
    failed = [c["row"] for c in results["ppl_checks"] if not c["ok"]]
    if results["ppl_checks"]:
        worst = max(c["rel_diff"] for c in results["ppl_checks"])
        print(f"PPL check, fastest path vs token loop on the same {token_tokens - 1} tokens (<= "
              f"{bench_caches.PPL_REL:g} relative): {len(results['ppl_checks']) - len(failed)} of "
              f"{len(results['ppl_checks'])} equal, largest difference {worst:.2e}"
              + (f"; DIFFERENT: {', '.join(failed)}" if failed else ""))
    results["complete"] = True
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        sys.exit(f"the fastest path's PPL is not the token loop's for {', '.join(failed)}: a wrong path, or (a scored "
                 f"method on a real model, after many events) an eviction float rounding decided, two scores at the "
                 f"tie margin (docs/benchmarks.md); compare on fewer tokens with --token_tokens")
    return results


def print_table(results: dict, streaming_args: dict, text_name: str, token_tokens: int) -> None:
    print(f"\n{results['tokens_scored']} tokens of {text_name} (token-loop rows: {token_tokens - 1}); "
          f"cache {streaming_args}")
    names = [*results["methods"], *results["not_run"]]
    width = max(14, *(len(m) + 2 for m in names))
    print(f"{'method':<{width}}{'tokens':>8}{'tokens/s':>10}{'seconds':>9}{'PPL':>11}{'held':>6}{'vs sw':>7}  fastest")
    for method, r in results["methods"].items():
        ratio = r.get("vs_sink_window_chunked")
        ratio = "" if ratio is None else f"{ratio:.2f}x"
        print(f"{method:<{width}}{r['tokens']:>8}{r['tokens_per_s']:>10.1f}{r['seconds']:>9.1f}{r['ppl']:>11.4f}"
              f"{r.get('held_max', ''):>6}{ratio:>7}  {'*' if r.get('fastest') else ''}")
    for method, reason in results["not_run"].items():
        shown = reason in list(results["not_run"].values())[: list(results["not_run"]).index(method)]
        print(f"{method:<{width}}  n/a: {'(as above)' if shown else reason}")
    for name, ratio in results.get("ratios", {}).items():
        print(f"{name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
