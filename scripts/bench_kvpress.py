#!/usr/bin/env python
"""kvpress's regime, timed against kvpress itself: the same requests through NVIDIA kvpress 0.5.5's pipeline (in its
own venv) and through streaming_hf's engine (``evict_every=context``), alternated, with lm-eval's dense ``hf`` beside.

    python scripts/bench_kvpress.py --pretrained DIR --kvpress-python ../kvp/bin/python [--methods knorm,snapkv]

DIR: a float32 checkpoint folder both venvs load (SmolLM2: tests/helpers/models.py ``convert_smollm2``). A request
is ``--context`` tokens of WikiText (``--text``, by default ../shared/data/wikitext-2-raw-test.txt; each request its
own stretch), the next ``--question`` tokens as kvpress's question, then ``--new-tokens`` greedy tokens; every side
gets the same token ids. Per method and round (``--rounds``), the sides run one after the other in the order kvpress,
streaming_hf (then dense: kvpress with no press, lm-eval's ``HFLM._model_generate``), each in a process of its own
that loaded the model once, ``--threads`` threads each, nothing else running: seconds per request, the ratio
kvpress / streaming_hf (above 1: streaming_hf is faster) and whether the greedy tokens agree.

- kvpress: ``KVPressTextGenerationPipeline._forward`` (its prefill without the LM head under the press, the question,
  greedy decoding), given token ids; compression_ratio ``--ratio``; presses with kvpress's defaults.
- streaming_hf: ``engine.Engine.generate_requests`` with the settings ``streaming_hf`` builds from
  ``evict_every=context,query_size=Q,compression_ratio=r`` (``start_size=0``; ``sink_window``: ``start_size=4``, as
  ``StreamingLLMPress(n_sink=4)``), the path ``generate_until`` takes after tokenising.

Without ``--kvpress-python`` (or when it cannot import kvpress) the kvpress column says so and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def _scorer(press: str, policy: str, **params) -> tuple[str, dict]:
    """A scorer press (protects no sinks: start_size 0) as (its expression for ratio r, streaming_hf's model args)."""
    return press, {"policy": policy, "start_size": 0, **params}


# method -> (kvpress press expression for ratio r, streaming_hf model args besides the regime's)
METHODS = {
    "knorm": _scorer("KnormPress(compression_ratio=r)", "knorm"),
    "snapkv": _scorer("SnapKVPress(compression_ratio=r)", "snapkv"),
    "expected_attention": _scorer("ExpectedAttentionPress(compression_ratio=r)", "expected_attention"),
    "sink_window": ("StreamingLLMPress(compression_ratio=r, n_sink=4)", {"policy": "sink_window", "start_size": 4}),
    "random": _scorer("RandomPress(compression_ratio=r, seed=0)", "random"),
    "keydiff": _scorer("KeyDiffPress(compression_ratio=r)", "keydiff"),
    "lagkv": _scorer("LagKVPress(compression_ratio=r)", "lagkv"),
    "cur": _scorer("CURPress(compression_ratio=r)", "cur"),
    "observed_attention": _scorer("ObservedAttentionPress(compression_ratio=r)", "observed_attention"),
    "leverage": _scorer("LeverageScorePress(compression_ratio=r)", "leverage"),
    "compactor": _scorer("CompactorPress(compression_ratio=r)", "compactor"),
    "chunkkv": _scorer("ChunkKVPress(press=SnapKVPress(compression_ratio=r), chunk_length=20)", "snapkv",
                       chunk_length=20),
    "kvzip": _scorer("KVzipPress(compression_ratio=r)", "kvzip"),
    "critical_snapkv": _scorer("CriticalKVPress(SnapKVPress(compression_ratio=r))", "snapkv", critical=True),
}
EAGER = ("observed_attention",)  # kvpress reads the prefill's weights: its model runs attn_implementation="eager"
DENSE = "dense"


# --- the workers: one process per side, the model loaded once, one JSON command per line ------------------------

def _kvpress_worker(pretrained: str, threads: int):
    import torch
    import transformers
    import kvpress
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    class IdsTokenizer:  # the pipeline decodes its answer: hand back the ids instead
        def decode(self, ids, **_):
            return json.dumps([int(i) for i in ids])

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    pipe.tokenizer = IdsTokenizer()
    # KVzipPress loads the tokenizer itself; the requests are plain text (no chat template), so hand it one without
    # a template: its replay then covers the whole context, as the engine's does for a prefill without one
    plain = transformers.AutoTokenizer.from_pretrained(pretrained)
    plain.chat_template = None
    kvpress.presses.kvzip_press.AutoTokenizer = type("Plain", (), {"from_pretrained": staticmethod(lambda *a, **k: plain)})

    def run(command):
        press = None if command["method"] == DENSE else eval(METHODS[command["method"]][0],
                                                             {**vars(kvpress), "r": command["ratio"]})
        q, out = command["question"], []
        for ids in command["requests"]:
            inputs = {"context_ids": torch.tensor([ids[:-q]]), "questions_ids": [torch.tensor([ids[-q:]])]}
            model.set_attn_implementation("eager" if command["method"] in EAGER else "sdpa")
            with torch.inference_mode():
                answer = pipe._forward(inputs, max_new_tokens=command["new_tokens"], press=press, cache=DynamicCache())
            out.append(json.loads(answer[0]))
        return out

    return run


def _ours_worker(pretrained: str, threads: int):
    import torch
    import transformers

    from streaming_lm.engine import Engine
    from streaming_lm.generation import GenerationRequest, greedy
    from streaming_lm.settings import pop_policy_params, resolve
    from streaming_lm.support import check_model_supported

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)  # KVzip's replay prompt
    eos = model.generation_config.eos_token_id
    eos = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def run(command):
        args = dict(METHODS[command["method"]][1], evict_every="context", query_size=command["question"],
                    compression_ratio=command["ratio"], max_length=model.config.max_position_embeddings)
        params = pop_policy_params(args["policy"], args)  # chunk_length, critical: the method's own parameters
        settings = resolve(**args, policy_params=params)
        check_model_supported(model, settings)
        requests = [GenerationRequest(ids, command["new_tokens"], {"pick": greedy, "eos_token_ids": eos})
                    for ids in command["requests"]]
        with torch.inference_mode():
            results, _ = Engine(model, settings, tokenizer).generate_requests(requests, share=False)
        return [result.tokens for result in results]

    return run


