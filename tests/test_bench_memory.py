"""streaming_lm.tools.bench_memory (scripts/bench_memory.py) on a tiny shape: its rows run, and where nothing is
evicted streaming_hf's numbers are hf's."""

import pytest

from streaming_lm.tools import bench_memory

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--num_key_value_heads", "1", "--max_gen_toks", "3"]


def rows(*extra):
    return bench_memory.rows_for(bench_memory.build_parser().parse_args(TINY + list(extra)))


def test_rows_and_a_child_process():
    specs = rows("--tokens", "200", "--methods", "knorm", "--rolling_tokens", "300")
    assert [(s["part"], s["name"]) for s in specs] == [
        ("once", "hf"), ("once", "streaming_hf knorm r=0.5"), ("rolling 300", "hf"),
        ("rolling 300", "streaming_hf sink_window 4+1020+0 every 1"),
        ("rolling 300", "streaming_hf knorm 4+0+1020 every 64")]
    assert specs[1]["args"] == {"policy": "knorm", "evict_every": "context", "compression_ratio": 0.5, "start_size": 0}
    once = bench_memory._run(specs[1])  # a process of its own, as every row
    assert once["peak_mib"] >= 0 and isinstance(once["out"], str)


def test_nothing_evicted_gives_hf_numbers():
    specs = rows("--methods", "", "--rolling_tokens", "300")[1:3]  # rolling: hf, then sink_window 4+1020
    hf, streaming = [bench_memory._child(spec) for spec in specs]
    assert streaming["out"] == pytest.approx(hf["out"], rel=1e-5)
