"""Decoding with a dense cache vs the streaming sink+window cache: throughput, latency, memory, PPL.

Both caches run through the same decode loop (``streaming_lm.generation.decode``), one token
per forward pass, greedy, EOS ignored so that exactly ``--new-tokens`` tokens are generated:

- dense: transformers' ``DynamicCache``, nothing evicted, positions 0, 1, 2, ...;
- streaming: the sink+window cache of the streaming knobs, trimmed to ``start_size + recent_size``.

The model loads and texts are tokenised through ``StreamingHFLM``, as ``streaming_hf`` does. Then a
text is scored with both caches for perplexity (the rolling scorer of ``loglikelihood_rolling``).
Prints the usual table (PPL, memory, throughput, % change), per-token latency along the run, and
optionally writes ``--json`` and a ``--plot`` of latency and memory against tokens generated.

    python scripts/throughput.py --pretrained DIR --new-tokens 4096 --start-size 4 --recent-size 508 \\
        --json throughput.json --plot throughput.png
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

from .common import add_knob_flags, default_text, knob_args, read_head, resolve_flags  # no torch: instant checks

DTYPES = ("float32", "float16", "bfloat16", "auto")
LATENCY_WINDOW = 64  # per-token latency at token k: median over the window of tokens around k


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and {knob: flag} for every streaming knob."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="model name or folder")
    p.add_argument("--gguf-file", help="a GGUF file inside --pretrained")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--prompt-file", type=Path,
                   help="prompt text (default: WikiText-2 test if present, else the shipped excerpt)")
    p.add_argument("--prompt-tokens", type=int, default=128,
                   help="use the first N tokens of the prompt file (0: all; default 128)")
    p.add_argument("--ppl-file", type=Path, help="text scored for PPL (default: the same default WikiText)")
    p.add_argument("--ppl-tokens", type=int, help="tokens of --ppl-file to score (default: --new-tokens; 0 skips PPL)")
    flags = add_knob_flags(p)
    p.add_argument("--max-length", type=int, help="L for --compression-ratio (default: the model's, as lm-eval's hf)")
    p.add_argument("--new-tokens", type=int, default=2048, help="tokens to generate with each cache (default 2048)")
    p.add_argument("--json", type=Path, help="write every number (per-token latencies included) here")
    p.add_argument("--plot", type=Path, help="draw latency and memory against tokens generated (PNG)")
    return p, flags


def parse_args(argv=None):
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args, flags)
    return args


def check_args(parser, args, flags: dict[str, str]) -> None:
    """Everything that can be checked without the model, so that bad arguments cost nothing."""
    resolve_flags(parser, args, flags, max_length=args.max_length)
    if args.method == "recompute":
        parser.error("--method recompute keeps no key/value cache to measure; use --method chunked or token")
    if args.new_tokens < 2:  # the first token comes from the prefill: at least one decode step
        parser.error(f"--new-tokens must be an integer >= 2, got {args.new_tokens}")
    if args.prompt_tokens < 0:
        parser.error(f"--prompt-tokens must be an integer >= 0, got {args.prompt_tokens}")
    if args.ppl_tokens is None:
        args.ppl_tokens = args.new_tokens
    if args.ppl_tokens < 0 or args.ppl_tokens == 1:
        parser.error(f"--ppl-tokens must be 0 (skip) or an integer >= 2, got {args.ppl_tokens}")
    fallback = default_text()
    for flag in ("prompt_file", "ppl_file"):
        path = getattr(args, flag) or fallback
        if path is None or not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')}: no such file {path}")
        setattr(args, flag, Path(path))
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'streaming-lm[plot]'")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available (use --device cpu)")


def load(args):
    """The model and tokenizer as ``streaming_hf`` loads them; ``lm.streaming`` holds the resolved cache."""
    from ..lm_eval_model import StreamingHFLM

    optional = {"gguf_file": args.gguf_file, "max_length": args.max_length}
    try:
        return StreamingHFLM(pretrained=args.pretrained, dtype=args.dtype, device=args.device, **knob_args(args),
                             **{key: value for key, value in optional.items() if value is not None})
    except ValueError as error:
        if "compression_ratio=" not in str(error):  # only the budget needs the model's max_length
            raise
        sys.exit(f"--compression-ratio: {error}")


def read_tokens(lm, path: Path, n_tokens: int) -> list[int]:
    """The first n_tokens (0: all) of what ``loglikelihood_rolling`` would score for the text."""
    ids = lm.rolling_ids(read_head(path, n_tokens))
    return ids[:n_tokens] if n_tokens else ids


class PeakMemory:
    """Peak process RSS over a phase (Linux: VmHWM, reset through /proc/self/clear_refs) and CUDA peak."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import torch

        gc.collect()
        try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        self.rss_mb = None
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.rss_mb = int(line.split()[1]) / 1024
        if self.rss_mb is None:  # process-wide peak since start (kilobytes on Linux)
            self.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def run_decode(name: str, stream, prompt: list[int], n_new: int, device, show: bool) -> dict:
    """Prefill the prompt, then generate n_new tokens; per-token latency and KV bytes after every token."""
    from tqdm.auto import tqdm

    from ..generation import decode

    latencies, kv = [], []
    bar = tqdm(total=n_new, desc=f"{name} decode", disable=not show, leave=False)
    clock = {}

    def on_token(i, token):
        now = time.perf_counter()
        if i > 1:  # token 1 comes from the prefill's logits
            latencies.append(now - clock["last"])
        kv.append(stream.kv_bytes())
        bar.update(1)
        if i % 64 == 0 and latencies:
            bar.set_postfix(ms_per_token=f"{1e3 * statistics.median(latencies[-64:]):.1f}")
        clock["last"] = time.perf_counter()  # bookkeeping above is not the model's time

    with PeakMemory(device) as memory:
        started = time.perf_counter()
        logits = stream.read(prompt, last_only=True)[-1]
        prefill_s = time.perf_counter() - started
        tokens = decode(stream, logits, n_new, on_token=on_token)  # greedy, EOS ignored
    bar.close()
    decode_s = sum(latencies)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": len(tokens),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens_per_s": len(latencies) / decode_s if decode_s else float("nan"),
        "latency_ms": [1e3 * x for x in latencies],  # entry k: token k + 2
        "kv_bytes": kv,  # entry k: after token k + 1
        "peak_kv_bytes": max(kv),
        "held_tokens_end": stream.max_held,  # held tokens only grow (to C): the most held is the last
        # The streaming decode cache also allocates one free slot and unrotated sink keys (its declared overhead).
        "kv_allocated_bytes_end": stream.kv_allocated_bytes(),
        "kv_overhead_tokens": stream.cache.overhead_tokens,
        "peak_rss_mb": memory.rss_mb,
        "cuda_max_allocated_mb": memory.cuda_mb,
        "tokens": tokens,
    }


