"""lm-eval requests for the tests: the one place that builds ``Instance`` objects."""

from __future__ import annotations

from lm_eval.api.instance import Instance


def rolling(*texts: str) -> list[Instance]:
    """``loglikelihood_rolling`` requests, one per text."""
    return [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]


def pairs(*items: tuple[str, str]) -> list[Instance]:
    """``loglikelihood`` requests, one per (context, continuation)."""
    return [Instance("loglikelihood", {}, tuple(item), i) for i, item in enumerate(items)]


def generations(*items: tuple[str, dict]) -> list[Instance]:
    """``generate_until`` requests, one per (context, generation kwargs)."""
    return [Instance("generate_until", {}, (context, dict(kwargs)), i) for i, (context, kwargs) in enumerate(items)]
