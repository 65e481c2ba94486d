"""``python -m streaming_lm <lm_eval arguments>``: lm-eval's CLI with ``streaming_hf`` registered."""

from streaming_lm.registration import register


def main() -> None:
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
