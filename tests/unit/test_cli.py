import subprocess
import sys

from holderpo_megatron.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "plan", "plot", "convert"):
        assert cmd in out


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "holderpo" in res.stdout
