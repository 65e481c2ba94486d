"""streaming_lm.tools.bench_eval (scripts/bench_eval.py) on a tiny model: runs, writes JSON, and its methods
agree where they must."""

import json
import math

import pytest
from helpers.engine import token_loop_loglikelihood
from helpers.models import streaming

from streaming_lm.tools import bench_caches, bench_eval

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


# The methods suite scaled to a tiny model: C = 16 (sink_window 2+14), evict_every 1 and 8, SnapKV's window 4
# (PyramidKV: C / beta = 8 holds it and the 2 sinks).
TINY_GRID = ",".join((
    "sink_window=sink_window:2+14", "tova=tova:2+0+14", "h2o=h2o:2+6+8", "knorm=knorm:2+0+14",
    "snapkv=snapkv:2+0+14:window_size=4", "pyramidkv=snapkv:2+0+14:window_size=4,layer_budgets=pyramid,beta=2",
    "adakv=snapkv:2+0+14:window_size=4,head_budgets=adaptive", "expected_attention=expected_attention:2+0+14",
))


def test_bench_eval_methods_grid(tiny_dir, tmp_path, excerpt_text):
    """Every method at evict_every 1 and 8: the token loop (over the first 60 tokens) and the chunked path (over 120,
    and over the token loop's 60 for the check) give the same PPL, each row says what it held and how fast it was
    against sink_window chunked, and what no path serves is n/a with the reason."""
    text = tmp_path / "text.txt"
    text.write_text(excerpt_text[:400])
    out = tmp_path / "bench.json"
    results = bench_eval.main([
        "--model_args", f"pretrained={tiny_dir},dtype=float32", "--text_file", str(text), "--tokens", "121",
        "--token_tokens", "61", "--chunk_size", "16", "--methods", "", "--caches", TINY_GRID, "--evict_every", "1,8",
        "--json", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    m, not_run = results["methods"], results["not_run"]
    assert results["complete"] and list(m)[:2] == ["sink_window token", "sink_window chunked"]
    served = {"tova", "h2o", "knorm", "expected_attention", "sink_window"}
    assert set(not_run) == {f"{c} {p}" for c in ("snapkv", "pyramidkv", "adakv") for p in ("token", "chunked")}
    assert "evict_every > window_size" in not_run["snapkv token"]
    assert set(m) == ({f"{c} {p}" for c in served for p in ("token", "chunked")}
                      | {f"{c} {p} every=8" for c in served | {"snapkv", "pyramidkv", "adakv"}
                         for p in ("token", "chunked")})
    for name, row in m.items():
        assert row["tokens"] == (60 if row["path"] == "token" else 120), name
        assert row["fastest"] == (row["path"] == "chunked"), name
        every = row["evict_every"]
        assert row["held_max"] >= 16, name  # C, plus the segment since an event; more in a pyramid's first layers
        most = 2 * 16 if row["cache"] in ("pyramidkv", "adakv") else 16  # a pyramid's first layer, an AdaKV head
        assert row["held_max"] <= most + every - 1, name
        base = m["sink_window chunked" + ("" if every == 1 else f" every={every}")]["tokens_per_s"]
        assert row["vs_sink_window_chunked"] == pytest.approx(row["tokens_per_s"] / base)
    assert m["pyramidkv token every=8"]["held_per_layer"][0] > m["pyramidkv token every=8"]["held_per_layer"][-1]
    checks = results["ppl_checks"]
    assert sorted(c["row"] for c in checks) == sorted(n for n, row in m.items() if row["path"] == "chunked")
    assert all(c["ok"] and c["tokens"] == 60 and c["rel_diff"] <= 1e-4 for c in checks)
    # the check compared the same 60 tokens: the chunked path's PPL over 120 tokens is another number
    assert all(m[c["row"]]["ppl"] != pytest.approx(c["fast_ppl"], rel=1e-3) for c in checks)
    assert m["tova chunked"]["ppl"] != pytest.approx(m["h2o chunked"]["ppl"], rel=1e-4)


def test_ppl_check_fails_on_a_different_path():
    rows = bench_caches.parse_caches("tova:2+0+14", [1])
    results = {"tova 2+0+14 token": {"ppl": 10.0, "tokens": 60},
               "tova 2+0+14 chunked": {"ppl": 12.0, "ppl_on_token_text": 10.002, "tokens": 120}}
    (check,) = bench_caches.ppl_checks(rows, results)
    assert check["row"] == "tova 2+0+14 chunked" and not check["ok"] and check["rel_diff"] == pytest.approx(2e-4)
    results["tova 2+0+14 chunked"]["ppl_on_token_text"] = 10.0005
    assert bench_caches.ppl_checks(rows, results)[0]["ok"]


def test_methods_suite_grid():
    """The issue's grid, resolved without a model: eight methods at C = 256, evict_every 1 and 64, dense beside."""
    args = bench_eval.parse_args(["--pretrained", "x", "--methods_suite"])
    assert (args.methods, args.evict_everies) == ("dense", "1,64")
    rows = bench_caches.parse_caches(bench_caches.SUITE, bench_caches.parse_everies(args.evict_everies))
    caches = list(dict.fromkeys(row.cache for row in rows))
    assert caches == ["sink_window", "tova", "h2o", "knorm", "snapkv", "pyramidkv", "adakv", "expected_attention"]
    assert all(row.args["start_size"] + row.args["recent_size"] + row.args["heavy_size"] == 256 for row in rows)
    not_served = {row.name for row in rows if row.reason}
    assert not_served == {f"{c} {p}" for c in ("snapkv", "pyramidkv", "adakv") for p in ("token", "chunked")}
    fastest = {row.name for row in rows if row.fastest}
    assert fastest == {f"{c} chunked{e}" for c in caches for e in ("", " every=64")} - not_served


def test_methods_suite_at_one_evict_every():
    """--methods_suite --evict_every 1: the SnapKV family is n/a (its window needs a longer segment), not an error;
    the same cache given in --caches is refused."""
    rows = bench_caches.parse_caches(bench_caches.SUITE, [1], strict=False)
    assert {row.cache for row in rows if row.reason} == {"snapkv", "pyramidkv", "adakv"}
    with pytest.raises(ValueError, match="evict_every > window_size"):
        bench_caches.parse_caches("snapkv:4+0+252:window_size=32", [1])
