"""The grid of settings: one ``Run`` per streaming_hf setting, plus the dense baseline."""

from __future__ import annotations

import dataclasses
import itertools
import re

from .. import settings as settings_mod
from .errors import CompareError

BASELINE = "hf"


@dataclasses.dataclass(frozen=True)
class Run:
    model: str  # "hf" or "streaming_hf"
    stream: dict  # streaming_hf model args as passed ({} for the baseline)

    @property
    def name(self) -> str:
        return run_name(self.model, self.stream)

    def describe(self) -> str:
        if self.model == BASELINE:
            return "hf (dense baseline)"
        return "streaming_hf " + " ".join(f"{k}={v}" for k, v in self.stream.items())


# Knobs with their own place in a run name; every other knob in settings.RESULT_KNOBS is appended when set.
_NAMED_KNOBS = ("start_size", "recent_size", "compression_ratio", "positions", "method", "policy", "heavy_size")


def knob(stream: dict, name: str):
    """A run's value for a knob: its own, else the default the model would use."""
    value = stream.get(name, settings_mod.ARG_DEFAULTS[name])
    if value is not None:
        return value
    policy = stream.get("policy", settings_mod.DEFAULT_POLICY)
    if name == "positions":
        try:
            return settings_mod.default_positions(policy)
        except ValueError:  # a plug-in named in old results that no longer imports: the scored default
            return "original"
    return {"recent_size": 0 if _scored(policy) else settings_mod.DEFAULT_RECENT_SIZE, "heavy_size": 0}.get(name)


def param_names(stream: dict) -> tuple[str, ...]:
    """The run's policy's own parameters (none when a plug-in named in old results no longer imports)."""
    try:
        return settings_mod.policy_param_names(stream.get("policy", settings_mod.DEFAULT_POLICY))
    except ValueError:
        return ()


def other_knobs(stream: dict) -> dict:
    """The result knobs a run sets beyond the named ones (e.g. stride), and its policy's parameters: runs
    differing in them differ in name."""
    names = (*settings_mod.RESULT_KNOBS, *param_names(stream))
    return {k: stream[k] for k in names if k not in _NAMED_KNOBS and stream.get(k) is not None}


def run_name(model: str, stream: dict) -> str:
    """Sub-directory and column name, e.g. ``streaming_s4_r252_shifted``; defaults filled as the model does."""
    if model == BASELINE:
        return BASELINE
    if stream.get("compression_ratio") is not None:
        size = f"cr{float(stream['compression_ratio']):g}"
        if stream.get("recent_size") is not None:  # a window protected inside the ratio's budget (h2o's half)
            size += f"_r{stream['recent_size']}"
    else:
        size = f"r{knob(stream, 'recent_size')}"
    policy = str(knob(stream, "policy"))
    # Runs of the default policy keep the names they had before policies existed; a plug-in path becomes a
    # folder name.
    default = policy == settings_mod.DEFAULT_POLICY
    prefix = "streaming" if default else "streaming_" + re.sub(r"[^\w]+", "-", policy)
    if (_scored(policy) or stream.get("heavy_size") is not None) and stream.get("compression_ratio") is None:
        size += f"_h{knob(stream, 'heavy_size')}"
    name = f"{prefix}_s{knob(stream, 'start_size')}_{size}_{knob(stream, 'positions')}"
    # The method is named only when chosen, so the model's default can change without renaming runs.
    name += f"_{stream['method']}" if stream.get("method") else ""
    # A value naming a file or folder (duo's pattern) must not nest the run's folder: separators become "-".
    return name + "".join(f"_{k}{_SEPARATORS.sub('-', str(v))}" for k, v in other_knobs(stream).items())


_SEPARATORS = re.compile(r"[^\w.+-]+")


def _scored(policy: str) -> bool:
    try:
        return settings_mod.is_scored(policy)
    except ValueError:  # a plug-in named in old results that no longer imports: plug-ins are scored
        return True


def _split(text: str | None, convert, flag: str) -> list:
    if text is None:
        return []
    values = []
    for item in (part.strip() for part in text.split(",")):
        try:
            values.append(convert(item))
        except ValueError:
            raise CompareError(f"{flag}: {item!r} is not a valid value; expected comma-separated numbers") from None
    return list(dict.fromkeys(values))  # drop repeats, keep order


