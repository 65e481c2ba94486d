"""What the tools share: the default text files and one command-line flag per streaming knob.

No torch import here: bad flags are refused before anything heavy loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from .. import settings

# Found relative to a checkout (the package folder sits in the repository root): the full WikiText-2
# test text next to the repository when present, else the excerpt the repository ships.
REPO = Path(__file__).resolve().parents[2]
# An installed (non-editable) package sits in site-packages: then the checkout is the working directory.
_ROOTS = (REPO, Path.cwd())
EXCERPT = "tasks/wikitext_streaming/sample/wikitext-2-raw-test-excerpt.txt"  # relative to a checkout
DEFAULT_TEXTS = tuple(
    path for root in _ROOTS for path in (root.parent / "shared" / "data" / "wikitext-2-raw-test.txt", root / EXCERPT)
)

# The field's annotation ("int", "float | None", "str") gives the flag's type.
FIELDS = {field.name: field for field in dataclasses.fields(settings.StreamingSettings) if field.name in settings.KNOBS}
# A flag's type from its field's annotation; "int | str" (evict_every: K or "context") stays a string for resolve().
TYPES = {name: str if "str" in str(field.type) else {"int": int, "float": float}[str(field.type).split(" ")[0]]
         for name, field in FIELDS.items()}


def byte_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte), built offline: for random-weight models."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def repo_file(relative: str) -> Path:
    """A file of the checkout (tasks/..., the shipped excerpt), wherever the package is installed."""
    found = [root / relative for root in _ROOTS if (root / relative).exists()]
    if not found:
        raise FileNotFoundError(f"{relative}: not under {' or '.join(str(root) for root in _ROOTS)}; "
                                "run from a checkout of streaming-lm")
    return found[0]


def default_text() -> Path | None:
    return next((path for path in DEFAULT_TEXTS if path.exists()), None)


def read_head(path: Path, n_tokens: int) -> str:
    """The text, cut to plenty of characters for its first n_tokens (0: all): no need to tokenise a corpus."""
    text = Path(path).read_text(encoding="utf-8")
    return text[: 64 * n_tokens] if n_tokens else text


def add_knob_flags(parser: argparse.ArgumentParser, underscores: bool = False, defaults: dict | None = None,
                   covered: dict[str, str] | None = None) -> dict[str, str]:
    """One flag per ``settings.KNOBS`` entry: ``--start-size`` (also ``--start_size`` with ``underscores``).

    ``defaults`` overrides ``settings.ARG_DEFAULTS`` for a tool's own defaults; ``covered`` names knobs the
    tool sets through a flag of its own (bench_eval's ``--methods``). Returns {knob: flag}, the names that
    errors use.
    """
    defaults = settings.ARG_DEFAULTS | (defaults or {})
    flags = dict(covered or {})
    for knob in settings.KNOBS:
        if knob in flags:
            continue
        dashed = "--" + knob.replace("_", "-")
        names = [f"--{knob}", dashed] if underscores and "_" in knob else [dashed]
        parser.add_argument(*names, dest=knob, type=TYPES[knob], default=defaults[knob],
                            choices=FIELDS[knob].metadata["choices"], help=FIELDS[knob].metadata["help"])
        flags[knob] = names[0]
    return flags


def flag_message(message: str, flags: dict[str, str]) -> str:
    """A settings error in the flags' words (recent_size -> --recent-size); a plain word such as
    'positions' is renamed only where it names the knob ('positions=', 'positions must')."""
    for knob, flag in flags.items():
        message = re.sub(rf"\b{knob}\b" if "_" in knob else rf"\b{knob}\b(?==| must)", flag, message)
    return message


def knob_args(args: argparse.Namespace) -> dict:
    """The knob flags' values, by knob name (knobs a tool sets through its own lists are not among them)."""
    return {knob: vars(args)[knob] for knob in settings.KNOBS if knob in vars(args)}


def resolve_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: dict[str, str],
                  **extra) -> settings.StreamingSettings:
    """``settings.resolve`` of the knob flags; a bad value is a usage error naming the flag."""
    try:
        return settings.resolve(**knob_args(args), **extra)
    except ValueError as error:
        parser.error(flag_message(str(error), flags))
