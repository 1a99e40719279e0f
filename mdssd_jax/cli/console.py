"""The command line's console set-up: verbosity, which library lines reach the terminal, data workers.

What a run shows (its lines, the live progress bar, the closing summary) is report/progress.py; this
module sets up the process so that only those lines, and every warning or error, reach the terminal
at the default verbosity (0). `-v` / `--verbosity=1` brings back the libraries' INFO lines (Orbax,
TFDS, Grain, clu, absl, JAX, matplotlib, and the C++ logs of TensorFlow and XLA), `--verbosity=2`
adds DEBUG records.

Only public switches are used:

* Environment variables the libraries read when they load (`set_library_environment`, before JAX
  or TensorFlow is imported; a value already in the environment is kept): TF_CPP_MIN_LOG_LEVEL=1
  drops the INFO lines of TensorFlow's and XLA's C++ logs; TF_ENABLE_ONEDNN_OPTS=0 turns off
  TensorFlow's oneDNN CPU kernels, whose notice TensorFlow prints while it is imported whatever
  TF_CPP_MIN_LOG_LEVEL says (this project runs no TensorFlow computation while training:
  TensorFlow serves TFDS, clu's summaries and the export).
* Python logging, one handler and one filter on the root logger: every library logs through it
  (Orbax, TFDS and clu through absl's logger, JAX through "jax._src.*", matplotlib through its own).
  `_LibraryFilter` passes an INFO record only when the code that logged it lives in this project
  (`mdssd_jax/`, or the folder of the script being run, outside any site-packages), and every
  warning except the few in `_EXPECTED_LIBRARY_WARNINGS`, which this project causes on purpose or
  reports itself (Orbax's preemption sync points, its error lines of a failed save, which end in
  main.py's one `Error:` line).
  At verbosity 0 `_ConsoleHandler` writes the records through report/progress.py's `say`: INFO as
  bare lines on stdout, the run's one channel, warnings and errors with absl's prefix on stderr;
  with -v absl's own handler (stderr, prefixed lines) is back. Per-logger levels: absl's logger
  follows the verbosity, and data/report.py's live status records (logger STATUS_LOGGER, DEBUG)
  reach the handler only at verbosity 0, where they redraw one line on a terminal.
* File descriptors, in multi-process runs only (`hide_native_library_lines`): what the libraries'
  native code prints there (Gloo's greeting of its peers, the coordination service's "SIGTERM
  caught") goes through a pipe that drops the lines of `_NATIVE_LIBRARY_LINES`.
* Python warnings: PYTHONWARNINGS (inherited by helper processes) for the one that multiprocessing's
  resource tracker prints at exit.

TFDS's progress bars and its two stdout notices are the data layer's business: data/registry.py
prepares with `tfds.disable_progress_bar()` and says itself what it prepares.

    main.py:   console.set_library_environment(sys.argv)   # before `import jax`
               ...  console.configure(FLAGS.verbosity)       # first thing in main()

Data worker processes (Grain's, the generator's pool) are fresh interpreters: the environment
names `configure_worker` (data/workers.py runs it), so they get the same console without the data
layer importing this one.
"""

import atexit
import io
import logging
import os
import re
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mdssd_jax.report import progress

# mdssd_jax.data is imported inside the functions below, not here: a data worker started with
# multiprocessing's "spawn" runs main.py again, and importing mdssd_jax.data there runs the worker
# set-up (data/workers.py), which needs this module complete.

# The verbosity of this process (absl's --verbosity after `configure`): 0 quiet, 1 libraries' INFO,
# 2 and up DEBUG; the handler and filter `configure` installed, and the terminal handlers it took
# off the root logger (verbosity 0) to put back with -v.
_state: Dict[str, Any] = {"verbosity": 0, "filter": None, "handler": None, "terminal_handlers": [],
                          "worker_configured": False}

