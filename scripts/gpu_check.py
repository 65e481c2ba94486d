#!/usr/bin/env python
from streaming_lm.tools.gpu_check import main  # engine only: runs where lm-eval is not installed

main()
