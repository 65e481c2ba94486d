"""Peak memory of a request: lm-eval's dense ``hf`` against ``streaming_hf``, each row in a process of its own.

A random-weight Llama with long positions (no download; ``--hidden_size`` etc.) and a byte tokenizer (one token a
character) read the shipped WikiText excerpt, repeated to length. Rows:

(a) the once-after-the-context regime (``evict_every=context``, kvpress's): one ``generate_until`` request of
    ``--tokens`` context tokens and ``--max_gen_toks`` greedy tokens, through ``hf`` and through ``streaming_hf``
    with each of ``--methods`` at ``compression_ratio`` 0.5;
(b) every K tokens: ``loglikelihood_rolling`` of each ``--rolling_tokens`` length through ``streaming_hf``'s
    ``--caches`` (sink_window 4+1020 every token, key-norm 4+0+1020 every 64 tokens) and through ``hf``, whose
    window is the whole text (``max_length`` set to it).

A row's peak is the process's peak resident memory (Linux's VmHWM, reset just before the request) less its resident
memory then: what the request added, model and warm-up excluded. Ratios are against ``hf``'s row of the same length.

    python scripts/bench_memory.py                     # 16k tokens, about two minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from .bench_caches import FORMAT, cache_rows, parse_entry, parse_everies, split_entries
from .common import EXCERPT, byte_tokenizer, repo_file

ONCE_METHODS = "sink_window,knorm,snapkv,expected_attention"
CACHES = "sink_window:4+1020,knorm:4+0+1020:evict_every=64"  # bench_eval's --caches entries, evict_every in each
GOAL_ONCE = 1.2  # issue 28: the once regime's peak at most this many times hf's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="context tokens of the (a) request (default 16384)")
    p.add_argument("--max_gen_toks", "--max-gen-toks", type=int, default=16)
    p.add_argument("--methods", default=ONCE_METHODS, help=f"(a) policies at r = 0.5 (default {ONCE_METHODS})")
    p.add_argument("--rolling_tokens", "--rolling-tokens", default="4096,8192,16384",
                   help="(b) text lengths, comma-separated ('' to skip)")
    p.add_argument("--caches", default=CACHES, help=f"(b) streaming_hf caches, comma-separated {FORMAT}, "
                   f"each with evict_every=K among its parameters (default 1; default {CACHES})")
    for name, default in (("hidden_size", 512), ("intermediate_size", 1536), ("num_hidden_layers", 4),
                          ("num_attention_heads", 8), ("num_key_value_heads", 8)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"the model's (default {default})")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one row, run by the parent in a fresh process
    return p


# --- one row, in its own process ------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _child(spec: dict) -> dict:
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ..lm_eval_model import StreamingHFLM

    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=spec["tokens"] + 1024,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **spec["shape"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    common = dict(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=spec["tokens"] + 64, device="cpu")
    lm = HFLM(**common) if spec["model"] == "hf" else StreamingHFLM(**common, **spec["args"])
    text = repo_file(EXCERPT).read_text(encoding="utf-8")
    text = (text * (spec["tokens"] // len(text) + 1))[: spec["tokens"]]  # one token a character

    def request(chars: str):
        if spec["kind"] == "generate_until":
            gen = {"until": ["\n\n"], "max_gen_toks": spec["max_gen_toks"], "do_sample": False}
            return lm.generate_until([Instance("generate_until", {}, (chars, gen), 0)], disable_tqdm=True)
        return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (chars,), 0)], disable_tqdm=True)

    request(text[:300])  # warm-up: kernels, the allocator, lazy imports
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident memory now
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out = request(text)
    seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - base) / 1024, "seconds": seconds, "out": out[0]}


# --- the parent: one process a row ----------------------------------------------------------------------------

def _run(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "streaming_lm.tools.bench_memory", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"row {spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cache(entry: str) -> tuple[str, dict]:
    """(row name, streaming_hf's args) of a ``--caches`` entry (bench_eval's format; ``evict_every=K`` among the
    parameters), read by the chunked path; the settings' error, naming the value, before any process starts."""
    _, knobs, params = parse_entry(entry)
    every = parse_everies(params.pop("evict_every", "1"))[0]
    label = parse_entry(re.sub(r"evict_every=[^,]*,?", "", entry).rstrip(":,"))[0]  # named without it
    row = cache_rows(label, knobs, params, [every], paths=("chunked",))[0]  # raises where no path serves it
    return f"{label} every {every}", row.args


def rows_for(args) -> list[dict]:
    shape = {name: getattr(args, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads")}
    base = dict(shape=shape, max_gen_toks=args.max_gen_toks)
    rows = [base | dict(part="once", name="hf", model="hf", kind="generate_until", tokens=args.tokens, args={})]
    for method in [m for m in args.methods.split(",") if m]:
        knobs = {"policy": method, "evict_every": "context", "compression_ratio": 0.5,
                 "start_size": 4 if method == "sink_window" else 0}
        rows.append(base | dict(part="once", name=f"streaming_hf {method} r=0.5", model="streaming_hf",
                                kind="generate_until", tokens=args.tokens, args=knobs))
    for tokens in [int(t) for t in args.rolling_tokens.split(",") if t]:
        rows.append(base | dict(part=f"rolling {tokens}", name="hf", model="hf", kind="loglikelihood_rolling",
                                tokens=tokens, args={}))
        for entry in split_entries(args.caches):
            name, knobs = _cache(entry)
            rows.append(base | dict(part=f"rolling {tokens}", name=f"streaming_hf {name}", model="streaming_hf",
                                    kind="loglikelihood_rolling", tokens=tokens, args=knobs))
    return rows


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return {}
    from .. import settings

    rows = rows_for(args)
    for spec in rows:  # bad knobs fail here, before any process starts (the caches' in rows_for)
        if spec["part"] == "once":
            settings.resolve(**spec["args"], max_length=spec["tokens"] + 64)
    results = {"shape": rows[0]["shape"], "rows": []}
    for spec in rows:
        print(f"[{spec['part']}] {spec['name']} ...", file=sys.stderr, flush=True)
        results["rows"].append({k: spec[k] for k in ("part", "name", "tokens", "args")} | _run(spec))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    print(f"random Llama {results['shape']}, float32, CPU")
    print(f"{'part':<15}{'row':<48}{'peak MiB':>10}{'vs hf':>8}{'seconds':>9}")
    dense = {row["part"]: row["peak_mib"] for row in results["rows"] if row["name"] == "hf"}
    for row in results["rows"]:
        ratio = row["peak_mib"] / dense[row["part"]] if dense.get(row["part"]) else float("nan")
        print(f"{row['part']:<15}{row['name']:<48}{row['peak_mib']:>10.1f}{ratio:>7.2f}x{row['seconds']:>9.1f}")
    once = [row["peak_mib"] / dense["once"] for row in results["rows"] if row["part"] == "once" and row["name"] != "hf"]
    if once:
        print(f"once regime: worst {max(once):.2f}x hf's peak (goal <= {GOAL_ONCE}x)")


if __name__ == "__main__":
    main()
