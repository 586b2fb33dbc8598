"""A quiet console: the terminal shows our progress, results and warnings; everything else goes to
the run's log file.

SGLang, Megatron, transformers and torch print a great deal on import and start-up (SGLang's model
registry "Ignore import error" lines, Apex/AWQ/GGUF UserWarnings, CUDA-graph and RLIMIT notices),
from this process and from the processes it starts (the embedded engine's scheduler). Python-level
routing cannot reach a child's output, so :class:`QuietConsole` works on file descriptors: fds 1
and 2 are pointed at the log file (children inherit that), and a duplicate of the original stderr
becomes :func:`console_stream`, where our own loggers, our warnings, uncaught tracebacks and the
progress bar write.

    with QuietConsole(run_dir / "run.log"):
        ...  # third-party output lands in run.log; console_stream() is the terminal

``holderpo train`` names the file in ``$HOLDERPO_RUN_LOG`` (:data:`RUN_LOG_ENV`) for its workers.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

__all__ = ["QuietConsole", "RUN_LOG_ENV", "RUN_LOG_NAME", "console_stream", "OUR_LOGGERS"]

RUN_LOG_ENV = "HOLDERPO_RUN_LOG"
RUN_LOG_NAME = "run.log"  # under the run directory
OUR_LOGGERS = ("holderpo", "holderpo_megatron")
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"

_active: "QuietConsole | None" = None


def console_stream() -> TextIO:
    """Where our user-facing output goes: the terminal kept by an active :class:`QuietConsole`,
    else ``sys.stderr``."""
    return _active.console if _active is not None else sys.stderr


class QuietConsole:
    """Routes third-party output of this process and its future children to ``log_path`` (appended).

    Kept on the console (and copied to the log): records of our loggers (:data:`OUR_LOGGERS`, at
    ``level`` and above), warnings raised from our package's files, uncaught exceptions, and what is
    written to :func:`console_stream`. ``stop()`` (or leaving the ``with`` block) restores all of it.
    """

    def __init__(self, log_path: str | os.PathLike, *, level: int = logging.INFO):
        self.log_path = Path(log_path)
        self.level = level
        self.console: TextIO | None = None
        self._saved_fds: tuple[int, int] | None = None

    def start(self) -> "QuietConsole":
        global _active
        if _active is not None:
            raise RuntimeError(f"a QuietConsole is already active (log {_active.log_path})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for s in (sys.stdout, sys.stderr):
            s.flush()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved_fds = (os.dup(1), os.dup(2))
        # line-buffered: a progress line or warning shows at once, and interleaves whole with other writers
        self.console = os.fdopen(os.dup(self._saved_fds[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = self._showwarning
        self._saved_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self._handlers = []
        self._saved_logger_state = []
        console_handler = _BarAwareHandler(self.console)
        log_handler = logging.StreamHandler(sys.stderr)  # fd 2: the log file
        for h in (console_handler, log_handler):
            h.setFormatter(logging.Formatter(_FORMAT))
            self._handlers.append(h)
        for name in OUR_LOGGERS:
            lg = logging.getLogger(name)
            self._saved_logger_state.append((lg, lg.propagate, lg.level))
            # not through the root logger: SGLang replaces the root's handlers when its engine starts
            lg.propagate = False
            if lg.level == logging.NOTSET or lg.level > self.level:
                lg.setLevel(self.level)
            for h in self._handlers:
                lg.addHandler(h)
        _active = self
        return self

    def stop(self) -> None:
        global _active
        if _active is not self:
            return
        _active = None
        for lg, propagate, level in self._saved_logger_state:
            for h in self._handlers:
                lg.removeHandler(h)
            lg.propagate, lg.level = propagate, level
        warnings.showwarning = self._saved_showwarning
        sys.excepthook = self._saved_excepthook
        for s in (sys.stdout, sys.stderr, self.console):
            s.flush()
        out, err = self._saved_fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self.console.close()
        self.console = None

    def __enter__(self) -> "QuietConsole":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if file is None and str(filename).startswith(_PACKAGE_DIR):  # ours: a real warning for the user
            with tqdm.external_write_mode(file=self.console):
                self.console.write(text)
        (file or sys.stderr).write(text)

    def _excepthook(self, etype, value, tb):
        text = "".join(traceback.format_exception(etype, value, tb))
        sys.stderr.write(text)
        sys.stderr.flush()
        self.console.write(text)
        self.console.write(f"(third-party output of this process is in {self.log_path})\n")
        self.console.flush()


class _BarAwareHandler(logging.StreamHandler):
    """On a terminal, a log line clears tqdm's bar and the bar is redrawn below it (no torn lines)."""

    def emit(self, record):
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)
