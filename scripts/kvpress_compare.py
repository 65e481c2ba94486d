#!/usr/bin/env python
"""Every case of tests/data/kvpress_reference.json (kvpress 0.5.5's own numbers; docs/kvpress.md) run through the
engine with ``evict_every=context``: per case, the kept sets against kvpress's (cells that differ, and how many of
them kvpress's cut tied), the continuation's log-probabilities (worst token, relative), the greedy tokens.

    python scripts/kvpress_compare.py --pretrained DIR [--methods knorm,snapkv] [--json out.json]

DIR: SmolLM2-135M-Instruct as a float32 checkpoint (the weights the file was made with: its sha256 is checked).
tests/test_context_kvpress.py runs two cases a method in CI; this runs all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.kvpress_reference import METHODS, cases, load, tied_cells, weights_sha256  # noqa: E402
from helpers.context_regime import engine_greedy, engine_logprobs, press_settings  # noqa: E402

from streaming_lm.rotary import find_rotary  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="SmolLM2-135M-Instruct, float32 checkpoint folder")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    model = transformers.AutoModelForCausalLM.from_pretrained(args.pretrained, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.pretrained)  # KVzip's replay prompt
    if weights_sha256(model) != load()["made_by"]["weights_sha256"]:
        p.error("--pretrained: not the weights the reference file was made with (sha256 differs)")
    shift, rows, start = find_rotary(model), [], time.time()
    print(f"{'case':42s} {'cells off':>9s} {'of them tied':>12s} {'worst rel':>10s} {'greedy':>6s}")
    for method in methods:
        for case in cases(method):
            settings = press_settings(case)
            ours, kept = engine_logprobs(model, shift, case.context_ids, case.continuation_ids, settings,
                                         tokenizer)
            differ = [a != b for a, b in zip(kept, case.kept(kept[0].shape[0]))]
            tied = sum(int((d & t).sum()) for d, t in zip(differ, tied_cells(case, kept[0].shape[0])))
            off = sum(int(d.sum()) for d in differ)
            worst = max(abs(a - e) / max(abs(e), 1.0) for a, e in zip(ours, case.logprobs))
            greedy = engine_greedy(model, shift, case.context_ids, load()["new_tokens"], settings,
                                   tokenizer) == case.greedy_ids
            rows.append(dict(case=case.name, cells_off=off, cells_off_tied=tied, worst_rel=worst, greedy=greedy))
            print(f"{case.name:42s} {off:9d} {tied:12d} {worst:10.2e} {str(greedy):>6s}", flush=True)
    exact = [r for r in rows if r["cells_off"] == 0]
    print(f"{len(rows)} cases in {time.time() - start:.0f} s; {len(exact)} with kvpress's kept sets: worst "
          f"{max((r['worst_rel'] for r in exact), default=0):.2e}, greedy identical in "
          f"{sum(r['greedy'] for r in exact)}; {len(rows) - len(exact)} differing only where kvpress's cut tied: "
          f"{all(r['cells_off'] == r['cells_off_tied'] for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
