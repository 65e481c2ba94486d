"""The model registry is the one source: the README's table and every "supported" message come from it."""

from pathlib import Path

from streaming_lm import support

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_registry():
    assert support.support_table() in README.read_text(encoding="utf-8"), (
        "README's support table differs from streaming_lm.support.ARCHITECTURES; regenerate it with "
        'python -c "from streaming_lm.support import support_table; print(support_table())"'
    )


def test_every_type_is_listed_once_and_in_the_messages():
    names = [name for arch in support.ARCHITECTURES for name in arch.model_types]
    assert len(names) == len(set(names)) == len(support.SUPPORTED_ARCHITECTURES)
    listed = support.supported_list()
    assert all(f"{name} (" in listed for name in names)