def run_ppl(score, ids: list[int]) -> dict:
    """PPL of ids[1:] from ``score(ids)``, a rolling scorer returning a ``StreamScore``."""
    started = time.perf_counter()
    scored = score(ids)
    total = float(scored.logprobs.double().sum())
    return {"tokens_scored": len(ids) - 1, "ppl": math.exp(-total / (len(ids) - 1)),
            "seconds": time.perf_counter() - started, "evicted": scored.evicted}


def latency_at(latency_ms: list[float], token: int) -> float:
    """Median latency over the LATENCY_WINDOW tokens around `token` (1-based; entry k is token k + 2)."""
    index = min(max(token - 2, 0), len(latency_ms) - 1)
    lo = max(0, min(index - LATENCY_WINDOW // 2, len(latency_ms) - LATENCY_WINDOW))
    return statistics.median(latency_ms[lo : lo + LATENCY_WINDOW])


def change(base, new) -> str:
    return f"{100 * (new - base) / base:+.1f}%" if base else "n/a"


def report(results: dict) -> list[str]:
    """The table, latency along the run and the sanity checks, as printed lines."""
    dense, stream = results["decode"]["dense"], results["decode"]["streaming"]
    cuda = dense["cuda_max_allocated_mb"] is not None
    mem_key = "cuda_max_allocated_mb" if cuda else "peak_kv_mb"
    for r in (dense, stream):
        r["peak_kv_mb"] = r["peak_kv_bytes"] / 2**20
    rows = []
    if "ppl" in results:
        ppl = results["ppl"]
        rows.append(("PPL (lower is better)", ppl["dense"]["ppl"], ppl["streaming"]["ppl"], "{:.3f}"))
    rows.append(("Memory (MB)", dense[mem_key], stream[mem_key], "{:.2f}"))
    rows.append(("Throughput (t/s)", dense["tokens_per_s"], stream["tokens_per_s"], "{:.2f}"))
    lines = [f"{'Metric':<22} | {'Baseline':>9} | {'StreamingLLM':>12} | {'Change':>7}"]
    lines.append(f"{'-' * 22}-|-{'-' * 9}-|-{'-' * 12}-|-{'-' * 7}")
    for label, base, new, fmt in rows:
        lines.append(f"{label:<22} | {fmt.format(base):>9} | {fmt.format(new):>12} | {change(base, new):>7}")
    what = "CUDA max allocated" if cuda else "key/value cache at its peak, from the cache tensors"
    lines.append(f"Memory: {what}. Peak process RSS: dense {dense['peak_rss_mb']:.0f} MB, "
                 f"streaming {stream['peak_rss_mb']:.0f} MB.")
    lines.append(f"Throughput: decode steps per second over {dense['new_tokens']} new tokens after a "
                 f"{dense['prompt_tokens']}-token prompt (prefill excluded).")
    lines.append("")
    lines.append(f"Per-token latency, ms (median of {LATENCY_WINDOW} tokens around each point):")
    lines.append(f"{'tokens generated':>16} | {'dense':>8} | {'streaming':>9}")
    for token in results["latency_checkpoints"]:
        lines.append(f"{token:>16} | {results['latency_ms']['dense'][str(token)]:>8.2f} | "
                     f"{results['latency_ms']['streaming'][str(token)]:>9.2f}")
    for name, ratio in results["latency_growth"].items():
        lines.append(f"{name}: latency at the end / at token {results['latency_reference']} = {ratio:.3f}")
    kv = results["kv_check"]
    lines.append(f"Streaming key/value peak: {kv['streaming_peak_bytes']} bytes = {kv['streaming_peak_tokens']} "
                 f"tokens x {kv['bytes_per_token']} bytes/token (C = {kv['capacity']}): "
                 f"{'exactly C tokens' if kv['exactly_capacity'] else 'NOT C tokens'}; allocated "
                 f"{kv['streaming_allocated_bytes']} bytes ({kv['overhead_tokens']:g} tokens' worth on top: "
                 "the decode cache's free slot and unrotated sink keys)")
    return lines


def summarise(results: dict, settings) -> list[str]:
    """Derived numbers and the loud checks; returns the warnings."""
    dense, stream = results["decode"]["dense"], results["decode"]["streaming"]
    n = dense["new_tokens"]
    checkpoints = sorted({t for t in (1000, n // 4, n // 2, 3 * n // 4, n) if 2 <= t <= n})
    results["latency_checkpoints"] = checkpoints
    results["latency_ms"] = {name: {str(t): latency_at(r["latency_ms"], t) for t in checkpoints}
                             for name, r in (("dense", dense), ("streaming", stream))}
    reference = 1000 if n > 1000 else max(2, n // 4)
    results["latency_reference"] = reference
    results["latency_growth"] = {name: latency_at(r["latency_ms"], n) / latency_at(r["latency_ms"], reference)
                                 for name, r in (("dense", dense), ("streaming", stream))}
    bytes_per_token = dense["kv_bytes"][-1] // dense["held_tokens_end"]
    stream_tokens = stream["peak_kv_bytes"] / bytes_per_token
    # The held figure counts tokens; the allocation is read from the tensors themselves, so a cache that
    # grew slots fails here: C held tokens, plus the layout's declared overhead (the decode slots: one free
    # slot and the sinks' unrotated keys; a scored policy's cache: nothing).
    allocated_exact = round((settings.capacity + stream["kv_overhead_tokens"]) * bytes_per_token)
    # Between steps a layer holds C tokens, plus the segment read since the last event with evict_every = K > 1.
    peak = settings.capacity + settings.schedule.extra_slots() - 1
    results["kv_check"] = {
        "bytes_per_token": bytes_per_token, "capacity": settings.capacity,
        "streaming_peak_bytes": stream["peak_kv_bytes"], "streaming_peak_tokens": stream_tokens,
        "exactly_capacity": (stream["peak_kv_bytes"] == peak * bytes_per_token
                             and stream["kv_allocated_bytes_end"] == allocated_exact),
        "streaming_allocated_bytes": stream["kv_allocated_bytes_end"], "overhead_tokens": stream["kv_overhead_tokens"],
    }
    warnings = []
    total = dense["prompt_tokens"] + n - 1  # tokens read into the cache
    if total > peak and not results["kv_check"]["exactly_capacity"]:
        bound = f"C = {peak}" if settings.evict_every == 1 else f"C + evict_every - 1 = {peak}"
        warnings.append(f"the streaming cache peaked at {stream_tokens:g} tokens, not {bound}")
    if "ppl" in results:
        ppl = results["ppl"]
        evicted = ppl["streaming"]["evicted"]
        if ppl["streaming"]["tokens_scored"] + 1 <= settings.capacity + 1:
            warnings.append(f"the PPL text ({ppl['streaming']['tokens_scored'] + 1} tokens) fits in the cache: nothing "
                            "was evicted and the streaming PPL is the dense one by definition (raise --ppl-tokens)")
        elif evicted == 0 or ppl["streaming"]["ppl"] == ppl["dense"]["ppl"]:
            warnings.append(f"streaming PPL {ppl['streaming']['ppl']} equals dense PPL {ppl['dense']['ppl']} "
                            f"(evicted {evicted} tokens): the streaming cache was not used")
    results["warnings"] = warnings
    return warnings


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_mem) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top = 0.0
    for name, color in (("dense", "tab:red"), ("streaming", "tab:blue")):
        r = results["decode"][name]
        lat = r["latency_ms"]
        x = range(2, len(lat) + 2)
        ax_lat.plot(x, lat, color=color, alpha=0.25, linewidth=0.5)
        smooth = [statistics.median(lat[max(0, i - LATENCY_WINDOW // 2) : i + LATENCY_WINDOW // 2 + 1])
                  for i in range(len(lat))]
        sizes = f"{results['cache']['start_size']}+{results['cache']['recent_size']}"
        label = "dense (DynamicCache)" if name == "dense" else f"streaming ({sizes})"
        ax_lat.plot(x, smooth, color=color, label=label)
        top = max(top, 1.5 * max(smooth))
        ax_mem.plot(range(1, len(r["kv_bytes"]) + 1), [b / 2**20 for b in r["kv_bytes"]], color=color, label=label)
    ax_lat.set_ylim(0, top)  # single-token outliers (scheduler noise) would flatten the curves
    ax_lat.set_ylabel("latency per token (ms)")
    n_new = results["decode"]["dense"]["new_tokens"]
    ax_lat.set_title(f"{Path(results['model']).name}: {n_new} new tokens, {results['device']}")
    ax_lat.legend()
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_ylabel("key/value cache (MB)")
    ax_mem.set_xlabel("tokens generated")
    ax_mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    lm = load(args)
    import torch

    from ..streams import open_stream

    torch.set_grad_enabled(False)
    model, settings, engine, show = lm.model, lm.streaming, lm.engine, True
    prompt = read_tokens(lm, args.prompt_file, args.prompt_tokens)
    results = {
        "model": args.pretrained, "gguf_file": args.gguf_file, "dtype": str(model.dtype), "device": args.device,
        "torch_threads": torch.get_num_threads(), "prompt_file": str(args.prompt_file),
        "cache": settings.as_dict(), "decode": {},
    }
    print(f"[throughput] {args.new_tokens} new tokens after a {len(prompt)}-token prompt; cache {settings.start_size}+"
          f"{settings.recent_size} ({settings.positions})", file=sys.stderr, flush=True)
    for name, cache in (("dense", None), ("streaming", settings)):
        stream = engine.open() if cache else open_stream(model, None)  # None: the dense DynamicCache baseline
        results["decode"][name] = run_decode(name, stream, prompt, args.new_tokens, args.device, show)
        del stream
    if args.ppl_tokens:
        text = read_tokens(lm, args.ppl_file, args.ppl_tokens)
        results["ppl"] = {"ppl_file": str(args.ppl_file)}
        scorers = {"dense": lambda ids: open_stream(model, None).score(ids, progress=show),
                   "streaming": lambda ids: engine.score(ids, progress=show)}
        for name, scorer in scorers.items():
            results["ppl"][name] = run_ppl(scorer, text)
    warnings = summarise(results, settings)
    print("\n".join(report(results)))
    for warning in warnings:
        print(f"\n{'!' * 78}\nWARNING: {warning}\n{'!' * 78}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if warnings:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
