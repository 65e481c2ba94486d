"""The model registry is the one source: docs/architectures.md's table and every "supported" message come from it."""

from pathlib import Path

from streaming_lm import support

ARCHITECTURES_DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def test_docs_table_is_the_registry():
    assert support.support_table() in ARCHITECTURES_DOC.read_text(encoding="utf-8"), (
        "docs/architectures.md's support table differs from streaming_lm.support.ARCHITECTURES; regenerate it with "
        'python -c "from streaming_lm.support import support_table; print(support_table())"'
        " and paste it over the table in docs/architectures.md"
    )


def test_every_type_is_listed_once_and_in_the_messages():
    names = [name for arch in support.ARCHITECTURES for name in arch.model_types]
    assert len(names) == len(set(names)) == len(support.SUPPORTED_ARCHITECTURES)
    listed = support.supported_list()
    assert all(f"{name} (" in listed for name in names)


# --- which paths serve a loaded model: decided by what it does (the probe), not by a version --------------

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.models import bypassing_llama, tiny_llama  # noqa: E402

from streaming_lm.rolling import score  # noqa: E402
from streaming_lm.rotary import find_rotary  # noqa: E402
from streaming_lm.settings import StreamingSettings  # noqa: E402
from streaming_lm.streams.attention import attention_reach  # noqa: E402

BYPASS = r"1 of 2 layers of LlamaForCausalLM run their attention through transformers' attention interface"


@pytest.fixture(scope="module")
def models(one_thread):
    """A Llama, and the same weights with a second layer that computes attention in its own code."""
    return tiny_llama(num_hidden_layers=2), bypassing_llama(num_hidden_layers=2)


def test_the_probe_counts_the_layers_that_reach_the_interface(models):
    llama, bypassing = models
    assert attention_reach(llama).served and attention_reach(llama).called == 2
    reach = attention_reach(bypassing)
    assert not reach.served and reach.called == 1 and not reach.biased
    assert attention_reach(bypassing) is reach  # probed once per model


def test_a_model_that_leaves_the_interface_loses_the_engine_paths_with_the_reason(models):
    """A type whose attention leaves the interface in some release is served by the token loop alone: the default
    method falls back to it (saying why), a method given is refused, and so is the once-after-the-context regime."""
    _, bypassing = models
    chunked = StreamingSettings(2, 6)
    with pytest.raises(NotImplementedError, match=rf"method=chunked cannot serve model_type 'llama': {BYPASS}.*"
                                                  r"Use method=token.*paths serving llama: token, recompute"):
        support.check_model_supported(bypassing, chunked)
    settings, line = support.fall_back_to_token_loop(bypassing, chunked, method_given=False)
    assert settings.method == "token" and BYPASS in line and "reading with method=token instead" in line
    support.check_model_supported(bypassing, settings)
    once = StreamingSettings(2, 6, "original", "token", evict_every="context", policy="knorm")
    with pytest.raises(NotImplementedError, match=rf"evict_every=context cannot serve model_type 'llama'.*{BYPASS}"):
        support.check_model_supported(bypassing, once)


def test_its_token_loop_is_the_model_s_own(models):
    """The fallback keeps its promise: the token loop runs the model's own attention, so the bypassing layer changes
    nothing (the same weights give the plain Llama's token loop), and that is the chunked path's numbers, which the
    plain Llama reaches (the token loop alone could not tell); the chunked path, run anyway, fails loudly."""
    llama, bypassing = models
    ids = torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(0))
    token = StreamingSettings(2, 6, method="token")
    expected = score(llama, ids, token, find_rotary(llama))
    got = score(bypassing, ids, token, find_rotary(bypassing))
    assert got.evicted == expected.evicted > 0
    torch.testing.assert_close(got.logprobs, expected.logprobs, rtol=0, atol=1e-5)
    chunked = score(llama, ids, dataclasses.replace(token, method="chunked", chunk_size=4), find_rotary(llama))
    torch.testing.assert_close(got.logprobs, chunked.logprobs, rtol=0, atol=2e-5)
    with pytest.raises(RuntimeError, match="1 of 2 layers ran the streaming_lm_chunked attention function"):
        score(bypassing, ids, dataclasses.replace(token, method="chunked"), find_rotary(bypassing))


def test_weights_a_model_does_not_return_are_a_clear_error(models):
    """A policy scored by attention weights reads them from the model's eager attention where the engine's function
    is not reached; a layer that returns none (its own SDPA) is named, never a TypeError."""
    _, bypassing = models
    tova = StreamingSettings(2, 2, method="token", policy="tova", heavy_size=4)
    with pytest.raises(RuntimeError, match=r"policy=tova scores by attention weights, and LlamaForCausalLM returned "
                                           r"none for some layers"):
        score(bypassing, torch.arange(3, 20), tova, find_rotary(bypassing))
