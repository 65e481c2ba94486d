"""Attention functions registered with transformers' ``AttentionInterface`` (chunked.py, weights.py,
scored_chunked.py, context.py): how a forward pass hands them their state, the check that every layer ran
them, the probe that tells whether a loaded model's attention reaches them at all, and the row arithmetic
they share.

A pass's state travels in a context variable, not in the forward's keyword arguments: a decoder layer that
drops those (StableLM's, Falcon's) still calls the interface, and the state reaches it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging as transformers_logging

from ..forward_args import num_decoder_layers


def grouped_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, Q, D] -> [B, kv_heads, group * Q, D]: each key/value head's query heads as rows, so
    grouped-query attention needs no copies of the keys."""
    batch, _, _, dim = query.shape
    return query.reshape(batch, kv_heads, -1, dim)


def soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-style logit soft-capping (the ``softcap`` kwarg transformers passes), else the logits."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def held_then_causal(query, key, value, scaling: float, dead: torch.Tensor | None = None, softcap: float | None = None):
    """Attention where every row sees every held key (``dead``: bool [kv_heads, K] padding of heads holding fewer,
    masked) and then this pass's tokens causally: rows read with nothing evicted (the context regime, continuations
    read as a batch). Returns the output in transformers' [B, Q, heads, D] layout, and None."""
    heads, q_len, columns = query.shape[1], query.shape[2], key.shape[2]
    group = heads // key.shape[1]
    if softcap is None and dead is None and q_len in (1, columns):
        # Nothing masked but causality: a pass from an empty cache (a prefill read in one pass) or one query over
        # every held key; SDPA's causal kernels (flash on a GPU) need no mask.
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    allowed = torch.ones((q_len, columns), dtype=torch.bool, device=query.device).tril(columns - q_len)[None, None]
    if dead is not None:
        allowed = allowed & ~dead.repeat_interleave(group, dim=0)[None, :, None, :]
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=True)
    else:  # Gemma-style soft-capping: eager, float32 softmax
        keys, values = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        logits = soft_capped(torch.matmul(query, keys.transpose(-1, -2)) * scaling, softcap)
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32)
        out = torch.matmul(weights.to(values.dtype), values)
    return out.transpose(1, 2).contiguous(), None


def refuse_learned_sinks(kwargs: dict) -> None:
    if kwargs.get("s_aux") is not None:  # gpt_oss's learned sink logits are not in a scored policy's weights yet
        raise NotImplementedError("scored policies do not support attention with learned sink logits (gpt_oss)")


@contextlib.contextmanager
def attention_function(model, name: str):
    """Route the model's attention through the registered function ``name``, restoring it afterwards."""
    previous = model.config._attn_implementation
    if previous == name:  # nested (a token loop's steps inside its read): switching costs milliseconds a pass
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# --- one pass: its state for every layer's attention, and the check that every layer ran the function ------

@dataclasses.dataclass
class _Pass:
    name: str
    state: object
    calls: int = 0


_PASS: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar("streaming_lm_pass", default=None)


def pass_state(name: str):
    """For the registered function ``name``: the state of the pass running it (and this layer is counted)."""
    current = _PASS.get()
    if current is None or current.name != name:
        raise RuntimeError(f"{name} attention called outside a streaming_lm pass")
    current.calls += 1
    return current.state


def state_in_pass():
    """The state of the pass running now (None outside one), without counting a layer: for hooks and tests."""
    current = _PASS.get()
    return None if current is None else current.state


def run_pass(model, name: str, state, **forward):
    """``model(**forward)`` with every attention layer running the function ``name`` on ``state`` (callers switch
    to ``name`` once around their loop with ``attention_function``: switching costs milliseconds).

    Raises if a layer computed its attention elsewhere (model code that bypasses the interface): its keys
    would have been read without the stream's visible sets, silently.
    """
    token = _PASS.set(_Pass(name, state))
    try:
        with attention_function(model, name):
            out = model(**forward)
        calls = _PASS.get().calls
    finally:
        _PASS.reset(token)
    layers = num_decoder_layers(model)
    if calls != layers:
        raise RuntimeError(
            f"{type(model).__name__}: {calls} of {layers} layers ran the {name} attention function; the others "
            "computed attention in model code, not through transformers' attention interface"
        )
    return out


# --- the probe: does this loaded model's attention reach the engine's functions? ---------------------------

PROBE_NAME = "streaming_lm_probe"


@dataclasses.dataclass(frozen=True)
class Reach:
    """What one probe pass saw: ``called`` of the model's ``layers`` ran a registered attention function, and
    whether a layer's mask carried an additive bias (ALiBi, built into the mask by the model's own code)."""

    layers: int
    called: int
    biased: bool = False
    error: str = ""  # what the model raised when run with a registered function, if it did

    @property
    def served(self) -> bool:
        """The engine's attention functions compute this model's attention: every layer calls them, and none
        adds a bias through the mask (the functions build their own visible sets and would drop it)."""
        return self.called == self.layers and not self.biased and not self.error

    def reason(self, model) -> str:
        name, version = type(model).__name__, transformers.__version__
        if self.error:
            return f"{name} cannot run with an attention function registered by streaming_lm ({self.error})"
        if self.called != self.layers:
            return (f"{self.called} of {self.layers} layers of {name} run their attention through transformers' "
                    f"attention interface (transformers {version}); the others compute it in model code")
        return (f"{name} adds a position bias (ALiBi) to attention through the mask it builds (transformers "
                f"{version}), which the engine's attention functions replace with each query's visible keys")


def _probe_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    biased = pass_state(PROBE_NAME)
    if attention_mask is not None and attention_mask.is_floating_point():
        biased.append(getattr(module, "layer_idx", None))
    # The output is never read (nothing is cached, the logits are dropped): zeros of the right shape.
    batch, heads, q_len, _ = query.shape
    return query.new_zeros(batch, q_len, heads, value.shape[-1]), None


AttentionInterface.register(PROBE_NAME, _probe_attention)
AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)  # the mask a model builds for SDPA, so a bias shows
_REACH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_reach(model) -> Reach:
    """Probe ``model`` once (two tokens, nothing cached): which of its layers call transformers' attention
    interface with the current transformers release. Memoised per model object."""
    if model in _REACH:
        return _REACH[model]
    layers, biased, error = num_decoder_layers(model), [], ""
    token = _PASS.set(_Pass(PROBE_NAME, biased))
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # models that cannot switch say so; the reason below says it once
    try:
        try:
            with attention_function(model, PROBE_NAME), torch.inference_mode():
                model(input_ids=torch.tensor([[1, 2]], device=model.device), use_cache=False)
        except (ValueError, TypeError, AttributeError, NotImplementedError) as failure:
            # A model that refuses another attention implementation, or whose code cannot run with one: the
            # engine's paths cannot serve it, and the reason says why (never a silent fallback).
            error = f"{type(failure).__name__}: {failure}"
        called = _PASS.get().calls
    finally:
        _PASS.reset(token)
        transformers_logging.set_verbosity(verbosity)
    _REACH[model] = reach = Reach(layers, called, bool(biased), error)
    return reach
