"""bench_eval's cache rows: what ``--caches``, ``--evict_every`` and ``--methods_suite`` ask for, and what is
derived from the scores (the PPL check of the fastest path, the speed ratio to sink_window chunked).

A cache entry is ``[LABEL=]POLICY:S+W+H[:PARAM=VALUE,...]``: a policy, its sizes and its own parameters (model
args, docs/policies.md). Each entry makes, per ``--evict_every`` value, a token-loop row and a chunked row; a row
no exact path serves is kept as ``n/a`` with the settings' reason (SnapKV at ``evict_every=1``, AdaKV chunked),
so a grid shows every cell. No torch import: every entry is validated before any model loads.
"""

from __future__ import annotations

import dataclasses
import re
import sys

from .. import settings

PATHS = ("token", "chunked")
PPL_REL = 1e-4  # the fastest path's PPL must be the token loop's to this (relative)
GOAL = 0.5  # issue 18: every method's fastest path at least this fraction of sink_window chunked's tokens/s

# The compression methods of docs/methods.md, each at C = 256 (sink_window: the 4 sinks + 252 recent tokens). The
# scored policies keep the same 4 sinks and fill the rest by their score, as their papers and kvpress do (no
# protected recent window), except H2O, which keeps half recent, half heavy hitters, as in its paper. SnapKV's
# observation window is 32 (it must be shorter than evict_every's segment: n/a at 1); PyramidKV's smallest layer
# budget C / beta must hold the 4 sinks and that window, so beta = 7 (C / 7 = 36.6).
SUITE = ",".join((
    "sink_window=sink_window:4+252",
    "tova=tova:4+0+252",
    "h2o=h2o:4+124+128",
    "knorm=knorm:4+0+252",
    "snapkv=snapkv:4+0+252:window_size=32",
    "pyramidkv=snapkv:4+0+252:window_size=32,layer_budgets=pyramid,beta=7",
    "adakv=snapkv:4+0+252:window_size=32,head_budgets=adaptive",
    "expected_attention=expected_attention:4+0+252",
))
SUITE_EVICT_EVERY = "1,64"
SUITE_METHODS = "dense"  # the dense model's PPL and speed beside the caches

