"""A GPU check with no download and no lm-eval: the engine on random-weight models built on the device.

1. A tiny float32 Llama: the chunked path equals the token loop (both position modes, an evicting stream),
   and C + 1 tokens equal the dense model. Printed with the largest difference; a failure exits 1.
2. A random-weight model of Llama-2-7B's shape in bfloat16: tokens/s of one dense forward pass over
   ``--tokens`` tokens, the chunked path with a ``--start_size`` + ``--recent_size`` cache over the same
   tokens, the once-after-the-context regime (``evict_every=context``: the tokens as one prefill, then one
   knorm event at r = 0.5; kvpress's regime), and the token loop over them (stopped after ``--token_seconds``; its row says how many it read).
   Ratios are against the dense pass of the same run.

    PYTHONPATH=. python scripts/gpu_check.py            # on the GPU machine, from the repository root
    PYTHONPATH=. python scripts/gpu_check.py --device cpu --shape small --tokens 2048 --token_seconds 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import add_knob_flags, knob_args, resolve_flags

SHAPES = {  # LlamaConfig fields
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "small": dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4),  # a CPU smoke run of this script
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TOL = 2e-5  # float32 log-probabilities, chunked vs token loop (the tests' tolerance)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--tokens", type=int, default=16384, help="stream length for the timings (default 16384)")
    # The cache: one flag per settings knob; method is the rows' (chunked, then the token loop).
    flags = add_knob_flags(p, underscores=True, covered={"method": "method"})
    p.add_argument("--token_seconds", "--token-seconds", type=float, default=120.0,
                   help="stop the token loop after this many seconds (default 120)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p, flags


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def tiny_checks(device) -> list[dict]:
    """The tiny float32 model's exactness checks (chunked vs token loop; C + 1 tokens vs dense)."""
    import torch
    import transformers

    from ..rolling import score
    from ..settings import StreamingSettings
    from ..rotary import find_rotary

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.float32).eval()
    shift, rows = find_rotary(model), []
    ids = torch.randint(0, TINY["vocab_size"], (400,), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        dense = torch.log_softmax(model(input_ids=ids[None, :33]).logits[0, :-1].float(), -1)
        dense = dense.gather(-1, ids[1:33, None])[:, 0]
    for positions in ("shifted", "original"):
        settings = StreamingSettings(4, 28, positions, "token")
        token = score(model, ids, settings, shift)
        for method, chunk in (("chunked", 16), ("chunked", 7)):
            chunked = score(model, ids, StreamingSettings(4, 28, positions, method, chunk_size=chunk), shift)
            diff = float((chunked.logprobs - token.logprobs).abs().max())
            rows.append({"check": f"tiny fp32 {positions}: chunked ({chunk}) = token loop, {token.evicted} evicted",
                         "max_diff": diff, "ok": diff <= TOL and chunked.evicted == token.evicted > 0})
        short = score(model, ids[:33], StreamingSettings(4, 28, positions, "chunked", chunk_size=16), shift)
        diff = float((short.logprobs.to(dense.device) - dense).abs().max())
        rows.append({"check": f"tiny fp32 {positions}: C + 1 tokens chunked = dense", "max_diff": diff,
                     "ok": diff <= TOL and short.evicted == 0})
    return rows


def timings(args) -> list[dict]:
    """tokens/s of the dense pass, the chunked path and the token loop on the large random model."""
    import torch
    import transformers

    from ..engine import Engine
    from ..settings import resolve

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(4096, args.tokens))
    dtype = torch.bfloat16
    start = time.perf_counter()
    with torch.device(args.device):  # initialised on the device, in bf16 from the start: no 7B fp32 copy
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    _sync(args.device)
    print(f"built {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M parameters, {dtype}) "
          f"on {args.device} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    ids = torch.randint(0, config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(2))
    ids = ids.to(args.device)
    rows = []

    def run(name, fn):
        """``fn`` returns (tokens read, tokens evicted)."""
        _sync(args.device)
        t = time.perf_counter()
        n, evicted = fn()
        _sync(args.device)
        seconds = time.perf_counter() - t
        rows.append({"path": name, "tokens": n, "evicted": evicted, "seconds": round(seconds, 2),
                     "tokens_per_s": round(n / seconds, 1)})
        print(rows[-1], file=sys.stderr)

    with torch.inference_mode():
        model(input_ids=ids[None, :64], logits_to_keep=1)  # warm-up (kernels, allocator)
        run("dense, one pass", lambda: (model(input_ids=ids[None], logits_to_keep=1), (args.tokens, 0))[1])
        settings = resolve(**knob_args(args), method="chunked")
        cache = f"{settings.policy} {settings.start_size}+{settings.recent_size}+{settings.heavy_size}"
        # kvpress's regime: the prefill read with nothing evicted, then one event (knorm at r = 0.5)
        context = resolve(policy="knorm", evict_every="context", compression_ratio=0.5, start_size=0,
                          chunk_size=settings.chunk_size)
        engines = {name: Engine(model, knobs) for name, knobs in (
            ("chunked", settings), ("context", context), ("token", resolve(**knob_args(args), method="token")))}

        def chunked():
            stream = engines["chunked"].open()
            for _ in stream.read_passes(ids, last_only=True):
                pass
            return stream.n, stream.evicted

        run(f"chunked {cache} (chunk {settings.chunk_size})", chunked)

        def once():
            stream = engines["context"].open()
            stream.extend(ids)
            stream.compress()
            return stream.n, stream.evicted

        run("context regime (once after the context), knorm r=0.5", once)

        def token_loop():
            stream = engines["token"].open()
            t, n = time.perf_counter(), 0
            for n, _ in enumerate(stream.read_passes(ids), start=1):
                if time.perf_counter() - t > args.token_seconds:
                    break
            return n, stream.evicted

        run(f"token loop {cache}", token_loop)
    dense = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_dense"] = round(row["tokens_per_s"] / dense, 3)
    return rows


def main(argv=None) -> dict:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    for method in ("chunked", "token"):
        resolve_flags(parser, args, flags, method=method)  # a bad cache fails here, before any model is built
    import torch

    device = torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else args.device
    checks = tiny_checks(args.device)
    for row in checks:
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']}: max |diff| {row['max_diff']:.2e}")
    rows = timings(args)
    print(f"\n{args.shape}, bf16, random weights, on {device}; torch {torch.__version__}")
    print(f"{'path':<40}{'tokens':>8}{'evicted':>9}{'seconds':>10}{'tokens/s':>11}{'vs dense':>10}")
    for row in rows:
        print(f"{row['path']:<40}{row['tokens']:>8}{row['evicted']:>9}{row['seconds']:>10}{row['tokens_per_s']:>11}"
              f"{row['vs_dense']:>10}")
    results = {"device": device, "shape": args.shape, "checks": checks, "timings": rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not all(row["ok"] for row in checks):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