# Library warnings that this project triggers by design and that ask for no action, hidden at
# verbosity 0: (a substring of the logging file's path, a regex of the message, why).
_EXPECTED_LIBRARY_WARNINGS: Tuple[Tuple[str, str, str], ...] = (
    ("tensorflow_datasets", r"^Using custom data configuration",
     "every data set of this project is a TFDS builder with its own BuilderConfig"),
    ("tensorflow_datasets", r"has no dataset_info\.json",
     "a data set folder that is about to be generated has no dataset_info.json yet"),
    ("orbax", r"Reached preemption sync point",
     "a multi-process run agreeing on the step to stop at; the run says itself where it stopped"),
    # A checkpoint write that fails (a full disk) is logged by Orbax from each of its threads; the
    # same error is raised from wait_until_finished and reaches main.py's one `Error:` line.
    ("orbax", r"_SignalingThread\.run\(\) raised an exception",
     "a failed asynchronous save, reported by main.py's Error: line"),
    ("orbax", r"Failed to run \d+ Handler Commit operations",
     "a failed asynchronous save, reported by main.py's Error: line"),
    ("orbax", r"Save Finalize thread .*failed",
     "a failed asynchronous save, reported by main.py's Error: line"),
    # Logged by CheckpointManager.save when the previous asynchronous save took longer than a few
    # seconds; on a long run (or a loaded machine) it repeats at every checkpoint and asks nothing
    # of the user that config.train.checkpoint_every_steps does not already say. -v shows it.
    ("orbax", r"Waiting for previous save to complete took",
     "the previous asynchronous save still running at the next save; -v shows how long"),
)

# Lines that the libraries' native (C++) code prints straight to the process's stdout or stderr,
# where no logging filter sees them; hidden at verbosity 0 in multi-process runs
# (`hide_native_library_lines`): (regex, why).
_NATIVE_LIBRARY_LINES: Tuple[Tuple[str, str], ...] = (
    (r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks",
     "Gloo (JAX's CPU collectives) greets its peers at every multi-process start"),
    (r"^[IW]\d{4} [\d:.]+\s+\d+ preemption_notifier\.cc:\d+\] SIGTERM caught",
     "JAX's coordination service noticing a preemption; the run says itself where it stopped"),
)

_WORKER_VERBOSITY_ENV = "MDSSD_JAX_VERBOSITY"
# The filters of `hide_native_library_lines`, one per file descriptor (1, 2), while installed.
_native_filters: List["_NativeLineFilter"] = []


def verbosity() -> int:
  """The verbosity `configure` set (0 when it was not called)."""
  return _state["verbosity"]


# ---------------------------------------------------------------------------------------------------
# Before the libraries load: verbosity from the command line, environment variables.
# ---------------------------------------------------------------------------------------------------

def verbosity_from_argv(argv: Sequence[str]) -> int:
  """absl's -v / --verbosity from a raw command line, before flags are parsed (last one wins).

  A bare `-v` (no value) counts as 1; `-v 2`, `-v=2`, `--verbosity 2`, `--verbosity=2` as given.
  Returns 0 when absent or unreadable (absl then reports a bad value itself).
  """
  level = 0
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    for name in ("--verbosity", "-verbosity", "--v", "-v"):
      if arg == name:
        nxt = args[i + 1] if i + 1 < len(args) else ""
        level = int(nxt) if re.fullmatch(r"-?\d+", nxt) else (1 if name.endswith("v") else level)
      elif arg.startswith(name + "="):
        value = arg[len(name) + 1:]
        if re.fullmatch(r"-?\d+", value):
          level = int(value)
  return level


def expand_bare_verbose_flag(argv: Sequence[str]) -> List[str]:
  """argv with a bare `-v` (absl's -v needs a value) turned into `-v=1`; for app.run's flags_parser."""
  out = []
  args = list(argv)
  for i, arg in enumerate(args):
    nxt = args[i + 1] if i + 1 < len(args) else ""
    if i > 0 and arg in ("-v", "--v") and not re.fullmatch(r"-?\d+", nxt):
      out.append("-v=1")
    else:
      out.append(arg)
  return out


