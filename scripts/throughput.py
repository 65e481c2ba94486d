#!/usr/bin/env python
from streaming_lm.tools.throughput import main  # the implementation; this path is kept for existing commands

main()
