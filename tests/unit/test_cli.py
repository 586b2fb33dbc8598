import subprocess
import sys

from holderpo_megatron.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sweep", "eval", "plan", "plot", "convert"):
        assert cmd in out


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "holderpo" in res.stdout


def test_plot_of_a_missing_or_empty_run_is_one_line(tmp_path, capsys):
    for run, says in ((tmp_path / "nope", "does not exist"), (tmp_path, "no metrics.jsonl at")):
        assert main(["plot", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("holderpo plot: ") and says in err and "\n" not in err, err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl has no records to plot" in capsys.readouterr().err
