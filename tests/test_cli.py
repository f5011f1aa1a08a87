"""The `tinymm` entry point: help, dispatch and a clear word for a wrong command."""
import subprocess
import sys

from tiny_mm import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_named(capsys):
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "tiny_mm.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "grade" in done.stdout


def test_help_does_not_import_torch():
    code = "import sys, tiny_mm.cli as c; c.main(['--help']); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().endswith("False"), done.stdout + done.stderr


def test_every_trainer_answers_help(capsys):
    # Each `tinymm train MODEL` is reached through the table: its module imports and its
    # parser prints its options (argparse exits 0 on --help).
    import pytest

    for model in cli.TRAINERS:
        with pytest.raises(SystemExit) as done:
            cli.main(["train", model, "--help"])
        assert done.value.code == 0, model
        assert "usage" in capsys.readouterr().out, model
    assert cli.main(["train", "nonesuch"]) == 2
    assert "unknown model 'nonesuch'" in capsys.readouterr().err