def build_grid(
    start_sizes, recent_sizes, compression_ratios, positions, method=None, max_length=None, chunk_size=None,
    strides=(), policies=(), heavy_sizes=(), evict_every=(), params: dict[str, list] | None = None,
    query_size=None,
) -> list[Run]:
    """The baseline plus one run per setting, every setting validated by ``settings.resolve``.

    ``params``: policy parameter -> values, one grid axis each; an axis applies to the runs whose policy
    declares that parameter (every parameter must belong to a policy of the grid). ``query_size``: for the runs
    with ``evict_every=context``."""
    if recent_sizes and compression_ratios:
        # Both budget the same cache (C); mixing them would put two kinds of x value on one axis.
        raise CompareError("give --recent-sizes or --compression-ratios, not both")
    if not recent_sizes and not compression_ratios:
        raise CompareError("give --recent-sizes or --compression-ratios (comma-separated lists)")
    size_key, sizes = ("recent_size", recent_sizes) if recent_sizes else ("compression_ratio", compression_ratios)
    runs = [Run(BASELINE, {})]
    params = params or {}
    _check_param_axes(params, policies or [settings_mod.DEFAULT_POLICY])
    combos = itertools.product(policies or [None], positions or [None], start_sizes, sizes, strides or [None],
                               heavy_sizes or [None], evict_every or [None])
    for policy, pos, start, size, stride, heavy, every in combos:
        axes = [name for name in params if name in settings_mod.policy_param_names(policy or
                                                                                    settings_mod.DEFAULT_POLICY)]
        for values in itertools.product(*(params[name] for name in axes)):
            runs.append(_run(policy, pos, start, size_key, size, stride, heavy, every, dict(zip(axes, values)),
                             method, chunk_size, max_length, query_size))
    return _unique(runs)


def _check_param_axes(params: dict, policies: list) -> None:
    for name in params:
        if not any(name in _param_names_of(policy) for policy in policies):
            have = {policy: ", ".join(_param_names_of(policy)) or "none" for policy in policies}
            raise CompareError(f"--param {name}: no policy of the grid has it; their parameters: "
                               + "; ".join(f"{policy}: {names}" for policy, names in have.items()))


def _param_names_of(policy: str) -> tuple[str, ...]:
    try:
        return settings_mod.policy_param_names(policy)
    except ValueError as error:
        raise CompareError(str(error)) from None


def _run(policy, pos, start, size_key, size, stride, heavy, every, param_values: dict, method, chunk_size,
         max_length, query_size=None) -> Run:
    default = settings_mod.default_positions(policy or settings_mod.DEFAULT_POLICY, every)
    stream = {"start_size": start, size_key: size, "positions": pos or default}
    if policy not in (None, settings_mod.DEFAULT_POLICY):
        stream["policy"] = policy
        if heavy is not None:
            stream["heavy_size"] = heavy
    if method is not None:
        stream["method"] = method
    if stride is not None:
        stream["stride"] = stride
    if every is not None:
        stream["evict_every"] = every
    if query_size is not None and every == "context":
        stream["query_size"] = query_size
    if chunk_size is not None:  # speed only: same numbers, so not part of the run's name
        stream["chunk_size"] = chunk_size
    return validated_run(stream, param_values, max_length)


def validated_run(stream: dict, param_values: dict, max_length) -> Run:
    """The streaming_hf run of ``stream`` (its knobs) and ``param_values`` (its policy's parameters), checked by
    ``settings.resolve`` as streaming_hf checks them and named by the values it resolved."""
    try:
        resolved = settings_mod.resolve(**stream, policy_params=param_values, max_length=max_length)
    except ValueError as error:
        shown = " ".join(f"{k}={v}" for k, v in (stream | param_values).items())
        raise CompareError(f"bad grid setting ({shown}): {error}") from None
    # Pass the validated values on, so "04" and 4 are one run with one name.
    for key in ("start_size", "recent_size", "stride", "heavy_size", "evict_every", "query_size"):
        if key in stream:
            stream[key] = getattr(resolved, key)
    # A policy parameter is a model arg of its own (policy=<name>,<param>=<value>).
    stream.update({name: resolved.policy_params[name] for name in param_values})
    return Run("streaming_hf", stream)


def _unique(runs: list[Run]) -> list[Run]:
    seen, out = set(), []
    for run in runs:
        if run.name not in seen:
            seen.add(run.name)
            out.append(run)
    return out
