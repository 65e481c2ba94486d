"""Bad parameter values of the compression methods: a clear error naming the argument and the allowed values.

Callable from the settings before any model loads, and again by the functions themselves.
"""

from __future__ import annotations

import math


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def check_fraction(name: str, value, *, upper_open: bool = False) -> float:
    """``value`` in [0, 1] (or [0, 1) with ``upper_open``), else ValueError naming ``name``."""
    interval = "[0, 1)" if upper_open else "[0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")
    return float(value)


def check_snapkv(window_size, kernel_size, segment_length: int | None = None) -> None:
    """SnapKV's knobs: ``window_size >= 1``, an odd ``kernel_size >= 1`` (the pooling keeps the length only for
    odd kernels; kvpress fails on even ones), and a segment longer than the window."""
    check_int("window_size", window_size, 1)
    check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (1, 3, 5, ...): pooling with zero padding kernel_size // 2 "
                         f"keeps one score per key only then; got {kernel_size}")
    if segment_length is not None and segment_length <= window_size:
        raise ValueError(f"window_size must be smaller than the segment it observes: window_size={window_size}, "
                         f"segment of {segment_length} tokens (lower window_size or use longer segments)")


def check_pyramid(window_size, beta) -> None:
    """PyramidKV's knobs: ``window_size >= 1`` and ``beta >= 1`` (the pyramid's steepness, as kvpress)."""
    check_int("window_size", window_size, 1)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 1:
        raise ValueError(f"beta must be a number >= 1 (the pyramid's steepness); got {beta!r}")


def check_expected_attention(n_future_positions=512, n_sink=4, epsilon=0.0) -> None:
    """Expected Attention's knobs: ``n_future_positions >= 1``, ``n_sink >= 0``, a finite ``epsilon >= 0``."""
    check_int("n_future_positions", n_future_positions, 1)
    check_int("n_sink", n_sink, 0)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon!r}")
