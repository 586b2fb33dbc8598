"""QuietConsole: third-party output (this process's and its children's, Python warnings, foreign
loggers) goes to the log file; our loggers, our warnings and tracebacks stay on the console.

Each case runs in a fresh interpreter whose stderr is a pipe we read: the routing works on file
descriptors, which pytest's own capture would otherwise stand in for.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    script = tmp_path / "case.py"
    script.write_text(textwrap.dedent(code))
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    log = tmp_path / "run.log"
    return res, log.read_text() if log.exists() else ""


def test_third_party_output_goes_to_the_log_and_ours_stays_on_the_console(tmp_path):
    res, log = _run(f"""
        import logging, subprocess, sys, warnings
        from holderpo_megatron.observability.console import QuietConsole, console_stream
        logging.basicConfig(level=logging.INFO)  # as a library's set-up would
        with QuietConsole({str(tmp_path / 'run.log')!r}):
            warnings.warn_explicit("Apex is not installed", UserWarning, "/site-packages/megatron/x.py", 3)
            logging.getLogger("sglang.srt.models.registry").warning("Ignore import error when loading foo")
            subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"])
            print("third-party print")
            logging.getLogger("holderpo_megatron.trainer").info("our info line")
            warnings.warn_explicit("ours: a real warning", UserWarning,
                                   {str(ROOT / 'holderpo_megatron' / 'trainer' / 'loop.py')!r}, 7)
            print("step:  50%| 1/2", file=console_stream())
        print("after: back on stdout")
        logging.getLogger("sglang").warning("after: foreign logger on stderr again")
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    console = res.stdout + res.stderr
    for noise in ("Apex is not installed", "Ignore import error", "child stdout", "child stderr", "third-party print"):
        assert noise not in console, console
        assert noise in log, log
    for ours in ("our info line", "ours: a real warning", "step:  50%| 1/2"):
        assert ours in console, console
    assert "our info line" in log and "ours: a real warning" in log  # the log holds the whole story
    assert "after: back on stdout" in res.stdout and "after: foreign logger" in res.stderr  # restored


def test_an_uncaught_exception_reaches_the_console_and_names_the_log(tmp_path):
    res, log = _run(f"""
        from holderpo_megatron.observability.console import QuietConsole
        QuietConsole({str(tmp_path / 'run.log')!r}).start()
        raise RuntimeError("boom in a worker")
    """, tmp_path)
    assert res.returncode == 1
    assert "RuntimeError: boom in a worker" in res.stderr and f"is in {tmp_path / 'run.log'}" in res.stderr
    assert "RuntimeError: boom in a worker" in log


def test_only_one_quiet_console_at_a_time(tmp_path):
    res, _ = _run(f"""
        from holderpo_megatron.observability.console import QuietConsole
        with QuietConsole({str(tmp_path / 'run.log')!r}):
            try:
                QuietConsole({str(tmp_path / 'other.log')!r}).start()
            except RuntimeError as e:
                print("refused:", e, file=__import__("holderpo_megatron.observability.console").observability.console.console_stream())
    """, tmp_path)
    assert "refused: a QuietConsole is already active" in res.stderr, res.stderr
