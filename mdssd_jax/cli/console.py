"""The command line's console set-up: verbosity, which library lines reach the terminal, data workers.

What a run shows (its lines, the live progress bar, the closing summary) is report/progress.py; this
module decides which library output gets through. At the default verbosity (0) the console shows only this project's lines: what is being prepared,
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
Data worker processes (Grain's, the generator's pool) are fresh interpreters: the environment
names `configure_worker` (data/workers.py runs it), so they get the same console without the data
layer importing this one.
"""

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mdssd_jax.data import workers
from mdssd_jax.report import progress

# The verbosity of this process (absl's --verbosity after `configure`): 0 quiet, 1 libraries' INFO,
# 2 and up DEBUG.
_state: Dict[str, Any] = {"verbosity": 0, "filter": None, "formatter": None, "hooks": []}

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
  os.environ[workers.WORKER_INIT_ENV] = f"{__name__}:configure_worker"
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
      progress.clear_active_line()
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
      progress.preparation().start_stage(self.stage, total)

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
      progress.preparation().advance(self.stage, self.n, self.total)

  def update_total(self, n: int = 1):
    self.total = (self.total or 0) + n

  def close(self):
    if self._counts:
      progress.preparation().finish_stage(self.stage, self.n)
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
