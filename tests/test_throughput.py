"""streaming_lm.tools.throughput (scripts/throughput.py) on the tiny local checkpoint: JSON, PNG, the table
(bad arguments: tests/test_bad_inputs.py, cases throughput-*)."""

import json
from pathlib import Path

import pytest
from helpers.engine import score_stream
from helpers.models import streaming
from helpers.reference import perplexity

from streaming_lm.rotary import find_rotary
from streaming_lm.tools import throughput

REPO = Path(__file__).resolve().parents[1]
EXCERPT = REPO / "tests" / "data" / "wikitext-excerpt.txt"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_runs_and_writes_json_and_png(tiny_dir, tiny, tmp_path, capsys):
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    results = throughput.main([
        "--pretrained", str(tiny_dir), "--prompt-file", str(EXCERPT), "--prompt-tokens", "16",
        "--start-size", "4", "--recent-size", "28", "--new-tokens", "80", "--ppl-tokens", "120",
        "--json", str(out_json), "--plot", str(out_png),
    ])
    printed = capsys.readouterr().out
    for row in ("PPL (lower is better)", "Memory (MB)", "Throughput (t/s)", "Baseline", "StreamingLLM", "Change"):
        assert row in printed
    saved = json.loads(out_json.read_text())
    assert saved["warnings"] == []
    dense, stream = saved["decode"]["dense"], saved["decode"]["streaming"]
    assert dense["new_tokens"] == stream["new_tokens"] == 80
    assert len(stream["latency_ms"]) == 79 and len(stream["kv_bytes"]) == 80
    # Dense holds prompt + 79 fed tokens; streaming exactly C = 32, whatever the length.
    per_token = saved["kv_check"]["bytes_per_token"]
    assert dense["kv_bytes"][-1] == (16 + 79) * per_token
    assert stream["peak_kv_bytes"] == 32 * per_token and saved["kv_check"]["exactly_capacity"]
    assert stream["tokens_per_s"] > 0 and dense["tokens_per_s"] > 0
    # With a cache larger than prompt + generation, greedy tokens would be the dense ones; here they evict.
    assert saved["ppl"]["streaming"]["evicted"] == 120 - 1 - 32
    assert saved["ppl"]["streaming"]["ppl"] != saved["ppl"]["dense"]["ppl"]
    # ... and the streaming PPL is the token loop's on the same 120 ids.
    lm = streaming(tiny, start_size=4, recent_size=28)
    scored = score_stream(lm.model, lm.rolling_ids(EXCERPT.read_text())[:120], lm.streaming, find_rotary(lm.model))
    assert saved["ppl"]["streaming"]["ppl"] == pytest.approx(perplexity(scored.logprobs), rel=1e-5)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["cache"]["capacity"] == 32


def test_large_cache_generates_the_dense_tokens(tiny_dir):
    results = throughput.main([
        "--pretrained", str(tiny_dir), "--prompt-file", str(EXCERPT), "--prompt-tokens", "16",
        "--recent-size", "200", "--new-tokens", "40", "--ppl-tokens", "0",
    ])
    assert results["decode"]["streaming"]["tokens"] == results["decode"]["dense"]["tokens"]
