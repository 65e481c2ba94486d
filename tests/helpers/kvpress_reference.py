"""NVIDIA kvpress 0.5.5's numbers on SmolLM2 (tests/data/kvpress_reference.json; docs/kvpress.md).

Made by scripts/kvpress_reference.py in kvpress's own venv; nothing here imports kvpress. An engine test is one line
per method:

    assert_logprobs_match_kvpress("snapkv", lambda context, continuation, case: engine_logprobs(...))
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "kvpress_reference.json"
DUO_PATTERN = REFERENCE.parent / "duo_pattern_smollm2"  # made up (seeded): no one measured SmolLM2's heads
METHODS = ("sink_window", "knorm", "tova", "snapkv", "pyramidkv", "adakv_snapkv", "adakv_expected_attention",
           "expected_attention", "duo", "random", "keydiff", "lagkv", "observed_attention", "rerotated_knorm", "rerotated_snapkv", "cur",
           "chunkkv", "critical_snapkv", "leverage", "compactor", "adakv_compactor",
           "critical_adakv_snapkv", "kvzip", "kvzip_plus_layerwise", "kvzip_template", "qfilter")
# KeyRerotationPress: the kept keys re-rotated to 0 .. kept - 1 (the engine's positions=shifted in the context regime)
REROTATED = ("rerotated_knorm", "rerotated_snapkv")
# On the contexts that open with SmolLM2's chat template (2 and 3), as kvpress's pipeline writes a context: KVzip then
# replays it without the opening
TEMPLATED = ("kvzip_template",)
RATIOS = (0.5, 0.25)  # and 0.0 (nothing compressed) at Q = 8


def contexts_of(method: str) -> tuple[int, int]:
    """The file's contexts a method's cases use: 0 and 1 (BOS + text), or 2 and 3 (chat template + the same text)."""
    return (2, 3) if method in TEMPLATED else (0, 1)
QS = (1, 8)
REL = 1e-4


def weights_sha256(model) -> str:
    """Over the decoder's tensors (model.*) sorted by name (the tied lm_head is the embedding): the same float32
    weights in kvpress's venv (transformers 5.2) and the project's."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("model."):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def read_duo_pattern(folder: Path = DUO_PATTERN) -> tuple[int, int, np.ndarray]:
    """A DuoAttention pattern folder as kvpress reads one: (sink_size, recent_size, head scores clipped to [0, 1])."""
    config = json.loads((folder / "config.json").read_text())
    scores = np.loadtxt(folder / "full_attention_heads.tsv", dtype=float, delimiter="\t", ndmin=2)
    return config["sink_size"], config["recent_size"], np.clip(scores, 0, 1)


@dataclass(frozen=True)
class PressCase:
    """One kvpress run: `method` at `compression_ratio`, prefill = context[:-q], then context[-q:] + continuation."""

    method: str
    params: dict
    compression_ratio: float
    q: int
    context: int  # index into the file's contexts
    context_ids: list
    continuation_ids: list
    logprobs: list  # per continuation token, float64
    greedy_ids: list  # kvpress's greedy answer after reading context[-q:] (stops early at EOS)
    held_per_layer: list  # tokens held after the event (per key/value head on average for AdaKV and Duo)
    held_per_head: list | None  # (layers, kv heads), AdaKV and Duo only
    kept_b64: list  # per layer: packed bits of a (kv heads, prefill tokens) kept mask
    question_read: str
    ties_at_cut: list  # per layer and head (AdaKV: per layer, as [head, token]): the tied tokens kvpress kept/evicted

    @property
    def name(self) -> str:
        return f"{self.method} r={self.compression_ratio} Q={self.q} context {self.context}"

    @property
    def prefill_tokens(self) -> int:
        return len(self.context_ids) - self.q

    def kept(self, heads: int) -> list[np.ndarray]:
        """Per layer a bool (heads, prefill tokens) array: which tokens of the prefill each head keeps."""
        n = self.prefill_tokens
        return [np.unpackbits(np.frombuffer(base64.b64decode(b), np.uint8))[: heads * n].reshape(heads, n).astype(bool)
                for b in self.kept_b64]


