"""Every tool of the `microbatch` command names in its `--help` the default of every
option that has one."""

from __future__ import annotations

import argparse

import pytest

from server import cli


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--compare"], ["sweep"], ["plot"], ["soak"]])
def test_help_names_every_default(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shown: list[argparse.ArgumentParser] = []
    print_help = argparse.ArgumentParser.print_help

    def record(self: argparse.ArgumentParser, file: object = None) -> None:
        shown.append(self)
        print_help(self)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    [parser] = shown
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even at hyphens
    with_defaults = [
        action
        for action in parser._actions
        if action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS)
    ]
    assert with_defaults, "the tool has options with defaults"
    for action in with_defaults:
        expected = "".join(f"default: {action.default}".split())
        assert expected in text, f"{action.option_strings[-1]}: {text}"
