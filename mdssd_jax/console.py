"""What a run prints: the project's own lines, one live progress line, and a closing summary.

At the default verbosity (0) the console shows only this project's lines: what is being prepared,
the progress line, evaluation tables, warnings and errors, and where everything is at the end. The
INFO chatter of the libraries underneath (Orbax, TFDS, Grain, clu, absl, JAX, matplotlib, and the
C++ logs of TensorFlow and XLA) is hidden; `-v` / `--verbosity=1` brings it back, `--verbosity=2`
adds DEBUG records. Warnings and errors always show, except the few library warnings listed in
`_EXPECTED_LIBRARY_WARNINGS`, which this project causes on purpose.

How each kind of library line is reached (so that one more library does not need a new rule):

* Python logging. absl's handler sits on the root logger and every library logs through it: Orbax,
  TFDS and clu through `absl.logging` (logger "absl"), JAX through "jax._src.*", matplotlib through
  its own. A filter on that handler passes an INFO record only when the code that logged it lives
  in this project (`mdssd_jax/`, or the folder of the script being run, main.py's or a benchmark's,
  outside any site-packages); WARNING and above always pass.
* C++ logs of TensorFlow (imported by clu and TFDS) and XLA: TF_CPP_MIN_LOG_LEVEL=1 (set by
  `set_library_environment` before JAX or TensorFlow load) drops most INFO lines. TensorFlow 2.16+
  still prints its oneDNN notice through absl's C++ logging while it is imported; that import runs
  with the process's stderr (file descriptor 2) captured, and only the INFO lines are dropped.
* TFDS's nested tqdm bars ("Generating splits", "Generating train examples", "Shuffling <path>")
  and its two bold stdout notices: `tensorflow_datasets.core.utils.tqdm` is replaced by one
  "preparing data" line of this module (TFDS looks that attribute up at every call).

    main.py:   console.set_library_environment(sys.argv)   # before `import jax`
               ...  console.configure(FLAGS.verbosity)       # first thing in main()
    training:  progress = console.Progress(total_steps, start_step=step, log_every_steps=...)
               progress.update(step, loss=...); progress.close()
    end:       console.say(console.run_summary(...))
"""

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, IO, List, Mapping, Optional, Sequence, Tuple

# The verbosity of this process (absl's --verbosity after `configure`): 0 quiet, 1 libraries' INFO,
# 2 and up DEBUG.
_state: Dict[str, Any] = {"verbosity": 0, "active": None, "filter": None, "formatter": None,
                          "hooks": []}

# Library warnings that this project triggers by design and that ask for no action, hidden at
# verbosity 0: (a substring of the logging file's path, a regex of the message, why).
_EXPECTED_LIBRARY_WARNINGS: Tuple[Tuple[str, str, str], ...] = (
    ("tensorflow_datasets", r"^Using custom data configuration",
     "every data set of this project is a TFDS builder with its own BuilderConfig"),
    ("tensorflow_datasets", r"has no dataset_info\.json",
     "a data set folder that is about to be generated has no dataset_info.json yet"),
)

# C++ log lines: glog/absl prefix "I0101 12:00:00.000000  1234 file.cc:12]" for INFO, and absl's
# notice that logging was used before its initialisation (printed once before the first line).
_NATIVE_INFO_LINE = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")
_NATIVE_PREINIT_NOTICE = "All log messages before absl::InitializeLog() is called are written to STDERR"


_WORKER_VERBOSITY_ENV = "MDSSD_JAX_VERBOSITY"


def verbosity() -> int:
  """The verbosity `configure` set (0 when it was not called)."""
  return _state["verbosity"]


