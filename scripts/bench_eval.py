#!/usr/bin/env python
from streaming_lm.tools.bench_eval import main  # the implementation; this path is kept for existing commands

main()
