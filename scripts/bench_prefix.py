#!/usr/bin/env python
from streaming_lm.tools.bench_prefix import main  # the implementation

main()
