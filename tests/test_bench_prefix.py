"""streaming_lm.tools.bench_prefix (scripts/bench_prefix.py) on the tiny model: runs, and what it compares agrees."""

import json

import pytest

from streaming_lm.tools import bench_prefix

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_prefix_tiny(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    results = bench_prefix.main([
        "--model_args", f"pretrained={tiny_dir},dtype=float32", "--docs", "3", "--passage_words", "6",
        "--hf_batch_sizes", "1,4", "--queries", "4", "--unshared_sample", "2", "--recent_size", "2000",
        "--chunk_size", "64", "--json", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    mc, se = results["mc"], results["streameval"]
    assert mc["requests"] == 12 and set(mc["rows"]) == {"hf bs=1", "hf bs=4", "streaming_hf unshared",
                                                        "streaming_hf shared"}
    shared, unshared = mc["rows"]["streaming_hf shared"], mc["rows"]["streaming_hf unshared"]
    assert shared["context_tokens_read"] < unshared["context_tokens_read"]
    assert shared["max_abs_diff_vs_hf"] < 1e-3 and shared["same_greedy_as_hf"]  # nothing evicted: hf's numbers
    assert se["queries"] == 4 and se["rows"]["unshared"]["queries"] == 2 and se["same_answers"]
    assert se["rows"]["shared"]["context_tokens_read"] == se["longest_context_tokens"]  # a chain: read once
    assert se["tokens_ratio"] > 1


def test_sample_indices():
    assert bench_prefix.sample_indices(100, 5) == [20, 40, 59, 79, 99]
    assert bench_prefix.sample_indices(3, 0) == bench_prefix.sample_indices(3, 5) == [0, 1, 2]
