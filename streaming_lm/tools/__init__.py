"""The measuring tools behind ``scripts/``: ``throughput`` (decoding), ``bench_eval`` (rolling scoring),
``bench_prefix`` (shared prefixes) and ``gpu_check`` (the engine alone on a GPU).

Run as ``python scripts/throughput.py ...`` / ``python scripts/bench_eval.py ...`` or
``python -m streaming_lm.tools.throughput ...``; tests import them as modules.
"""
