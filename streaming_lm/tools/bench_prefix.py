"""Shared prefixes read once: lm-eval ``hf`` vs ``streaming_hf`` on requests that share their beginnings.

One run, one model (loaded once and shared by every row):

(a) a 3-shot multiple-choice task built from the WikiText excerpt the repository ships: every document's
    context is the same three solved examples, then a passage and a question; four multi-word choices.
    Rows: ``hf`` at each ``--hf_batch_sizes`` value, ``streaming_hf`` without and with prefix sharing (a
    cache larger than every request, so nothing is evicted and the log-likelihoods must equal ``hf``'s:
    the largest difference is printed).
(b) ``streameval`` (tasks/streameval) with ``--queries`` queries: every query's context is the stream so
    far, so each context is a prefix of the next. ``streaming_hf`` with sharing on every query; without
    sharing the cost is quadratic in the queries, so it is timed on ``--unshared_sample`` evenly spaced
    queries and scaled to all of them by context tokens (exact counts for all). The answers must agree.

    python scripts/bench_prefix.py --model_args pretrained=/path/to/SmolLM2-135M,dtype=float32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

from .common import EXCERPT, add_knob_flags, knob_args, repo_file, resolve_flags

SHOTS = 3
QUESTION = "Question: Which words come next in the passage?\nAnswer:"
STREAMEVAL = "tasks/streameval/utils.py"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_args", "--model-args", default="", help="lm-eval style: pretrained=...,dtype=...")
    p.add_argument("--device", default="cpu")
    p.add_argument("--docs", type=int, default=8, help="multiple-choice documents (4 requests each; default 8)")
    p.add_argument("--passage_words", "--passage-words", type=int, default=44, help="words per passage (default 44)")
    p.add_argument("--hf_batch_sizes", "--hf-batch-sizes", default="1,4,16", help="hf batch sizes to try (default 1,4,16)")
    p.add_argument("--queries", type=int, default=100, help="streameval queries (default 100)")
    p.add_argument("--unshared_sample", "--unshared-sample", type=int, default=5,
                   help="streameval queries timed without sharing, evenly spaced (default 5; 0: all)")
    flags = add_knob_flags(p, underscores=True)  # streaming_hf's cache: one flag per settings knob
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: mc, streameval")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p, flags


def mc_docs(text: str, n_docs: int, passage_words: int, seed: int = 0) -> list[dict]:
    """Passages of the text, each asking for the three words that follow it; three spans from elsewhere
    in the text are the distractors. The first ``SHOTS`` documents are the solved examples."""
    words = text.split()
    span = passage_words + 3
    if (n_docs + SHOTS) * span > len(words):
        sys.exit(f"the text has {len(words)} words: too few for {n_docs} documents of {span}")
    rng, docs = random.Random(seed), []
    for d in range(n_docs + SHOTS):
        start = d * span
        passage, answer = " ".join(words[start : start + passage_words]), " ".join(words[start + passage_words : start + span])
        others = rng.sample([k for k in range(n_docs + SHOTS) if k != d], 3)
        choices = [answer] + [" ".join(words[k * span + passage_words : (k + 1) * span]) for k in others]
        rng.shuffle(choices)
        docs.append({"passage": passage, "choices": choices, "answer": choices.index(answer)})
    return docs


def mc_requests(docs: list[dict]):
    """lm-eval's loglikelihood requests for a 3-shot task: the shots joined by blank lines, as lm-eval does."""
    from lm_eval.api.instance import Instance

    ask = lambda doc: f"Passage: {doc['passage']}\n{QUESTION}"  # noqa: E731
    shots = "".join(f"{ask(doc)} {doc['choices'][doc['answer']]}\n\n" for doc in docs[:SHOTS])
    requests = []
    for d, doc in enumerate(docs[SHOTS:]):
        context = shots + ask(doc)
        requests += [Instance("loglikelihood", doc, (context, " " + choice), d) for choice in doc["choices"]]
    return requests, shots


