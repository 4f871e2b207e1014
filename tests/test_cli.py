"""The ``deformable`` command line dispatches to its commands and rejects unknown ones."""

import subprocess
import sys

import pytest

from deformable import cli


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_bench_help_through_the_installed_entry_point():
    result = subprocess.run([sys.executable, "-m", "deformable.cli", "bench", "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--repeats" in result.stdout


def test_every_command_has_a_main():
    import importlib

    for name, (target, description) in cli.COMMANDS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert description
