"""The measuring tools behind ``scripts/``: ``throughput`` (decoding) and ``bench_eval`` (rolling scoring).

Run as ``python scripts/throughput.py ...`` / ``python scripts/bench_eval.py ...`` or
``python -m streaming_lm.tools.throughput ...``; tests import them as modules.
"""