def streameval_utils():
    """tasks/streameval/utils.py: the task's own generator and scoring."""
    spec = importlib.util.spec_from_file_location("streameval_utils", repo_file(STREAMEVAL))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def streameval_requests(n_queries: int):
    """``n_queries`` streameval queries (a query after every line about the line 10 back: short streams)."""
    from lm_eval.api.instance import Instance

    docs = streameval_utils().make_docs(num_lines=n_queries + 9, query_interval=1, answer_distance=10, seed=0)
    gen_kwargs = {"until": [">", "\n"], "max_gen_toks": 16, "do_sample": False}  # streameval.yaml's
    return [Instance("generate_until", doc, (doc["context"], dict(gen_kwargs)), i) for i, doc in enumerate(docs)], docs


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)``, the last included (all of them for ``k`` 0 or >= n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({round((j + 1) * (n - 1) / k) for j in range(k)})


def row(seconds, stats, answers, docs) -> dict:
    score = streameval_utils().process_results  # the task's exact match
    matches = [score(doc, [answer])["exact_match"] for answer, doc in zip(answers, docs, strict=True)]
    return {"seconds": seconds, "context_tokens_read": stats.tokens_read, "max_states_alive": stats.max_alive,
            "exact_match": sum(matches) / len(docs)}


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main(argv=None) -> dict:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    resolve_flags(parser, args, flags)  # a bad cache fails here, before the model loads
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    from ..lm_eval_model import StreamingHFLM

    model_args = simple_parse_args_string(args.model_args)
    if "pretrained" not in model_args:
        sys.exit("give pretrained= in --model_args")
    batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base = HFLM(device=args.device, **model_args)
    shared = dict(pretrained=base.model, tokenizer=base.tokenizer, device=args.device)
    lm = StreamingHFLM(**shared, **knob_args(args))
    results: dict = {"cache": lm.streaming.as_dict()}
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    if "mc" not in skip:
        text = repo_file(EXCERPT).read_text(encoding="utf-8")
        requests, shots = mc_requests(mc_docs(text, args.docs, args.passage_words))
        contexts = [len(base.tok_encode(r.args[0])) for r in requests[::4]]
        mc = {"documents": args.docs, "requests": len(requests), "prefix_tokens": len(base.tok_encode(shots)),
              "mean_context_tokens": sum(contexts) / len(contexts), "rows": {}}
        results["mc"] = mc
        hf_best = None
        for bs in batch_sizes:
            log(f"[mc] hf batch_size={bs} ...")
            out, seconds = timed(lambda bs=bs: HFLM(**shared, batch_size=bs).loglikelihood(requests, disable_tqdm=True))
            mc["rows"][f"hf bs={bs}"] = {"seconds": seconds}
            if hf_best is None or seconds < mc["rows"][hf_best[0]]["seconds"]:
                hf_best = (f"hf bs={bs}", out)
        for share in (False, True):
            name = f"streaming_hf {'shared' if share else 'unshared'}"
            log(f"[mc] {name} ...")
            lm.share_prefixes = share
            out, seconds = timed(lambda: lm.loglikelihood(requests, disable_tqdm=True))
            stats = lm.prefix_stats
            mc["rows"][name] = {"seconds": seconds, "context_tokens_read": stats.tokens_read,
                                "max_states_alive": stats.max_alive}
            if hf_best is not None:
                mc["rows"][name]["max_abs_diff_vs_hf"] = max(abs(a[0] - b[0]) for a, b in zip(out, hf_best[1], strict=True))
                mc["rows"][name]["same_greedy_as_hf"] = all(a[1] == b[1] for a, b in zip(out, hf_best[1], strict=True))
        if hf_best is not None:
            mc["best_hf"] = hf_best[0]
            mc["speedup_vs_best_hf"] = mc["rows"][hf_best[0]]["seconds"] / mc["rows"]["streaming_hf shared"]["seconds"]
        mc["speedup_shared_vs_unshared"] = (mc["rows"]["streaming_hf unshared"]["seconds"]
                                            / mc["rows"]["streaming_hf shared"]["seconds"])

    if "streameval" not in skip:
        requests, docs = streameval_requests(args.queries)
        se = {"queries": len(requests), "rows": {}}
        results["streameval"] = se
        log("[streameval] streaming_hf shared ...")
        lm.share_prefixes = True
        answers, seconds = timed(lambda: lm.generate_until(requests, disable_tqdm=True))
        shared_stats = lm.prefix_stats
        se["rows"]["shared"] = row(seconds, shared_stats, answers, docs)
        # Unshared, every query reads the whole stream so far: quadratic in the queries. Measured on an
        # evenly spaced sample of them (--unshared_sample; 0: all) and scaled by the context tokens.
        lm.share_prefixes = False
        picked = sample_indices(len(requests), args.unshared_sample)
        log(f"[streameval] streaming_hf unshared, {len(picked)} of {len(requests)} queries ...")
        sample_answers, seconds = timed(lambda: lm.generate_until([requests[i] for i in picked], disable_tqdm=True))
        sample_stats = lm.prefix_stats
        all_unshared = shared_stats.tokens_unshared  # what reading every context whole would read
        se["rows"]["unshared"] = row(seconds, sample_stats, sample_answers, [docs[i] for i in picked]) | {
            "queries": len(picked),
            "estimated_seconds_all": seconds * all_unshared / sample_stats.tokens_read,
            "context_tokens_all": all_unshared}
        se["longest_context_tokens"] = max(len(base.tok_encode(doc["context"])) for doc in docs)
        se["same_answers"] = sample_answers == [answers[i] for i in picked]
        se["speedup"] = se["rows"]["unshared"]["estimated_seconds_all"] / se["rows"]["shared"]["seconds"]
        se["tokens_ratio"] = all_unshared / shared_stats.tokens_read

    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    print(f"cache {results['cache']}")
    if "mc" in results:
        mc = results["mc"]
        print(f"\n(a) 3-shot multiple choice: {mc['documents']} documents, {mc['requests']} requests; shared prefix "
              f"{mc['prefix_tokens']} tokens of {mc['mean_context_tokens']:.0f} context tokens on average")
        print(f"{'row':<24}{'seconds':>9}{'ctx tokens':>12}{'max |dLL| vs hf':>17}")
        for name, row in mc["rows"].items():
            diff = row.get("max_abs_diff_vs_hf")
            print(f"{name:<24}{row['seconds']:>9.2f}{row.get('context_tokens_read', ''):>12}"
                  f"{'' if diff is None else f'{diff:.2e}':>17}")
        if "best_hf" in mc:
            same = all(mc["rows"][f"streaming_hf {k}"]["same_greedy_as_hf"] for k in ("shared", "unshared"))
            print(f"is_greedy equal to {mc['best_hf']}'s everywhere: {same}")
            print(f"streaming_hf shared vs {mc['best_hf']}: {mc['speedup_vs_best_hf']:.2f}x")
        print(f"streaming_hf shared vs unshared: {mc['speedup_shared_vs_unshared']:.2f}x")
    if "streameval" in results:
        se = results["streameval"]
        shared, unshared = se["rows"]["shared"], se["rows"]["unshared"]
        print(f"\n(b) streameval: {se['queries']} queries, longest context {se['longest_context_tokens']} tokens")
        print(f"{'streaming_hf':<30}{'queries':>8}{'seconds':>9}{'ctx tokens':>12}{'exact match':>13}")
        print(f"{'shared':<30}{se['queries']:>8}{shared['seconds']:>9.2f}{shared['context_tokens_read']:>12}"
              f"{shared['exact_match']:>13.3f}")
        print(f"{'unshared (sample)':<30}{unshared['queries']:>8}{unshared['seconds']:>9.2f}"
              f"{unshared['context_tokens_read']:>12}{unshared['exact_match']:>13.3f}")
        print(f"{'unshared (all, est. by tokens)':<30}{se['queries']:>8}{unshared['estimated_seconds_all']:>9.2f}"
              f"{unshared['context_tokens_all']:>12}")
        print(f"shared vs unshared: {se['tokens_ratio']:.1f}x fewer context tokens, {se['speedup']:.1f}x wall time "
              f"(estimated); same answers on the sample: {se['same_answers']}")

if __name__ == "__main__":
    main()
