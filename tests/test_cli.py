"""The thin dispatcher: help, unknown commands, and that every command points at a real module."""

from __future__ import annotations

import subprocess
import sys

from cosytrain import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "frobnicate" in err and len(err.splitlines()) == 1


def test_python_dash_m_runs():
    res = subprocess.run([sys.executable, "-m", "cosytrain"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: python -m cosytrain" in res.stdout
