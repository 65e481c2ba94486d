"""``python -m streaming_lm <lm_eval arguments>``: lm-eval's CLI with ``streaming_hf`` registered.

``python -m streaming_lm compare ...`` runs the dense-vs-streaming grid instead (streaming_lm.compare).
"""

import sys

from streaming_lm.registration import register


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        from streaming_lm.compare import main as compare_main

        compare_main(sys.argv[2:])
        return
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
