#!/usr/bin/env python
"""Dense hf vs a grid of streaming_hf settings: ``python -m streaming_lm compare``. See docs/compare.md."""

from streaming_lm.compare import main

if __name__ == "__main__":
    main()