# ---------------------------------------------------------------------------------------------------
# Set-up: environment before the libraries load, then logging after flag parsing.
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

  Sets TF_CPP_MIN_LOG_LEVEL (TensorFlow's and XLA's C++ logs: 1 hides INFO at verbosity 0, 0 shows
  it with -v) unless the environment already sets it. Returns the verbosity read from argv.
  """
  level = verbosity_from_argv(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if level <= 0 else "0")
  # Data worker processes start as fresh interpreters: they read the verbosity from here.
  os.environ[_WORKER_VERBOSITY_ENV] = str(level)
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
  if _state.get("worker_configured"):
    return
  _state["worker_configured"] = True
  level = os.environ.get(_WORKER_VERBOSITY_ENV)
  if level is not None:
    configure(int(level))


def _project_dirs() -> List[str]:
  dirs = [os.path.dirname(os.path.abspath(__file__))]
  main = sys.modules.get("__main__")
  main_file = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else None)
  if main_file:
    dirs.append(os.path.dirname(os.path.abspath(main_file)))
  return [d + os.sep for d in dirs]


class _LibraryFilter(logging.Filter):
  """Passes WARNING and up, and INFO/DEBUG records logged from this project's files only.

  It also clears a live progress line before a record goes to the same terminal, so that a log
  line never lands in the middle of the bar (the bar redraws at its next update).
  """

  def __init__(self, level: int):
    super().__init__()
    self.level = level
    self.project_dirs = _project_dirs()
    self.hidden = 0

  def is_project(self, pathname: str) -> bool:
    path = os.path.abspath(pathname or "")
    for d in self.project_dirs:
      if path.startswith(d):
        # The script's folder may hold a virtual environment; its packages are libraries.
        if d != self.project_dirs[0] and ("site-packages" in path or "dist-packages" in path):
          continue
        return True
    return False

  def filter(self, record: logging.LogRecord) -> bool:
    keep = self._keep(record)
    if keep:
      active = _state["active"]
      if active is not None:
        active.clear_line()
    else:
      self.hidden += 1
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


class _PlainInfoFormatter(logging.Formatter):
  """The project's INFO lines as bare text; warnings and errors keep absl's prefix (file:line)."""

  def __init__(self, fallback: logging.Formatter):
    super().__init__()
    self.fallback = fallback

  def format(self, record: logging.LogRecord) -> str:
    if record.levelno < logging.WARNING:
      return record.getMessage()
    return self.fallback.format(record)


def _root_handler():
  """absl's handler on the root logger when absl logging is set up, else the first root handler."""
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    handler = absl_logging.get_absl_handler()
    if handler in logging.root.handlers:
      return handler
  except ImportError:
    pass
  if not logging.root.handlers:
    logging.basicConfig(format="%(message)s")
  return logging.root.handlers[0]


def configure(level: int) -> None:
  """Sets up the console for verbosity `level` (absl's --verbosity); call first thing in main().

  0: the project's lines (INFO) and every warning/error, plain and short; library INFO hidden.
  1: also the libraries' INFO lines, with absl's usual prefix (time, thread, file:line).
  2+: DEBUG records as well.
  Idempotent: a second call replaces the first's set-up.
  """
  level = int(level)
  _state["verbosity"] = level
  handler = _root_handler()
  old = _state["filter"]
  if old is not None:
    handler.removeFilter(old)
  flt = _LibraryFilter(level)
  handler.addFilter(flt)
  _state["filter"] = flt
  # absl maps its verbosity 1 to DEBUG; here 1 means "the libraries' INFO lines too".
  logging.root.setLevel(logging.INFO if level <= 1 else logging.DEBUG)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    if isinstance(handler, absl_logging.ABSLHandler):
      python_handler = handler.python_handler
      if _state["formatter"] is None:
        _state["formatter"] = python_handler.formatter
      python_handler.setFormatter(_PlainInfoFormatter(_state["formatter"]) if level <= 0
                                  else _state["formatter"])
  except ImportError:
    pass
  if level <= 0:
    _install_import_hooks()
  else:
    _remove_import_hooks()


def hidden_line_count() -> int:
  """How many library records the filter has hidden so far (for tests and the -v hint)."""
  flt = _state["filter"]
  return flt.hidden if flt is not None else 0


# ---- quiet imports: TensorFlow's C++ INFO lines and TFDS's progress bars --------------------------