@functools.cache
def load() -> dict:
    return json.loads(REFERENCE.read_text())


def cases(method: str | None = None, *, ratio: float | None = None) -> list[PressCase]:
    data = load()
    found = []
    for raw in data["cases"]:
        if method is not None and raw["method"] != method or ratio is not None and raw["compression_ratio"] != ratio:
            continue
        context = data["contexts"][raw["context"]]
        found.append(PressCase(
            method=raw["method"], params=raw["params"], compression_ratio=raw["compression_ratio"], q=raw["q"],
            context=raw["context"], context_ids=context["context_ids"], continuation_ids=context["continuation_ids"],
            logprobs=raw["logprobs"], greedy_ids=raw["greedy_ids"], held_per_layer=raw["held_per_layer"],
            held_per_head=raw.get("held_per_head"), kept_b64=raw["kept_b64"], question_read=raw["question_read"],
            ties_at_cut=raw.get("ties_at_cut") or [],
        ))
    return found


def tied_cells(case: PressCase, heads: int) -> list[np.ndarray]:
    """Per layer a bool (heads, prefill tokens) array: the (head, token) cells kvpress's cut tied (``ties_at_cut``),
    where its ``topk`` chose among scores within 1e-5 relative (docs/kvpress.md, "Ties")."""
    cells = [np.zeros((heads, case.prefill_tokens), dtype=bool) for _ in case.kept_b64]
    for tie in case.ties_at_cut:
        for point in tie["kept"] + tie["evicted"]:
            head, token = point if tie["head"] is None else (tie["head"], point)
            cells[tie["layer"]][head, token] = True
    return cells


def logprob_mismatch(actual: list[float], expected: list[float], rel: float = REL) -> str | None:
    """None when every token agrees to `rel` relative (of max(|expected|, 1 nat)) and the sums to `rel` relative."""
    if len(actual) != len(expected):
        return f"{len(actual)} log-probabilities, expected {len(expected)}"
    worst = max(abs(a - e) / max(abs(e), 1.0) for a, e in zip(actual, expected))
    total = abs(sum(actual) - sum(expected)) / max(abs(sum(expected)), 1.0)
    if worst > rel or total > rel:
        return f"sum {sum(actual):.6f} vs {sum(expected):.6f}, worst token off by {worst:.2e} (relative)"
    return None


def assert_logprobs_match_kvpress(
    method: str,
    continuation_logprobs: Callable[[list, list, PressCase], list],
    *,
    ratio: float | None = None,
    rel: float = REL,
) -> int:
    """Every case of `method` (or one ratio): `continuation_logprobs(context_ids, continuation_ids, case)` must give
    kvpress's per-token log-probabilities. Raises listing every failing case; returns how many were compared."""
    selected = cases(method, ratio=ratio)
    assert selected, f"no kvpress case for method={method!r} ratio={ratio!r}"
    failures = []
    for case in selected:
        problem = logprob_mismatch(list(continuation_logprobs(case.context_ids, case.continuation_ids, case)),
                                   case.logprobs, rel)
        if problem:
            failures.append(f"{case.name}: {problem}")
    assert not failures, "differs from kvpress 0.5.5:\n" + "\n".join(failures)
    return len(selected)


def assert_greedy_matches_kvpress(
    method: str, generate: Callable[[list, PressCase], list], *, ratio: float | None = None
) -> int:
    """`generate(context_ids, case)` (at most the file's `new_tokens` greedy tokens, stopping at EOS) must give
    kvpress's tokens exactly."""
    selected = cases(method, ratio=ratio)
    assert selected, f"no kvpress case for method={method!r} ratio={ratio!r}"
    failures = [f"{case.name}: {got} vs {case.greedy_ids}" for case in selected
                if (got := [int(t) for t in generate(case.context_ids, case)]) != case.greedy_ids]
    assert not failures, "greedy tokens differ from kvpress 0.5.5:\n" + "\n".join(failures)
    return len(selected)