def set_library_environment(argv: Sequence[str]) -> int:
  """Environment variables the libraries read when they load; call before importing jax.

  TF_CPP_MIN_LOG_LEVEL (TensorFlow's and XLA's C++ logs: 1 hides INFO at verbosity 0, 0 shows it
  with -v) and TF_ENABLE_ONEDNN_OPTS=0 (see the module's docstring), each unless the environment
  already sets it; the worker set-up (`configure_worker`) for data worker processes. Returns the
  verbosity read from argv.
  """
  from mdssd_jax.data import workers  # pylint: disable=g-import-not-at-top   (see the imports)
  level = verbosity_from_argv(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if level <= 0 else "0")
  # At every verbosity, so that TensorFlow computes the same with and without -v.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  # Data worker processes start as fresh interpreters: they read the verbosity from here.
  os.environ[_WORKER_VERBOSITY_ENV] = str(level)
  workers.register_worker_init(f"{__name__}:configure_worker")
  if level <= 0:
    # multiprocessing's resource tracker (its own process, so only the environment reaches it)
    # reports at exit the shared-memory blocks Grain's workers leave to it to free; it frees them.
    warning_filter = "ignore:resource_tracker:UserWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if warning_filter not in current:
      os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, warning_filter]))
  return level


def configure_worker() -> None:
  """In a data worker process (Grain, the generator's pool): the console of the command that started
  it (its verbosity from the environment), set up once. Does nothing outside main.py's commands."""
  if _state["worker_configured"]:
    return
  _state["worker_configured"] = True
  level = os.environ.get(_WORKER_VERBOSITY_ENV)
  if level is not None:
    configure(int(level))


# ---------------------------------------------------------------------------------------------------
# After flag parsing: logging.
# ---------------------------------------------------------------------------------------------------

def _project_dirs() -> List[str]:
  dirs = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]   # mdssd_jax/
  main = sys.modules.get("__main__")
  main_file = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else None)
  if main_file:
    dirs.append(os.path.dirname(os.path.abspath(main_file)))
  return [d + os.sep for d in dirs]


def _is_library(pathname: str) -> bool:
  return "site-packages" in (pathname or "") or "dist-packages" in (pathname or "")


class _LibraryFilter(logging.Filter):
  """Passes WARNING and up (but the expected library warnings), and INFO/DEBUG records logged from
  this project's files only; everything from verbosity 1 on.

  It also clears a live progress line before a record goes to the same terminal, so that a log
  line never lands in the middle of the bar (the bar redraws at its next update).
  """

  def __init__(self, level: int, status_logger: str = ""):
    super().__init__()
    self.level = level
    self.status_logger = status_logger
    self.project_dirs = _project_dirs()
    self.hidden = 0

  def is_project(self, pathname: str) -> bool:
    path = os.path.abspath(pathname or "")
    for d in self.project_dirs:
      if path.startswith(d):
        # The script's folder may hold a virtual environment; its packages are libraries.
        if d != self.project_dirs[0] and _is_library(path):
          continue
        return True
    return False

  def filter(self, record: logging.LogRecord) -> bool:
    keep = self._keep(record)
    if not keep:
      self.hidden += 1
    elif record.name != self.status_logger:
      progress.clear_active_line()
    return keep

  def _keep(self, record: logging.LogRecord) -> bool:
    if self.level >= 1:
      return True
    if record.levelno >= logging.WARNING:
      for path_part, pattern, _ in _EXPECTED_LIBRARY_WARNINGS:
        if path_part in (record.pathname or "") and re.search(pattern, record.getMessage()):
          return False
      return True
    return self.is_project(record.pathname)


