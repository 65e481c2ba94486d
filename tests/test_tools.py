"""What the tools share (streaming_lm.tools.common): one flag per settings knob, errors in the flags' words."""

import pytest

from streaming_lm import settings
from streaming_lm.tools import bench_eval, bench_prefix, common, gpu_check, throughput

VALUE = {int: "3", float: "0.25", str: None}


TOOLS = {throughput: ["--pretrained", "x"], bench_eval: ["--pretrained", "x"], bench_prefix: [], gpu_check: []}
UNDERSCORES = {bench_eval, bench_prefix, gpu_check}  # tools that also take --start_size
FIXED = {gpu_check: {"method"}}  # knobs a tool sets itself, with no flag (gpu_check times chunked and token)


@pytest.mark.parametrize("tool", list(TOOLS), ids=lambda tool: tool.__name__.rsplit(".", 1)[-1])
def test_every_knob_reaches_the_parser(tool):
    parser, flags = tool.build_parser()
    assert set(flags) == set(settings.KNOBS)
    options = parser._option_string_actions
    for knob, flag in flags.items():
        if knob in FIXED.get(tool, ()):
            assert not any(option.dest == knob for option in options.values())
            continue
        assert flag in options, (knob, flag)
        if options[flag].dest != knob:  # a list flag of the tool's own (bench_eval's --methods, --strides)
            continue
        action = options[flag]
        value = settings.METHODS[-1] if knob == "method" else settings.POSITIONS[-1] if knob == "positions" \
            else VALUE[common.TYPES[knob]]
        metadata = common.FIELDS[knob].metadata  # help and allowed values come from the settings field
        assert action.choices == metadata["choices"] and action.help == metadata["help"]
        spellings = [o for o in options if options[o] is action]
        for spelling in spellings:  # bench_eval: --start_size and --start-size
            parsed = parser.parse_args([*TOOLS[tool], spelling, value])
            assert getattr(parsed, knob) == action.type(value), spelling
        assert len(spellings) == (2 if tool in UNDERSCORES and "_" in knob else 1)


def test_new_knob_flags_default_to_the_settings():
    args = throughput.parse_args(["--pretrained", "x"])
    assert {knob: getattr(args, knob) for knob in settings.KNOBS} == settings.ARG_DEFAULTS
    args = bench_eval.parse_args(["--pretrained", "x"])
    assert (args.start_size, args.recent_size, args.chunk_size, args.compression_ratio) == (4, 1020, None, None)


def test_errors_name_the_flags():
    flags = {knob: "--" + knob.replace("_", "-") for knob in settings.KNOBS}
    message = ("positions=original does not apply to method=recompute: every window is re-encoded at positions "
               "0..C-1; stride must be an integer in [1, recent_size=28]")
    assert common.flag_message(message, flags) == (
        "--positions=original does not apply to --method=recompute: every window is re-encoded at positions "
        "0..C-1; --stride must be an integer in [1, --recent-size=28]")


def test_default_text_is_found_from_the_checkout():
    assert common.default_text() in common.DEFAULT_TEXTS
    assert common.DEFAULT_TEXTS[-1].is_file()  # the shipped excerpt


def test_gpu_check_runs_on_cpu(one_thread, tmp_path):
    """scripts/gpu_check.py (the GPU machine's one call) as a CPU smoke run: its exactness checks pass, and
    each timed streaming path really evicted."""
    from streaming_lm.tools import gpu_check

    results = gpu_check.main(["--device", "cpu", "--shape", "small", "--tokens", "300", "--recent_size", "60",
                              "--chunk_size", "64", "--token_seconds", "60", "--json", str(tmp_path / "r.json")])
    assert results["checks"] and all(row["ok"] for row in results["checks"])
    dense, chunked, once, token = results["timings"]
    assert dense["tokens"] == chunked["tokens"] == once["tokens"] == token["tokens"] == 300
    assert chunked["evicted"] == token["evicted"] == 300 - 64 > 0
    assert once["evicted"] == 150  # kvpress's int(300 * (1 - 0.5)) kept
