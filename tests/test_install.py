"""The start-up hook: registers streaming_hf lazily and costs nothing until lm-eval loads."""

import subprocess
import sys

import pytest


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_startup_hook_imports_nothing_heavy():
    out = python("import sys; print(sorted(m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules))")
    assert out == "[]"
    assert python("import sys; print('streaming_lm._startup' in sys.modules)") == "True", (
        "streaming_lm.pth is not installed in site-packages"
    )


def test_registry_has_ours_and_lm_evals_models():
    out = python(
        "from lm_eval.api.registry import get_model, model_registry\n"
        "print(get_model('streaming_hf').__name__, get_model('hf').__name__, 'vllm' in model_registry)"
    )
    assert out == "StreamingHFLM HFLM True"


def test_lm_eval_models_imported_first_still_registers():
    out = python(
        "import lm_eval.models\nfrom lm_eval.api.registry import get_model\n"
        "print(get_model('streaming_hf').__name__, get_model('hf').__name__)"
    )
    assert out == "StreamingHFLM HFLM"


def test_entry_point_declared():
    from importlib.metadata import entry_points

    (point,) = entry_points(group="lm_eval.models", name="streaming_hf")
    assert point.value == "streaming_lm.lm_eval_model:StreamingHFLM"


def test_hook_ignores_missing_lm_eval(monkeypatch):
    from streaming_lm import _startup

    finder = _startup._RegisterAfterImport()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert finder.find_spec("lm_eval.api.registry", None) is None
    assert finder.find_spec("json", None) is None


@pytest.mark.slow
def test_wheel_ships_the_pth(tmp_path):
    """A regular (non-editable) install gets the hook at site-packages' top level."""
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(repo)],
        check=True, capture_output=True, timeout=600,
    )
    (wheel,) = tmp_path.glob("streaming_lm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "streaming_lm.pth" in names
    assert zipfile.ZipFile(wheel).read("streaming_lm.pth").decode().strip() == "import streaming_lm._startup"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "streaming_hf = streaming_lm.lm_eval_model:StreamingHFLM" in zipfile.ZipFile(wheel).read(entry_points).decode()
