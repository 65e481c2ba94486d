"""kvpress's leaderboard as one grid (``compare --leaderboard``): every method it ranks that runs here, plus ours,
at its four compression ratios, and the table and plot it publishes (methods × ratios). See docs/compare.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import settings as settings_mod
from .errors import CompareError, say
from .grid import BASELINE, Run, knob, param_names, validated_run
from .report import main_metric, metrics, pyplot
from .report import write_csv as write_rows
from .results import Result

RATIOS = (0.25, 0.5, 0.75, 0.875)  # kvpress's leaderboard


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the leaderboard: a method as kvpress names it, and the streaming_hf settings that are it."""

    label: str
    policy: str
    params: tuple = ()  # (name, value) pairs: the policy parameters that make the method (AdaKV's budgets, ...)
    start_size: int = 0  # kvpress's scorer presses protect no sinks; StreamingLLM's n_sink is 4
    evict_every: object = "context"  # kvpress's regime: once, after the context
    ratio_param: str = "compression_ratio"  # duo: the share of streaming heads (head_compression_ratio)
    half_recent: bool = False  # h2o: half of C a recent window, half heavy hitters (the paper's split)
    needs: str = ""  # a parameter the user must give (--param NAME=...), else the row is left out

    def stream(self, ratio: float, max_length: int) -> tuple[dict, dict]:
        """The run's streaming args and policy parameters at ``ratio``."""
        stream = {"start_size": self.start_size,
                  "positions": settings_mod.default_positions(self.policy, self.evict_every)}
        params = dict(self.params)
        if self.ratio_param == "compression_ratio":
            stream["compression_ratio"] = ratio
        else:
            params[self.ratio_param] = ratio
        if self.policy != settings_mod.DEFAULT_POLICY:
            stream["policy"] = self.policy
        if self.evict_every != 1:
            stream["evict_every"] = self.evict_every
        if self.half_recent:
            stream["recent_size"] = max(1, settings_mod.ratio_capacity(ratio, max_length) // 2)
        return stream, params


# kvpress's leaderboard (https://huggingface.co/spaces/nvidia/kvpress-leaderboard) as far as it runs offline, in its
# order, then ours: methods it does not rank, every K tokens. kvzap needs a trained gate model, finch a question split
# (docs/kvpress.md).
ENTRIES = (
    Entry("random", "random"),
    Entry("knorm", "knorm"),
    Entry("snapkv", "snapkv"),
    Entry("expected_attention", "expected_attention", (("head_budgets", "adaptive"),)),  # as the leaderboard: AdaKV
    Entry("streaming_llm", settings_mod.DEFAULT_POLICY, start_size=4),
    Entry("tova", "tova"),
    Entry("observed_attention", "observed_attention"),
    Entry("qfilter", "qfilter", needs="filters"),  # the model's Q-Filters from the Hub, downloaded once
    Entry("pyramidkv", "snapkv", (("layer_budgets", "pyramid"),)),
    Entry("lagkv", "lagkv"),
    Entry("keydiff", "keydiff"),
    Entry("cur", "cur"),
    Entry("adakv_compactor", "compactor", (("head_budgets", "adaptive"),)),
    Entry("kvzip", "kvzip"),
    Entry("adakv_snapkv", "snapkv", (("head_budgets", "adaptive"),)),
    Entry("chunkkv", "snapkv", (("chunk_length", 20),)),  # the leaderboard's: ChunkKV over SnapKV, chunks of 20
    Entry("duo_attention", "duo", ratio_param="head_compression_ratio", needs="pattern"),
    Entry("h2o every 64", "h2o", evict_every=64, half_recent=True),
    Entry("sink_window every token", settings_mod.DEFAULT_POLICY, start_size=4, evict_every=1),
)


def leaderboard_grid(ratios, max_length, given: dict[str, list], extra: dict | None = None) -> list[Run]:
    """The baseline, then every entry at every ratio. ``given``: ``--param NAME=V`` values, for the entries that need
    one (duo's pattern); an entry whose need is not given is left out, said so. ``extra``: knobs for every run
    (``method``, ``chunk_size``; ``query_size`` for the once-after-the-context runs)."""
    if max_length is None:
        raise CompareError("--leaderboard needs max_length in --model_args (e.g. max_length=1024): the every-K rows "
                           "size their cache C = round((1 - r) * max_length)")
    if unused := [name for name in given if not any(e.needs == name for e in ENTRIES)]:
        raise CompareError(f"--leaderboard takes --param only for {', '.join(e.needs for e in ENTRIES if e.needs)}; "
                           f"got {', '.join(unused)}")
    runs = [Run(BASELINE, {})]
    for entry in ENTRIES:
        if entry.needs and entry.needs not in given:
            say(f"--leaderboard: leaving out {entry.label}: it needs --param {entry.needs}=... "
                f"(policy={entry.policy}'s {entry.needs}: docs/policies.md)")
            continue
        for ratio in ratios or RATIOS:
            stream, params = entry.stream(float(ratio), int(max_length))
            if entry.needs:
                params[entry.needs] = given[entry.needs][0]
            for name, value in (extra or {}).items():
                if value is not None and (name != "query_size" or entry.evict_every == "context"):
                    stream[name] = value
            runs.append(validated_run(stream, params, max_length))
    return runs


def entry_of(result: Result) -> tuple[Entry, float] | None:
    """The leaderboard row and ratio a streaming run is, or None (a run of some other grid)."""
    stream = result.stream
    params = {k: str(stream[k]) for k in param_names(stream) if k in stream}
    for entry in ENTRIES:
        every = stream.get("evict_every", 1)
        ratio = stream.get(entry.ratio_param)
        own = {k: v for k, v in params.items() if k not in (entry.ratio_param, entry.needs)}
        if (knob(stream, "policy") == entry.policy and int(knob(stream, "start_size")) == entry.start_size
                and str(every) == str(entry.evict_every) and own == {k: str(v) for k, v in entry.params}
                and ratio is not None):
            return entry, float(ratio)
    return None


def _tasks(results: list[Result], metric: str) -> tuple[list[str], str | None]:
    """The tasks reporting ``metric`` (groups last) and the group that averages them, if lm-eval reported one."""
    names = list(dict.fromkeys(t for r in results for t, m, _ in metrics(r.data) if m == metric))
    groups = {g for r in results for g in r.data.get("groups", {})}
    group = next((t for t in names if t in groups), None)
    return [t for t in names if t not in groups], group


def table(results: list[Result], metric: str) -> tuple[list[float], dict[str, dict], dict[str, float]]:
    """(ratios, {label: {(task, ratio): value}}, {task: dense value}); task "average" is the group's value (lm-eval's
    mean of its tasks), or the tasks' mean when no group was run."""
    tasks, group = _tasks(results, metric)
    cells: dict[str, dict] = {}
    dense: dict[str, float] = {}
    ratios = set()

    def row(data) -> dict[str, float]:
        values = {t: v for t, m, v in metrics(data) if m == metric}
        out = {t: values[t] for t in tasks if t in values}
        if group in values:
            out["average"] = values[group]
        elif out and len(out) == len(tasks):
            out["average"] = sum(out.values()) / len(out)
        return out

    for result in results:
        if result.model == BASELINE:
            dense = row(result.data)
            continue
        found = entry_of(result)
        if found is None:
            continue
        entry, ratio = found
        ratios.add(ratio)
        cells.setdefault(entry.label, {}).update({(t, ratio): v for t, v in row(result.data).items()})
    order = [e.label for e in ENTRIES if e.label in cells]
    return sorted(ratios), {label: cells[label] for label in order}, dense


def markdown(results: list[Result], metric: str) -> str:
    ratios, cells, dense = table(results, metric)
    tasks, _ = _tasks(results, metric)
    lines = [f"# kvpress's leaderboard: {metric} (× 100)", ""]
    for task in ["average", *tasks]:
        lines += [f"## {task}", "", "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                  "|---|" + "---:|" * len(ratios)]
        if task in dense:
            lines.append("| dense (hf) | " + " | ".join(f"{100 * dense[task]:.1f}" for _ in ratios) + " |")
        for label, values in cells.items():
            shown = [values.get((task, r)) for r in ratios]
            lines.append(f"| {label} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in shown) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, results: list[Result], metric: str) -> None:
    ratios, cells, dense = table(results, metric)
    tasks = ["average", *_tasks(results, metric)[0]]
    rows = [{"method": "dense (hf)", "compression_ratio": None, **{t: dense.get(t) for t in tasks}}] if dense else []
    rows += [{"method": label, "compression_ratio": r, **{t: values.get((t, r)) for t in tasks}}
             for label, values in cells.items() for r in ratios]
    write_rows(path, ["method", "compression_ratio", *tasks], rows)


def write_plot(path: Path, results: list[Result], metric: str) -> bool:
    """The leaderboard's plot: the average against the compression ratio, one line per method, dense dashed."""
    plt = pyplot(path.name)
    if plt is None:
        return False
    ratios, cells, dense = table(results, metric)
    fig, ax = plt.subplots(figsize=(8, 5))
    for number, (label, values) in enumerate(cells.items()):
        points = [(r, 100 * values[("average", r)]) for r in ratios if ("average", r) in values]
        if points:  # ten colours, then the same colours dashed
            ax.plot(*zip(*points), marker="o", label=label, linestyle="-" if number < 10 else "--")
    if "average" in dense:
        ax.axhline(100 * dense["average"], color="black", linestyle=":", label="dense (hf)")
    ax.set(xlabel="compression ratio", ylabel=f"average {metric} (× 100)", xticks=ratios)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_leaderboard(output_dir: Path, results: list[Result], metric: str | None) -> dict[str, Path]:
    """leaderboard.md, leaderboard.csv and leaderboard.png from the runs that are leaderboard rows."""
    if metric is None:
        tasks = list(dict.fromkeys(t for r in results for t in r.data.get("results", {})))
        metric = next((m for t in tasks if (m := main_metric(results, t))), None)
    if metric is None or not any(entry_of(r) for r in results if r.model != BASELINE):
        raise CompareError("--leaderboard: no leaderboard run among the results")
    written = {"leaderboard_md": output_dir / "leaderboard.md", "leaderboard_csv": output_dir / "leaderboard.csv"}
    text = markdown(results, metric)
    written["leaderboard_md"].write_text(text, encoding="utf-8")
    write_csv(written["leaderboard_csv"], results, metric)
    if write_plot(output_dir / "leaderboard.png", results, metric):
        written["leaderboard_png"] = output_dir / "leaderboard.png"
    print(text)
    return written