def _prefixed_formatter() -> logging.Formatter:
  """absl's "W1205 12:00:00.000000 1234 file.py:12] message" lines, or the same without absl."""
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    return absl_logging.PythonFormatter()
  except ImportError:
    return logging.Formatter("%(levelname).1s %(filename)s:%(lineno)d] %(message)s")


class _ConsoleHandler(logging.Handler):
  """Verbosity 0: the records `_LibraryFilter` passes, through `progress.say`.

  INFO lines as bare text on stdout (the stream of the run's other lines: piped to a file they
  keep their order); warnings and errors with absl's prefix (file:line) on stderr, a library's
  without its traceback (Orbax logs the traceback of a failed asynchronous save each time it is
  raised; the error reaches main.py's one message, and -v shows every traceback); data/report.py's
  status records as the one live line on a terminal (`progress.show_status`).
  """

  def __init__(self, status_logger: str = "", stdout=None, stderr=None):
    super().__init__()
    self.status_logger = status_logger
    # Bound now, as logging.StreamHandler does: the data layer redirects sys.stdout around TFDS's
    # download_and_prepare (its stdout notices), and the status lines of that time must get through.
    self.stdout = stdout or sys.stdout
    self.stderr = stderr or sys.stderr
    self.prefixed = _prefixed_formatter()

  def emit(self, record: logging.LogRecord) -> None:
    try:
      if record.name == self.status_logger:
        progress.show_status(record.getMessage(), stream=self.stdout)
      elif record.levelno < logging.WARNING:
        progress.say(record.getMessage(), stream=self.stdout)
      else:
        if record.exc_info and _is_library(record.pathname):
          record = logging.makeLogRecord(dict(record.__dict__, exc_info=None, exc_text=None))
        progress.say(self.prefixed.format(record), stream=self.stderr)
    except Exception:  # pylint: disable=broad-except   logging's own convention
      self.handleError(record)


def _absl_handler() -> Optional[logging.Handler]:
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    return absl_logging.get_absl_handler()
  except ImportError:
    return None


def configure(level: int) -> None:
  """Sets up the console for verbosity `level` (absl's --verbosity); call first thing in main().

  0: the project's lines (INFO) on stdout, every warning/error on stderr, plain and short; library
     INFO hidden.
  1: also the libraries' INFO lines, through absl's handler with its usual prefix (time, thread,
     file:line), on stderr.
  2+: DEBUG records as well.
  Idempotent: a second call replaces the first's set-up.
  """
  from mdssd_jax.data import report as data_report  # pylint: disable=g-import-not-at-top   (see the imports)
  level = int(level)
  _state["verbosity"] = level
  root = logging.root
  for handler in [_state["handler"]] + _state["terminal_handlers"] + root.handlers:
    if handler is not None and _state["filter"] is not None:
      handler.removeFilter(_state["filter"])
  if _state["handler"] is not None:
    root.removeHandler(_state["handler"])
    _state["handler"] = None
  flt = _LibraryFilter(level, data_report.STATUS_LOGGER)
  _state["filter"] = flt
  absl_handler = _absl_handler()
  if level <= 0:
    # The handlers that write to the terminal (absl's, or the plain one that absl.logging or
    # logging.basicConfig adds to a process without one, as in a data worker) make way for ours;
    # -v brings them back. Others (a log file, pytest's capture) stay.
    for handler in list(root.handlers):
      if handler is absl_handler or (type(handler) is logging.StreamHandler  # pylint: disable=unidiomatic-typecheck
                                     and handler.stream in (sys.stderr, sys.stdout)):
        root.removeHandler(handler)
        _state["terminal_handlers"].append(handler)
    handler = _ConsoleHandler(data_report.STATUS_LOGGER)
    handler.addFilter(flt)
    root.addHandler(handler)
    _state["handler"] = handler
  else:
    for handler in _state["terminal_handlers"]:
      if handler not in root.handlers:
        root.addHandler(handler)
    _state["terminal_handlers"] = []
    if not root.handlers:
      logging.basicConfig(format="%(levelname).1s %(filename)s:%(lineno)d] %(message)s")
    # The filter on absl's handler when absl logging is set up (main.py), else on every handler.
    for handler in [absl_handler] if absl_handler in root.handlers else root.handlers:
      handler.addFilter(flt)
  # absl maps its verbosity 1 to DEBUG; here 1 means "the libraries' INFO lines too".
  logging_level = logging.INFO if level <= 1 else logging.DEBUG
  root.setLevel(logging_level)
  logging.getLogger("absl").setLevel(logging_level)
  # The live status line (DEBUG records) only where the console handler draws it.
  logging.getLogger(data_report.STATUS_LOGGER).setLevel(logging.DEBUG if level <= 0
                                                        else logging.INFO)


