"""KVzip: keep the (layer, head, token) cells the model attends to most while it repeats the context (kvpress's
``KVzipPress``: query-agnostic, scored by a replay pass).

Kim et al., *KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction*, 2025,
https://arxiv.org/abs/2505.23416
"""

from __future__ import annotations

from .base import ScoredPolicy, check_context_regime
from .budgets import lowest_cells_keep
from .lazy_torch import torch
from .params import Param
from .snapkv import window_attention
from .wrappers import attention_modules, head_outputs, output_projections

# kvpress's replay prompts: the first chunk's, and the next chunks' (followed by the last REPEAT_TAIL tokens of the
# chunk before, where the reconstruction resumes).
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
REPEAT_TAIL = 8
# Replay query rows scored per block (bounds the weights at [query_heads, BLOCK, keys]).
BLOCK = 512


class KVzip(ScoredPolicy):
    """KVzip (kvpress's ``KVzipPress``): after the prefill the model reads a replay prompt, "repeat the previous
    context exactly", then the prefill again (``replay_chunk_size`` tokens a pass, each later pass prompted with the
    last 8 tokens of the one before), over the held cache; a held token's score is the most attention any replay query
    of its key/value head pays it, the weights taken over the first ``n_sink`` tokens, the chunk being replayed and the
    replay's own tokens (causally). With ``kvzip_plus_normalization`` each weight is divided by the norm of its query's
    hidden state and multiplied by ``‖W_o v‖₂`` of its key's value (KVzip+). The first ``n_sink`` tokens are never
    evicted; then the lowest cells of the whole model go (``layerwise``: of each layer, as many per layer), one by one
    by the tie rule (older token, then lower layer, then lower head first). The replay is read at the positions after
    the prefill and dropped from the cache after scoring. Once after the context only.

    The replay prompt needs the tokenizer (``Engine(model, settings, tokenizer)``). A prefill that begins with the chat
    template's opening (kvpress's pipeline always writes one) is replayed without it, those tokens scoring 0 as in
    kvpress, and the replay prompt ends with the template's assistant turn; any other prefill is replayed whole, its
    prompt ending with a newline (kvpress's rule for a tokenizer without a template).

    Kim et al., *KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction*, 2025,
    https://arxiv.org/abs/2505.23416
    """

    name = "kvzip"
    takes_wrappers = False  # the budget is the model's, not a layer's: no chunk or two-stage rule applies
    reaches_budget = True
    needs_tokenizer = True
    params = (Param("layerwise", bool, False, "each layer evicts as many cells (else the lowest of the whole model go)"),
              Param("n_sink", int, 4, "first held tokens never evicted", minimum=0),
              Param("kvzip_plus_normalization", bool, False, "KVzip+: weights over the query's hidden-state norm, "
                    "times the key's ‖W_o v‖"),
              Param("replay_chunk_size", int, 2048, "prefill tokens replayed a pass (kvpress's chunk_size)",
                    minimum=1))
    paths = {"token": ("original",), "chunked": ("original",)}
    observes = frozenset({"replay"})

    @classmethod
    def check_settings(cls, settings) -> None:
        check_context_regime(cls, settings, "replays the whole prefill (the model repeating the context)")
        if settings.positions == "shifted":
            raise ValueError("policy=kvzip keeps different counts per layer and head; evict_every=context with "
                             "positions=shifted needs every layer and head to keep as many: use positions=original")

    @property
    def heads_differ(self) -> bool:
        return True

    @property
    def replay_reads_hidden_norms(self) -> bool:
        """Whether ``replay_scores`` reads the norms of each layer's hidden states (the attention's input), which the
        replay pass then collects from ``attention_modules`` (KVzip+)."""
        return self.kvzip_plus_normalization

    def bind(self, model, shift) -> None:
        if self.kvzip_plus_normalization:
            why = "kvzip_plus_normalization=true weighs each value"
            self.attention_modules = attention_modules(model, why)
            self.output_projections = output_projections(model, why)

    def bind_tokenizer(self, tokenizer) -> None:
        """The replay prompts as token ids (kvpress's strings, encoded without special tokens), and the chat
        template's opening and assistant turn where the tokenizer has one."""
        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        self.first_prompt, self.next_prompt, self.plain_suffix = encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode("\n")
        self.template_prefix, self.template_suffix = [], self.plain_suffix
        if getattr(tokenizer, "chat_template", None):  # kvpress's: a dummy user turn split at a separator
            dummy = "dummy context"
            separator = "\n" + "#" * len(dummy)
            text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                                 add_generation_prompt=True, tokenize=False, enable_thinking=False)
            opening, suffix = text.split(separator)
            self.template_prefix, self.template_suffix = encode(opening.split(dummy)[0]), encode(suffix)

    def replay_passes(self, prefill: list[int]) -> list[tuple[int, int, list[int]]]:
        """``(start, end, ids)`` per replay pass: prefill tokens ``start .. end - 1`` are replayed by reading ``ids``
        (prompt, template suffix, those tokens) after the prefill."""
        if not hasattr(self, "first_prompt"):
            raise RuntimeError("policy=kvzip builds its replay prompt with the model's tokenizer: bind it "
                               "(Engine(model, settings, tokenizer))")
        opening = self.template_prefix
        templated = bool(opening) and list(prefill[: len(opening)]) == opening
        start = len(opening) if templated else 0
        suffix = self.template_suffix if templated else self.plain_suffix
        size, passes = self.replay_chunk_size, []
        for a in range(start, len(prefill), size):
            chunk = list(prefill[a : a + size])
            prompt = self.first_prompt if a == start else self.next_prompt + list(prefill[max(start, a - REPEAT_TAIL):a])
            passes.append((a, a + len(chunk), prompt + suffix + chunk))
        return passes

    def replay_scores(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                      end: int, scale: float, hidden_norms: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [kv_heads, end - start]: the replayed tokens' scores at layer ``layer``. ``query`` [query_heads, q,
        d]: the replay pass's queries (after RoPE); ``keys``/``values`` [kv_heads, N + q, d]: the prefill's then the
        replay's; ``hidden_norms`` [q]: its hidden states' norms (KVzip+)."""
        kv_heads, total, _ = keys.shape
        heads, q, _ = query.shape
        sink = min(self.n_sink, start)
        index = torch.cat([torch.arange(sink), torch.arange(start, end), torch.arange(total - q, total)]).to(keys.device)
        picked = keys[:, index]  # the sinks, the chunk, the replay's own keys (last)
        first = index.numel() - q  # columns before the replay's: every replay query sees them
        norms = None
        if self.kvzip_plus_normalization:
            norms = value_output_norms(values[:, index], self.output_projections[layer])  # [kv_heads, group, S]
        best = torch.zeros((kv_heads, end - start), device=keys.device)
        for a in range(0, q, BLOCK):  # rows a..b-1 see the keys up to their own (snapkv.window_attention)
            b = min(a + BLOCK, q)
            weights = window_attention(query[:, a:b], picked[:, : first + b], scale)
            chunk = weights.reshape(kv_heads, heads // kv_heads, b - a, -1)[..., sink : sink + end - start]
            if norms is not None:
                chunk = chunk / hidden_norms[a:b].float()[:, None] * norms[:, :, None, sink : sink + end - start]
            best = torch.maximum(best, chunk.amax(dim=(1, 2)))
        return best

    def model_keep(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [layers, kv_heads, n]: the cells kept of ``scores`` [layers, kv_heads, n] (``+inf``: never evicted):
        kvpress's ``int(cells · r)`` evicted of the whole model (``layerwise``: of each layer), or, under a token
        budget C, what leaves C per head on average."""
        layers, heads, n = scores.shape
        scores = scores.clone()
        scores[..., : self.n_sink] = float("inf")  # kvpress: the sinks score above every other cell
        cells = heads * n if self.layerwise else layers * heads * n
        evict = int(cells * self.settings.compression_ratio) if self.settings.ratio_budget else \
            cells - cells // n * min(n, self.capacity)
        return lowest_cells_keep(scores, evict, per_layer=self.layerwise)

    def score(self, keys, values, attention):
        raise RuntimeError("policy=kvzip is scored by its replay pass (streams/context.py), not layer by layer")


def value_output_norms(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 [kv_heads, group, K]: ``‖W_o v‖₂`` of each value [kv_heads, K, d] through each of its query heads'
    slice of the output projection ``weight`` [hidden, heads · d] (``wrappers.head_outputs``; kvpress's
    ``_compute_value_output_norm``)."""
    kv_heads, count, dim = values.shape
    out = torch.empty((kv_heads, weight.shape[1] // dim // kv_heads, count), device=values.device)
    for kv_head, member, projected in head_outputs(values, weight):
        out[kv_head, member] = projected.norm(dim=-1)
    return out