@contextlib.contextmanager
def _native_stderr_without_info():
  """Captures file descriptor 2 (C++ writes there directly) and replays all but the INFO lines."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):   # no real stderr (some notebooks): nothing to do
    yield
    return
  with tempfile.TemporaryFile(mode="w+b") as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      try:
        sys.stderr.flush()
      except (OSError, ValueError):
        pass
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode("utf-8", "replace")
      kept = [line for line in text.splitlines()
              if line.strip() and not _NATIVE_INFO_LINE.match(line)
              and _NATIVE_PREINIT_NOTICE not in line]
      if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()


class _WrappedLoader(importlib.abc.Loader):
  """Runs the real loader's exec_module inside `around` and calls `after(module)` once loaded."""

  def __init__(self, loader, around, after):
    self._loader = loader
    self._around = around
    self._after = after

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    with self._around():
      self._loader.exec_module(module)
    if self._after is not None:
      self._after(module)

  def __getattr__(self, name):   # get_resource_reader, is_package, ... of the real loader
    return getattr(self._loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
  """On the first import of `name`, wraps its loading; removes itself after that one import."""

  def __init__(self, name: str, around: Callable[[], Any], after: Optional[Callable[[Any], None]]):
    self.name = name
    self.around = around
    self.after = after

  def find_spec(self, fullname, path=None, target=None):
    if fullname != self.name:
      return None
    _remove_hook(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    spec.loader = _WrappedLoader(spec.loader, self.around, self.after)
    return spec


def _remove_hook(hook):
  if hook in sys.meta_path:
    sys.meta_path.remove(hook)
  if hook in _state["hooks"]:
    _state["hooks"].remove(hook)


def _remove_import_hooks():
  for hook in list(_state["hooks"]):
    _remove_hook(hook)


def _install_import_hooks():
  _remove_import_hooks()
  if "tensorflow" not in sys.modules:
    hook = _ImportHook("tensorflow", _native_stderr_without_info, None)
    sys.meta_path.insert(0, hook)
    _state["hooks"].append(hook)
  if "tensorflow_datasets" in sys.modules:
    _quiet_tfds(sys.modules["tensorflow_datasets"])
  else:
    hook = _ImportHook("tensorflow_datasets", contextlib.nullcontext, _quiet_tfds)
    sys.meta_path.insert(0, hook)
    _state["hooks"].append(hook)


def _quiet_tfds(module) -> None:
  """Routes TFDS's progress bars to one "preparing data" line and drops its two stdout notices."""
  del module
  try:
    from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import utils as tfds_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if getattr(tfds_utils, "_mdssd_quiet", False):
    return
  tfds_utils._mdssd_quiet = True  # pylint: disable=protected-access
  original_tqdm = tfds_utils.tqdm
  original_async = tfds_utils.async_tqdm

  def tqdm(*args, **kwargs):
    if verbosity() >= 1:
      return original_tqdm(*args, **kwargs)
    return _TfdsBar(*args, **kwargs)

  @contextlib.contextmanager
  def async_tqdm(*args, **kwargs):
    if verbosity() >= 1:
      with original_async(*args, **kwargs) as bar:
        yield bar
      return
    yield _TfdsBar(*args, **kwargs)

  tfds_utils.tqdm = tqdm
  tfds_utils.async_tqdm = async_tqdm
  # "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared to ...":
  # the project's registry says what it prepares and where; these two go to stdout unconditionally.
  builder_cls = dataset_builder.DatasetBuilder
  for name in ("_log_download_bytes", "_log_download_done"):
    original = getattr(builder_cls, name, None)
    if original is None:
      continue

    def quiet(self, _original=original):
      if verbosity() >= 1:
        _original(self)

    setattr(builder_cls, name, quiet)


class _TfdsBar:
  """Stands in for one of TFDS's tqdm bars: counts what TFDS iterates and feeds `preparation()`."""

  def __init__(self, iterable=None, desc: str = "", total: Optional[int] = None, unit: str = "",
               **unused):
    del unused
    self._iterable = iterable
    self.total = total
    self.n = 0
    self.stage = _stage_name(desc, unit)
    self._counts = "examples" in (unit or "") or "examples" in (desc or "")
    if self._counts:
      preparation().start_stage(self.stage, total)

  def __iter__(self):
    if self._iterable is None:
      return iter(())
    return self._iterate()

  def _iterate(self):
    for item in self._iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n: int = 1):
    self.n += n
    if self._counts:
      preparation().advance(self.stage, self.n, self.total)

  def update_total(self, n: int = 1):
    self.total = (self.total or 0) + n

  def close(self):
    if self._counts:
      preparation().finish_stage(self.stage, self.n)
      self._counts = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __getattr__(self, name):   # set_description, refresh, clear, ...: nothing to do
    return lambda *args, **kwargs: None


def _stage_name(desc: str, unit: str) -> str:
  desc = (desc or "").strip().rstrip(".").strip()
  if desc.lower().startswith("shuffling"):
    # "Shuffling /root/.../name-train.array_record-[0-9]...": the split name is enough.
    match = re.search(r"-(\w+)\.(array_record|tfrecord)", desc)
    return "shuffling " + (match.group(1) if match else "examples")
  desc = desc[0].lower() + desc[1:] if desc else (unit or "").strip()
  return desc.replace(" examples", "")


# ---------------------------------------------------------------------------------------------------
# Output: lines, the progress bar, data preparation.
# ---------------------------------------------------------------------------------------------------

def _is_tty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


def say(*lines: str, stream: Optional[IO[str]] = None) -> None:
  """Prints the project's own lines (tables, the summary) on stdout without breaking a live bar."""
  stream = stream or sys.stdout
  active = _state["active"]
  if active is not None:
    active.clear_line()
  stream.write("\n".join(str(line) for line in lines) + "\n")
  stream.flush()


def format_duration(seconds: Optional[float]) -> str:
  """12.3 -> "12s", 754 -> "12m34s", 45296 -> "12h34m"; None/NaN -> "--"."""
  if seconds is None or seconds != seconds or seconds == float("inf"):
    return "--"
  seconds = int(round(max(0.0, seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _format_number(value: float) -> str:
  if value != value:
    return "nan"
  if value == 0 or 1e-3 <= abs(value) < 1e5:
    return f"{value:.4g}"
  return f"{value:.3e}"


class Progress:
  """A live progress line for a loop of `total_steps` steps.

  On a terminal (the stream's isatty()): one line redrawn with "\\r", at most every
  `min_redraw_interval_s`, e.g.
      train [########............]  40%  400/1000  1.52 steps/s  ETA 6m34s  loss 3.214
  Elsewhere (CI, nohup, a pipe): one plain line per `log_every_steps` steps and at the last step,
      step 400/1000 (40%)  1.52 steps/s  ETA 6m34s  loss 3.214
  steps/s counts from the first update on, so the first step's compilation does not skew it.

  Call `update(step, loss=...)` once per step (any scalars may be given by keyword, e.g. only on
  the steps where the loop fetched them; the latest value is shown), then `close()`.
  """

  def __init__(self, total_steps: int, start_step: int = 0, desc: str = "train",
               log_every_steps: int = 100, stream: Optional[IO[str]] = None,
               enabled: bool = True, min_redraw_interval_s: float = 0.1,
               clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None,
               width: Optional[int] = None):
    if total_steps <= 0:
      raise ValueError(f"Progress needs total_steps > 0, got {total_steps} "
                       "(config.train.num_steps)")
    if log_every_steps <= 0:
      raise ValueError(f"Progress needs log_every_steps > 0, got {log_every_steps} "
                       "(config.train.log_every_steps)")
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.desc = desc
    self.log_every_steps = int(log_every_steps)
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.tty = _is_tty(self.stream) if tty is None else tty
    self.min_redraw_interval_s = min_redraw_interval_s
    self.clock = clock
    self.width = width
    self.scalars: Dict[str, float] = {}
    self.step = self.start_step
    self._first: Optional[Tuple[int, float]] = None   # (step, time) of the first update
    self._last_draw = -float("inf")
    self._drawn = False        # a partial line is on the terminal
    self._lock = threading.Lock()
    if enabled:
      _state["active"] = self

  # ---- numbers ----
  def steps_per_second(self) -> Optional[float]:
    if self._first is None or self.step <= self._first[0]:
      return None
    elapsed = self.clock() - self._first[1]
    return (self.step - self._first[0]) / elapsed if elapsed > 0 else None

  def eta_seconds(self) -> Optional[float]:
    rate = self.steps_per_second()
    return None if not rate else (self.total_steps - self.step) / rate

  # ---- text ----
  def _fields(self) -> str:
    rate = self.steps_per_second()
    parts = [f"{rate:.3g} steps/s" if rate else "-- steps/s", f"ETA {format_duration(self.eta_seconds())}"]
    parts += [f"{k} {_format_number(v)}" for k, v in self.scalars.items()]
    return "  ".join(parts)

  def line(self) -> str:
    """The text of the current state (a bar on a terminal, plain otherwise)."""
    fraction = min(1.0, max(0.0, self.step / self.total_steps))
    digits = len(str(self.total_steps))
    if not self.tty:
      return (f"step {self.step:>{digits}}/{self.total_steps} ({100 * fraction:3.0f}%)  "
              f"{self._fields()}")
    columns = self.width or shutil.get_terminal_size((100, 20)).columns
    tail = f" {100 * fraction:3.0f}%  {self.step:>{digits}}/{self.total_steps}  {self._fields()}"
    bar_width = max(10, min(30, columns - len(self.desc) - len(tail) - 4))
    filled = int(round(bar_width * fraction))
    text = f"{self.desc} [{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
    return text[:max(20, columns - 1)]

  # ---- drawing ----
  def update(self, step: int, **scalars: Optional[float]) -> None:
    """Step `step` is done; scalars (e.g. loss=2.3) are shown until newer values arrive."""
    if not self.enabled:
      return
    now = self.clock()
    with self._lock:
      self.step = int(step)
      if self._first is None:
        self._first = (self.step, now)
      for k, v in scalars.items():
        if v is not None:
          self.scalars[k] = float(v)
      last = self.step >= self.total_steps
      if self.tty:
        if last or now - self._last_draw >= self.min_redraw_interval_s:
          self.stream.write("\r\033[K" + self.line())
          self.stream.flush()
          self._drawn = True
          self._last_draw = now
      elif last or self.step % self.log_every_steps == 0:
        self.stream.write(self.line() + "\n")
        self.stream.flush()

  def clear_line(self) -> None:
    """Erases the partial bar line (before other output); the next update redraws it."""
    if self.tty and self._drawn:
      self.stream.write("\r\033[K")
      self.stream.flush()
      self._drawn = False
      self._last_draw = -float("inf")

  def close(self) -> None:
    """Ends the bar's line (the final state stays on screen) and detaches it from the console."""
    with self._lock:
      if self.enabled and self.tty and self._drawn:
        self.stream.write("\r\033[K" + self.line() + "\n")
        self.stream.flush()
        self._drawn = False
    if _state["active"] is self:
      _state["active"] = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Preparation:
  """The one "preparing data" line behind TFDS's bars (see `_TfdsBar`).

  Terminal: "preparing data: generating train 1200/4000  12s", redrawn. Elsewhere: one line per
  finished stage ("preparing data: generating train: 4000 examples in 31s").
  """

  def __init__(self, stream: Optional[IO[str]] = None, tty: Optional[bool] = None,
               clock: Callable[[], float] = time.monotonic, min_redraw_interval_s: float = 0.2):
    self.stream = stream
    self.tty = tty
    self.clock = clock
    self.min_redraw_interval_s = min_redraw_interval_s
    self._start: Dict[str, float] = {}
    self._last_draw = -float("inf")
    self._drawn = False

  def _out(self):
    return self.stream or sys.stdout

  def _is_tty(self):
    return _is_tty(self._out()) if self.tty is None else self.tty

  def start_stage(self, stage: str, total: Optional[int]) -> None:
    self._start[stage] = self.clock()
    self.advance(stage, 0, total, force=True)

  def advance(self, stage: str, count: int, total: Optional[int], force: bool = False) -> None:
    if not self._is_tty():
      return
    now = self.clock()
    if not force and now - self._last_draw < self.min_redraw_interval_s:
      return
    elapsed = now - self._start.get(stage, now)
    amount = f"{count}/{total}" if total else f"{count}"
    out = self._out()
    out.write(f"\r\033[Kpreparing data: {stage} {amount} examples  {format_duration(elapsed)}")
    out.flush()
    self._drawn = True
    self._last_draw = now

  def finish_stage(self, stage: str, count: int) -> None:
    elapsed = self.clock() - self._start.pop(stage, self.clock())
    out = self._out()
    if self._is_tty():
      # Stages follow each other quickly: redraw in place, keep only the last on screen.
      out.write(f"\r\033[Kpreparing data: {stage}: {count} examples in {format_duration(elapsed)}")
      self._drawn = True
      if not self._start:
        out.write("\n")
        self._drawn = False
    elif not stage.startswith("shuffling"):
      # Off a terminal one line per generated split; shuffling follows at once and adds nothing.
      out.write(f"preparing data: {stage}: {count} examples in {format_duration(elapsed)}\n")
    out.flush()


_preparation = _Preparation()


def preparation() -> _Preparation:
  """The process's "preparing data" line (used by the TFDS bar replacement)."""
  return _preparation


# ---------------------------------------------------------------------------------------------------
# The end-of-run summary.
# ---------------------------------------------------------------------------------------------------

def _ap(value: Optional[float]) -> str:
  return "  -  " if value is None or value != value else f"{value:.3f}"


def run_summary(*, steps: int, wall_s: float, images_per_s: Optional[float],
                last_map: Optional[Tuple[int, float]], best_map: Optional[Tuple[int, float]],
                ap_by_size: Optional[Mapping[str, Optional[float]]],
                paths: Mapping[str, str], metric_name: str = "mAP@0.5",
                stopped_early: bool = False) -> str:
  """The closing table of a run, from numbers (no I/O).

  Args:
    steps: the step the run stopped at.
    wall_s: the whole command's wall time, seconds.
    images_per_s: training images per second (global batch x steps / training time), or None.
    last_map, best_map: (step, value) of the last and the best evaluation, or None (none ran).
    ap_by_size: {bucket name: AP} of the last evaluation, in display order (None/NaN: no object of
      that size), or None.
    paths: {label: path} in display order, e.g. checkpoints, pictures, plots, logs, metrics.
    metric_name: what last/best measure.
    stopped_early: the run stopped before its last step (a preemption notice).
  Returns:
    Lines like
      Done: 600 steps in 8m10s, 9.8 images/s
        mAP@0.5       last 0.767 (step 600)   best 0.767 (step 600)
        AP by size    tiny 0.612   small 0.803   medium 0.911   large   -
        checkpoints   /tmp/demo/checkpoints
  """
  speed = f", {images_per_s:.3g} images/s" if images_per_s else ""
  head = "Stopped (preempted; rerun the same command to resume)" if stopped_early else "Done"
  lines = [f"{head}: {steps} steps in {format_duration(wall_s)}{speed}"]
  labels = [metric_name, "AP by size"] + list(paths)
  width = max(len(label) for label in labels) + 2
  if last_map is not None:
    text = f"last {_ap(last_map[1])} (step {last_map[0]})"
    if best_map is not None:
      text += f"   best {_ap(best_map[1])} (step {best_map[0]})"
    lines.append(f"  {metric_name:<{width}}{text}")
  else:
    lines.append(f"  {metric_name:<{width}}no evaluation ran")
  if ap_by_size:
    cells = "   ".join(f"{name} {_ap(value)}" for name, value in ap_by_size.items())
    lines.append(f"  {'AP by size':<{width}}{cells}")
  for label, path in paths.items():
    lines.append(f"  {label:<{width}}{path}")
  return "\n".join(lines)
