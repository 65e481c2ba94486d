"""The math of the KV-cache compression methods the field compares, as pure tensor functions.

Each function takes what an attention layer holds at an event (the tokens kept so far plus a segment's,
terms of docs/methods.md) and returns scores (low goes first) or keep-masks. Nothing here
touches a model or a cache: the engine calls these at an event and applies the result.

- ``ties``: the one tie rule (scores within ``TIE`` relative are tied, the oldest goes) and top-B keeping;
- ``snapkv``: SnapKV's observation-window scores (and the window attention TOVA reuses);
- ``tova``: TOVA's scores once after the context;
- ``expected_attention``: Expected Attention's scores;
- ``budgets``: per-layer (PyramidKV) and per-head (AdaKV) budgets;
- ``duo``: DuoAttention's head patterns.
"""
