"""What the console shows and what goes to the run's log file.

The console gets this project's own log lines (progress, evaluations, warnings that
name a file or a fix), the warnings and errors of JAX, and the one-line ``error:``
of a problem the user can fix. Everything else, the INFO chatter and tracebacks of
Orbax, asyncio, TensorStore, TensorFlow and XLA, goes to ``WORKDIR/jax_resnet.log`` (or
a file in the temp directory when the workdir cannot be written), together with a copy
of every console line. A full disk or a damaged checkpoint used to print thousands of
such lines; now the console says what happened, where, and what to do, and the log
file keeps the detail.

The split happens at the file-descriptor level: once ``attach_file`` runs, fd 2
(stderr) is the log file, so output a library prints or writes from C++ lands there,
while the console keeps a duplicate of the original stderr.
"""

import logging as std_logging
import os
import socket
import sys
import tempfile
import time
import traceback

from absl import logging

LOG_FILE = 'jax_resnet.log'
_OWN = (os.sep + 'jax_resnet' + os.sep, os.sep + 'main.py')
_LOUD_LIBRARIES = ('jax',)  # their warnings reach the console (e.g. no GPU found)

_console = None  # the original stderr
_log_path = None


def console():
  """The stream for what the user must see (the original stderr)."""
  return _console or sys.stderr


def log_path() -> str | None:
  """The log file in use, once ``attach_file`` has run."""
  return _log_path


class _ConsoleFilter(std_logging.Filter):
  """Passes this project's records and the warnings of JAX (no accelerator found, ...);
  the rest of the libraries' records stay in the log file: what failed reaches the
  console as this project's own error, which says what to do."""

  def filter(self, record):
    if any(part in record.pathname for part in _OWN):
      return True
    loud = record.name.split('.')[0] in _LOUD_LIBRARIES or '/jax/' in record.pathname
    return loud and record.levelno >= std_logging.WARNING


class _FirstLineFormatter(std_logging.Formatter):
  """absl's format, but a library record's message cut to its first line and without
  its traceback: the console shows that something happened; the log file shows what."""

  def __init__(self, inner):
    super().__init__()
    self._inner = inner

  def format(self, record):
    if any(part in record.pathname for part in _OWN):
      return self._inner.format(record)
    short = std_logging.makeLogRecord(record.__dict__)
    short.msg, short.args = str(record.getMessage()).splitlines()[0][:300], ()
    short.exc_info = short.exc_text = short.stack_info = None
    return self._inner.format(short) + f'  (details: {_log_path or "log file"})'


def setup_console() -> None:
  """First thing in main(): absl's handler writes to a duplicate of stderr, filtered."""
  global _console
  if _console is not None:
    return
  _console = os.fdopen(os.dup(sys.stderr.fileno()), 'w', buffering=1)
  # A console that went away (the parent shell closed, a pipe into head) must not turn
  # every later log record into a logging error and its traceback.
  std_logging.raiseExceptions = False
  handler = logging.get_absl_handler().python_handler
  handler.stream = _console
  handler.addFilter(_ConsoleFilter())
  handler.setFormatter(_FirstLineFormatter(handler.formatter))


def attach_file(workdir: str | None) -> str:
  """Sends everything (all log records at INFO+, and whatever is written to stderr) to
  ``workdir``'s log file, or to a temp file when ``workdir`` cannot be written."""
  global _log_path
  path = None
  if workdir:
    try:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, LOG_FILE)
      log = open(path, 'a', buffering=1)
      log.write(_header())  # fails on a full disk: the log goes to the temp folder then
    except OSError:
      path = None
  if path is None:
    fd, path = tempfile.mkstemp(prefix='jax_resnet-', suffix='.log')
    log = os.fdopen(fd, 'a', buffering=1)
    _write_quietly(log, _header())
  sys.stderr.flush()
  os.dup2(log.fileno(), sys.stderr.fileno())
  file_handler = std_logging.StreamHandler(log)
  file_handler.setFormatter(logging.get_absl_handler().python_handler.formatter._inner)
  file_handler.setLevel(std_logging.INFO)
  std_logging.getLogger().addHandler(file_handler)
  _log_path = path
  return path


def _header() -> str:
  return (
    f'==== {time.strftime("%Y-%m-%d %H:%M:%S")} {socket.gethostname()} pid {os.getpid()}: '
    f'{" ".join(sys.argv)}\n'
  )


def to_file(error: BaseException) -> None:
  """An error's full traceback, in the log file only (the console has its summary)."""
  if _log_path:
    _write_quietly(sys.stderr, ''.join(traceback.format_exception(error)))


def report_bug(error: BaseException) -> None:
  """An unexpected exception: its traceback on the console and in the log file."""
  text = ''.join(traceback.format_exception(error))
  _write_quietly(console(), text)
  if _log_path:
    _write_quietly(sys.stderr, text)


def _write_quietly(stream, text: str) -> None:
  """A write that a full disk cannot turn into a second error."""
  try:
    stream.write(text)
    stream.flush()
  except OSError:
    pass
