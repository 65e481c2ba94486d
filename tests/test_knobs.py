"""One list of knobs: every ``StreamingSettings`` field reaches the adapter (here), compare's grid keys and run
names (tests/test_compare.py, parametrised over ``settings.KNOBS``) and the tools' flags (tests/test_tools.py)."""

import dataclasses

from streaming_lm import StreamingHFLM, settings

# A value other than the default for each knob, valid together with method=recompute where it must be.
VALUES = {"start_size": 2, "recent_size": 24, "positions": "shifted", "method": "recompute",
          "compression_ratio": None, "chunk_size": 16, "stride": 3, "policy": "sink_window", "heavy_size": 0,
          "evict_every": 1, "query_size": None}
# The knobs of scored policies, valid together.
SCORED = {"policy": "h2o", "heavy_size": 8, "recent_size": 0, "positions": "shifted", "method": "token",
          "evict_every": 3}
# Once after the context (kvpress's regime).
ONCE = {"policy": "knorm", "evict_every": "context", "query_size": 3, "compression_ratio": 0.5, "positions": "original",
        "method": "token", "start_size": 0}


def test_the_knobs_are_the_settings_fields():
    # Every field but the policy's own parameters, which are model args named by the policy (test_policies.py).
    assert settings.KNOBS == tuple(f.name for f in dataclasses.fields(settings.StreamingSettings)
                                   if f.name != "policy_params")
    assert set(settings.ARG_DEFAULTS) == set(settings.KNOBS) == set(VALUES)
    assert set(settings.RESULT_KNOBS) == set(settings.KNOBS) - {"chunk_size"}
    assert settings.ARG_DEFAULTS["policy"] == "sink_window"


def test_every_knob_reaches_the_adapter(tiny, one_thread):
    model, tokenizer = tiny
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, **{k: v for k, v in VALUES.items() if v is not None})
    assert {k: getattr(lm.streaming, k) for k in settings.KNOBS} == VALUES
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, **SCORED)
    assert {k: getattr(lm.streaming, k) for k in SCORED} == SCORED
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, **ONCE, recent_size=None)
    assert {k: getattr(lm.streaming, k) for k in ONCE} == ONCE