FORMAT = "[LABEL=]POLICY:S+W+H[:PARAM=VALUE,...] (e.g. tova:0+0+256, pyramidkv=snapkv:4+0+252:window_size=32,beta=8)"
ENTRY = re.compile(r"(?:(?P<label>[A-Za-z_][\w.-]*)=)?(?P<policy>[^=]+?):(?P<sizes>\d+(?:\+\d+){0,2})"
                   r"(?::(?P<params>.*))?")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the bench: a cache (``cache``, its label; "" for the flags' own cache) read by one path."""

    name: str
    cache: str
    evict_every: int
    path: str  # token or chunked
    args: dict  # streaming_hf's args: knobs and the policy's parameters
    fastest: bool = False  # the fastest exact path of its cache at this evict_every
    reason: str | None = None  # why it does not run (n/a)


def row_name(cache: str, path: str, every: int) -> str:
    """``tova token``, ``chunked every=64``: evict_every=1 (the default) leaves the name as it always was."""
    return " ".join(part for part in (cache, path, "" if every == 1 else f"every={every}") if part)


def parse_everies(text: str) -> list[int]:
    """``--evict_every``: comma-separated integers >= 1, each a column of the grid."""
    try:
        everies = [int(v) for v in text.split(",")]
    except ValueError:
        everies = []
    if not everies or min(everies) < 1:
        sys.exit(f"--evict_every must be comma-separated integers >= 1, got {text!r}")
    return list(dict.fromkeys(everies))


def split_entries(text: str) -> list[str]:
    """Comma-separated entries; an item without ``:`` is one more ``PARAM=VALUE`` of the entry before it."""
    entries: list[str] = []
    for item in (e.strip() for e in text.split(",") if e.strip()):
        if ":" in item or not entries:
            entries.append(item)
        else:
            entries[-1] += "," + item
    return entries


def parse_entry(entry: str) -> tuple[str, dict, dict]:
    """(label, knobs, policy parameters) of one entry; a malformed one exits naming ``--caches``."""
    match = ENTRY.fullmatch(entry)
    pairs = [pair.partition("=") for pair in (match["params"] or "").split(",") if pair] if match else []
    if match is None or any(not key or not sep for key, sep, _ in pairs):
        sys.exit(f"--caches: {entry!r} is not {FORMAT}")
    start, recent, heavy = (int(v) for v in (match["sizes"].split("+") + ["0", "0"])[:3])
    params = {key: value for key, _, value in pairs}
    label = match["label"] or " ".join(
        [f"{match['policy']} {start}+{recent}+{heavy}", *([",".join(f"{k}={v}" for k, v in params.items())]
                                                          if params else [])])
    knobs = dict(policy=match["policy"], start_size=start, recent_size=recent, heavy_size=heavy)
    return label, knobs, params


def cache_rows(label: str, knobs: dict, params: dict, everies: list[int], paths=PATHS,
               strict: bool = True) -> list[Row]:
    """The rows of one cache: per evict_every, each of ``paths`` that an exact path serves, else n/a with the
    reason. A cache no evict_every can serve is bad input (``strict``; the suite's caches are n/a then): the
    settings' ValueError, before anything loads."""
    rows, refused = [], []
    for every in everies:
        served = {}
        for path in paths:
            try:
                settings.resolve(**knobs, evict_every=every, method=path, policy_params=params)
                served[path] = None
            except ValueError as error:
                served[path] = str(error)
        if all(reason is not None for reason in served.values()):
            refused.append(next(iter(served.values())))
        fastest = next((path for path in ("chunked", "token") if path in served and served[path] is None), None)
        rows += [Row(row_name(label, path, every), label, every, path, knobs | params | {"evict_every": every,
                                                                                        "method": path},
                     fastest=path == fastest, reason=reason) for path, reason in served.items()]
    if strict and len(refused) == len(everies):
        raise ValueError(refused[0])
    return rows


def parse_caches(text: str, everies: list[int], strict: bool = True) -> list[Row]:
    """Every ``--caches`` entry's rows, validated before any model loads."""
    return [row for entry in split_entries(text) for row in cache_rows(*parse_entry(entry), everies, strict=strict)]


def ppl_checks(rows: list[Row], results: dict) -> list[dict]:
    """Per cache and evict_every whose fastest path is not the token loop: that path's PPL against the token loop's
    on the same tokens (``ppl_on_token_text`` where the token loop read fewer tokens), ``PPL_REL`` relative."""
    checks = []
    for row in rows:
        if not row.fastest or row.path == "token":
            continue
        token = results.get(row_name(row.cache, "token", row.evict_every))
        fast = results.get(row.name)
        if token is None or fast is None:
            continue
        ppl = fast.get("ppl_on_token_text", fast["ppl"])
        rel = abs(ppl - token["ppl"]) / token["ppl"]
        checks.append({"row": row.name, "token_ppl": token["ppl"], "fast_ppl": ppl, "rel_diff": rel,
                       "tokens": token["tokens"], "ok": rel <= PPL_REL})
    return checks


def sink_window_ratios(rows: list[Row], results: dict) -> dict[int, str]:
    """Each row's tokens/s over sink_window chunked's at its evict_every (``vs_sink_window_chunked``, written into
    ``results``). Returns {evict_every: the reference row's name}."""
    reference = {}
    for row in rows:
        if (row.path == "chunked" and row.name in results and row.evict_every not in reference
                and row.args.get("policy", settings.DEFAULT_POLICY) == "sink_window"):
            reference[row.evict_every] = row.name
    for row in rows:
        if row.name in results and row.evict_every in reference:
            base = results[reference[row.evict_every]]["tokens_per_s"]
            results[row.name]["vs_sink_window_chunked"] = results[row.name]["tokens_per_s"] / base
    return reference


def goal_lines(rows: list[Row], results: dict, reference: dict[int, str]) -> list[str]:
    """Per evict_every above 1: which caches' fastest path reaches ``GOAL`` times sink_window chunked's speed."""
    lines = []
    for every, ref in reference.items():
        if every == 1:
            continue
        cells = [f"{row.cache or row.path} {results[row.name]['vs_sink_window_chunked']:.2f}x "
                 f"({row.path}) {'met' if results[row.name]['vs_sink_window_chunked'] >= GOAL else 'NOT met'}"
                 for row in rows if row.fastest and row.evict_every == every and row.name in results
                 and row.name != ref]
        if cells:
            lines.append(f"goal at evict_every={every}, fastest path >= {GOAL}x {ref!r}: " + "; ".join(cells))
    return lines
