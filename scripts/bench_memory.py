#!/usr/bin/env python
from streaming_lm.tools.bench_memory import main  # the implementation

main()