def _hf_worker(pretrained: str, threads: int):
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(threads)
    lm = HFLM(pretrained=pretrained, dtype="float32", device="cpu")

    def run(command):
        out = []
        for ids in command["requests"]:
            context = torch.tensor([ids])
            with torch.inference_mode():
                tokens = lm._model_generate(context, max_length=len(ids) + command["new_tokens"], stop=[],
                                            do_sample=False)
            out.append(tokens[0, len(ids):].tolist())
        return out

    return run


WORKERS = {"kvpress": _kvpress_worker, "ours": _ours_worker, "hf": _hf_worker}


def worker_main(side: str, pretrained: str, threads: int) -> None:
    run = WORKERS[side](pretrained, threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        start = time.perf_counter()
        answers = run(command)
        print(json.dumps({"seconds": time.perf_counter() - start, "answers": answers}), flush=True)


class Side:
    """A worker process of one side, started once."""

    def __init__(self, side: str, python: str, pretrained: str, threads: int):
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen([python, __file__, "--worker", side, "--pretrained", pretrained, "--threads",
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.side, self.error = side, None
        line = self.proc.stdout.readline()
        if not line:
            self.error = f"{side}: the worker did not start with {python} (exit code {self.proc.wait()})"

    def run(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.side} worker died (exit code {self.proc.wait()}); its error is above")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def requests_from(text_file: Path, pretrained: str, n: int, length: int) -> list[list[int]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)
    ids = tokenizer(text_file.read_text(encoding="utf-8")[: (n + 1) * length * 8], add_special_tokens=False).input_ids
    if len(ids) < n * length:
        raise SystemExit(f"--text: {text_file} has {len(ids)} tokens, fewer than --requests x (--context + --question)")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids[i * length : (i + 1) * length - len(bos)] for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="float32 checkpoint folder, loaded by both venvs")
    p.add_argument("--kvpress-python", help="the python of a venv with kvpress==0.5.5 (absent: kvpress is skipped)")
    p.add_argument("--methods", default="knorm,snapkv,expected_attention", help=f"from {', '.join(METHODS)}")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--context", type=int, default=4000, help="context tokens before the question")
    p.add_argument("--question", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds (A B A B)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-dense", action="store_true", help="skip the dense rows (kvpress without a press, hf)")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.pretrained, args.threads)
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    if not args.text.is_file():
        p.error(f"--text: no such file: {args.text}")
    requests = requests_from(args.text, args.pretrained, args.requests, args.context + args.question)
    sides = {"ours": Side("ours", sys.executable, args.pretrained, args.threads)}
    if args.kvpress_python:
        sides["kvpress"] = Side("kvpress", args.kvpress_python, args.pretrained, args.threads)
    else:
        print("kvpress: skipped (no --kvpress-python; make one with python3 -m venv kvp && kvp/bin/pip install "
              "kvpress==0.5.5)")
    if not args.no_dense:
        sides["hf"] = Side("hf", sys.executable, args.pretrained, args.threads)
    for name, side in list(sides.items()):
        if side.error:
            print(side.error)
            del sides[name]
    rows = [*methods, *([] if args.no_dense else [DENSE])]
    print(f"{len(requests)} requests of {args.context} + {args.question} tokens, {args.new_tokens} greedy tokens, "
          f"r = {args.ratio}, {args.threads} threads a side, sides run one at a time")
    print(f"{'method':20s} {'round':>5s} {'kvpress s/req':>14s} {'streaming_hf s/req':>19s} {'hf s/req':>9s} "
          f"{'kvpress/ours':>12s} {'answers':>8s}")
    try:
        for method in rows:
            for round_ in range(args.rounds):
                command = dict(method=method, ratio=args.ratio, question=args.question, new_tokens=args.new_tokens,
                               requests=requests)
                got = {}
                for name in ("kvpress", "ours", "hf"):
                    if name not in sides or (name == "hf" and method != DENSE):
                        continue
                    if name == "ours" and method == DENSE:
                        continue
                    got[name] = sides[name].run(command)
                per = {name: result["seconds"] / len(requests) for name, result in got.items()}
                answers = [result["answers"] for result in got.values()]
                agree = "same" if all(a == answers[0] for a in answers) else "DIFFER"
                ratio = per["kvpress"] / per["ours"] if "kvpress" in per and "ours" in per else None
                cell = lambda name: f"{per[name]:.2f}" if name in per else "-"  # noqa: E731
                print(f"{method:20s} {round_ + 1:5d} {cell('kvpress'):>14s} {cell('ours'):>19s} {cell('hf'):>9s} "
                      f"{'-' if ratio is None else f'{ratio:.2f}x':>12s} {agree:>8s}", flush=True)
    finally:
        for side in sides.values():
            side.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
