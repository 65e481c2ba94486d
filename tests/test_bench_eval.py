"""streaming_lm.tools.bench_eval (scripts/bench_eval.py) on a tiny model: runs, writes JSON, and its methods
agree where they must."""

import json
import math

import pytest
from helpers.engine import token_loop_loglikelihood
from helpers.models import streaming

from streaming_lm.tools import bench_eval

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost


def test_bench_eval_tiny(tiny_dir, tiny, tmp_path, excerpt_text):
    text = tmp_path / "text.txt"
    text.write_text(excerpt_text[:400])
    out = tmp_path / "bench.json"
    results = bench_eval.main([
        "--model_args", f"pretrained={tiny_dir},dtype=float32", "--text_file", str(text), "--tokens", "150",
        "--start_size", "4", "--recent_size", "40", "--chunk_size", "16",
        "--methods", "dense,token,chunked,bare", "--json", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    m = results["methods"]
    assert results["tokens_scored"] == 149
    assert m["chunked"]["ppl"] == pytest.approx(m["token"]["ppl"], rel=1e-5)
    assert m["bare"]["ppl"] == pytest.approx(m["dense"]["ppl"], rel=1e-4)  # no eviction: dense numbers
    assert m["token"]["ppl"] != pytest.approx(m["dense"]["ppl"], rel=1e-4)
    # ... and it is the engine's token loop on the first 149 tokens after the prefix token.
    lm = streaming(tiny, start_size=4, recent_size=40)
    text = lm.tokenizer.decode(lm.tok_encode(excerpt_text[:400])[:149])
    assert m["token"]["ppl"] == pytest.approx(math.exp(-token_loop_loglikelihood(lm, text) / 149), rel=1e-6)
    assert set(results["ratios"]) == {"chunked/token", "chunked/dense"}


def test_bench_eval_recompute_rows(tiny_dir, tmp_path, excerpt_text):
    text = tmp_path / "text.txt"
    text.write_text(excerpt_text[:300])
    results = bench_eval.main([
        "--model_args", f"pretrained={tiny_dir},dtype=float32", "--text_file", str(text), "--tokens", "120",
        "--start_size", "4", "--recent_size", "28", "--methods", "dense,recompute", "--strides", "1,32",
        "--recompute_start_size", "0", "--batch_size", "3",
    ])
    m = results["methods"]
    assert set(m) == {"dense", "recompute:1", "recompute:32"}
    assert m["recompute:32"]["start_size"] == 0 and m["recompute:32"]["recent_size"] == 32
    assert m["recompute:1"]["ppl"] != pytest.approx(m["recompute:32"]["ppl"], rel=1e-6)
