"""`mambapeft --help` and usage errors: every command says what it does, every option has help, bad
option values and unknown options are one-line usage errors of the command they were given to."""
import argparse

import pytest
import torch

from mambapeft.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser):
    """(prog, parser) of ``parser`` and of every subcommand below it."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _commands(subparser)


def _options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    skipped = (argparse._HelpAction, argparse._SubParsersAction)
    return [action.option_strings[-1] if action.option_strings else action.dest
            for action in parser._actions if not isinstance(action, skipped) and not action.help]


def test_every_command_has_a_description():
    missing = [prog for prog, parser in _commands(build_parser()) if not parser.description]
    assert not missing, f"parsers without a description: {missing}"


def test_every_option_has_help():
    missing = {prog: options for prog, parser in _commands(build_parser())
               if (options := _options_without_help(parser))}
    assert not missing, f"options without help: {missing}"


def test_the_root_description_is_plain_text():
    assert "``" not in build_parser().description


def _usage_error(capsys, argv: list[str]) -> list[str]:
    """The stderr lines of a command that argparse refuses (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, option", [
    (["bench", "scan", "--batch", "-1"], "--batch"),
    (["bench", "scan", "--length", "0"], "--length"),
    (["bench", "scan", "--repeats", "0"], "--repeats"),
    (["bench", "scan", "--threads", "0"], "--threads"),
    (["bench", "data", "--images", "0"], "--images"),
    (["bench", "data", "--resolution", "-1"], "--resolution"),
    (["bench", "generate", "--batch", "1,0"], "--batch"),
    (["bench", "generate", "--new", "-1"], "--new"),
    (["bench", "generate", "--prompt", "x"], "--prompt"),
    (["data", "cache", "--root", "r", "--task", "cifar", "--split", "test", "--resolution", "0", "--out", "c.npz"],
     "--resolution"),
])
def test_a_count_below_one_is_a_usage_error(capsys, argv, option):
    lines = _usage_error(capsys, argv)
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]] and f"argument {option}:" in lines[-1]
    assert lines[0].startswith(f"usage: mambapeft {' '.join(argv[:2])}")


@pytest.mark.parametrize("argv, command", [
    (["tables", "--experiment", "vtab", "--csv", "t.csv", "--md", "t.md", "metrics.json", "--bogus"], "tables"),
    (["bench", "scan", "--bogus"], "bench scan"),
    (["--bogus", "bench", "scan"], "bench scan"),
])
def test_an_unknown_option_is_reported_with_the_commands_usage(capsys, argv, command):
    lines = _usage_error(capsys, argv)
    assert lines[0].startswith(f"usage: mambapeft {command} ")
    assert lines[-1] == f"mambapeft {command}: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize("argv", [["-q", "bench", "scan"], ["bench", "-q", "scan"], ["bench", "scan", "-q"]])
def test_quiet_goes_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).quiet


def test_not_quiet_by_default():
    assert not build_parser().parse_args(["bench", "scan"]).quiet


def test_bench_scan_on_cuda_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "scan", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mambapeft: error: bench scan --device cuda: no CUDA device is visible here (run it on a GPU machine)"]


def test_bench_generate_refuses_an_unknown_method_before_running(capsys, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "generate", "--device", "cpu", "--methods", "affix,nosuch", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mambapeft: error: bench generate: unknown language methods ['nosuch']; known: ")
    assert "\n" not in error and not out.exists()