# ---------------------------------------------------------------------------------------------------
# Native libraries' lines (multi-process runs).
# ---------------------------------------------------------------------------------------------------

class _NativeLineFilter:
  """File descriptor `fd` (1 or 2) turned into a pipe whose lines a thread copies to the original
  file, less those matching `patterns`.

  Python's own stream for that descriptor (sys.stdout / sys.stderr) is replaced by one on a copy of
  the original file, so that the run's lines (and the progress bar's terminal) bypass the pipe:
  only what native code and child processes write to the descriptor passes through it.
  """

  def __init__(self, fd: int, patterns: Sequence[str]):
    self.fd = fd
    self.patterns = [re.compile(p) for p in patterns]
    self.hidden = 0
    python_stream = sys.stdout if fd == 1 else sys.stderr
    python_stream.flush()
    self.original = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    self._read_end = read_end
    self.stream = io.TextIOWrapper(io.FileIO(self.original, "w", closefd=False),
                                   encoding=getattr(python_stream, "encoding", None) or "utf-8",
                                   errors=getattr(python_stream, "errors", None) or "strict",
                                   line_buffering=True, write_through=True)
    if fd == 1:
      sys.stdout = self.stream
    else:
      sys.stderr = self.stream
    self._thread = threading.Thread(target=self._pump, name=f"native-lines-fd{fd}", daemon=True)
    self._thread.start()

  def _pump(self) -> None:
    pending = b""
    while True:
      try:
        chunk = os.read(self._read_end, 1 << 16)
      except OSError:
        break
      if not chunk:
        break
      pending += chunk
      *lines, pending = pending.split(b"\n")
      for line in lines:
        self._forward(line + b"\n")
    if pending:
      self._forward(pending)
    os.close(self._read_end)

  def _forward(self, line: bytes) -> None:
    text = line.decode("utf-8", "replace")
    if any(p.search(text) for p in self.patterns):
      self.hidden += 1
      return
    view = memoryview(line)
    while view:
      try:
        view = view[os.write(self.original, view):]
      except OSError:
        return

  def close(self, timeout_s: float) -> None:
    """The descriptor back on the original file; waits up to timeout_s for the pipe to drain (child
    processes that inherited its write end keep it open until they exit)."""
    os.dup2(self.original, self.fd)
    self._thread.join(timeout_s)


def hide_native_library_lines() -> None:
  """Verbosity 0, multi-process runs: the lines of _NATIVE_LIBRARY_LINES stay off the terminal.

  Call before `configure` (it replaces sys.stdout and sys.stderr, which the console binds) and
  before JAX starts its distributed runtime. `restore_native_output` undoes it (also at exit).
  """
  if _native_filters:
    return
  patterns = [pattern for pattern, _ in _NATIVE_LIBRARY_LINES]
  for fd in (1, 2):
    _native_filters.append(_NativeLineFilter(fd, patterns))
  atexit.register(restore_native_output)


def restore_native_output(timeout_s: float = 1.0) -> None:
  """Ends `hide_native_library_lines` after the lines already written are through (a no-op when it
  is not on), so that what is written next (main.py's one `Error:` line) comes last."""
  while _native_filters:
    _native_filters.pop().close(timeout_s)
