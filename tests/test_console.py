"""The console: verbosity flags, the library-line filter, the progress line, the closing summary,
and the tiny config through main.py (quiet by default, library lines back with -v)."""

import io
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from mdssd_jax.cli import console
from mdssd_jax.report import progress
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_verbosity_from_argv_and_bare_v():
  assert console.verbosity_from_argv(["main.py", "--config=x"]) == 0
  assert console.verbosity_from_argv(["main.py", "-v"]) == 1
  assert console.verbosity_from_argv(["main.py", "-v", "2"]) == 2
  assert console.verbosity_from_argv(["main.py", "--verbosity=1"]) == 1
  assert console.verbosity_from_argv(["main.py", "--verbosity", "0", "--mode=eval"]) == 0
  assert console.expand_bare_verbose_flag(["main.py", "-v", "--mode=eval"]) == ["main.py", "-v=1", "--mode=eval"]
  assert console.expand_bare_verbose_flag(["main.py", "-v", "2"]) == ["main.py", "-v", "2"]


def _record(pathname, level=logging.INFO, msg="hello"):
  return logging.LogRecord("absl", level, pathname, 12, msg, None, None)


def test_filter_keeps_project_lines_and_warnings_only():
  quiet = console._LibraryFilter(0)
  # As under `python main.py`: the package's folder and the script's (the repository root).
  quiet.project_dirs = [os.path.join(ROOT, "mdssd_jax") + os.sep, ROOT + os.sep]
  lib = "/usr/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not quiet.filter(_record(lib))
  assert quiet.filter(_record(lib, logging.WARNING))
  assert quiet.filter(_record(os.path.join(ROOT, "mdssd_jax", "train.py")))
  # A library inside a virtual environment next to the script is still a library.
  assert quiet.filter(_record(os.path.join(ROOT, "main.py")))
  assert not quiet.filter(_record(os.path.join(ROOT, ".venv", "lib", "site-packages", "jax", "x.py")))
  tfds = "/x/site-packages/tensorflow_datasets/core/dataset_builder.py"
  assert not quiet.filter(_record(tfds, logging.WARNING, "Using custom data configuration: Foo"))
  assert quiet.filter(_record(tfds, logging.WARNING, "Something else is wrong"))
  assert quiet.hidden == 3
  loud = console._LibraryFilter(1)
  assert loud.filter(_record(lib)) and loud.filter(_record(tfds, logging.WARNING, "Using custom data configuration"))


def test_progress_plain_lines_off_a_terminal():
  now = [100.0]
  out = io.StringIO()
  bar = progress.Progress(5, start_step=0, log_every_steps=2, stream=out, clock=lambda: now[0], tty=False)
  # Step 1 at t=100 (compilation before it is not counted), then one step every 0.5 s.
  for step, t, loss in [(1, 100.0, 9.0), (2, 100.5, None), (3, 101.0, 7.25), (4, 101.5, None), (5, 102.0, 6.5)]:
    now[0] = t
    bar.update(step, loss=loss)
  bar.close()
  assert out.getvalue().splitlines() == [
      "step 2/5 ( 40%)  2 steps/s  ETA 2s  loss 9",
      "step 4/5 ( 80%)  2 steps/s  ETA 0s  loss 7.25",
      "step 5/5 (100%)  2 steps/s  ETA 0s  loss 6.5",
  ]


def test_progress_bar_redraws_in_place_on_a_terminal():
  now = [0.0]
  out = io.StringIO()
  bar = progress.Progress(4, log_every_steps=100, stream=out, clock=lambda: now[0], tty=True, width=80,
                         min_redraw_interval_s=1.0)
  bar.update(1, loss=2.0)
  now[0] = 0.5
  bar.update(2)              # within the redraw interval: not drawn
  now[0] = 2.0
  bar.update(3)
  progress.say("a table", stream=out)   # clears the bar line first
  now[0] = 2.1
  bar.update(4)              # the last step is always drawn
  bar.close()
  text = out.getvalue()
  assert "\n" not in text.split("a table")[0]           # bar lines were redrawn with \r, no newline
  frames = [f for f in re.split(r"\r\033\[K", text) if f]
  assert frames[0].startswith("train [") and " 1/4" in frames[0] and "loss 2" in frames[0]
  assert " 2/4" not in text
  assert frames[1].startswith("train [") and " 3/4" in frames[1] and "1 steps/s" in frames[1]
  assert frames[2] == "a table\n"
  assert "100%" in frames[-1] and frames[-1].endswith("\n")
  assert all(len(f.rstrip("\n")) <= 79 for f in frames)


def test_progress_rejects_bad_config():
  with pytest.raises(ValueError, match="config.train.log_every_steps"):
    progress.Progress(10, log_every_steps=0)
  with pytest.raises(ValueError, match="config.train.num_steps"):
    progress.Progress(0)


def test_format_duration():
  assert [progress.format_duration(s) for s in (None, 4.4, 59.6, 754, 45296)] == \
      ["--", "4s", "1m00s", "12m34s", "12h34m"]
  # Data preparation's lines keep tenths below a minute.
  assert [progress.format_duration(s, tenths_below_a_minute=True) for s in (0.04, 4.44, 59.96, 754)] == \
      ["0.0s", "4.4s", "1m00s", "12m34s"]


def test_run_summary_table():
  text = progress.run_summary(
      steps=600, wall_s=490, images_per_s=9.84, last_map=(600, 0.7671), best_map=(400, 0.78),
      ap_by_size={"tiny": 0.6123, "small": 0.8, "medium": float("nan")},
      paths={"checkpoints": "/w/checkpoints", "pictures": "/w/pictures/step_00000600/sheet.jpg"})
  assert text.splitlines() == [
      "Done: 600 steps in 8m10s, 9.84 images/s",
      "  mAP@0.5      last 0.767 (step 600)   best 0.780 (step 400)",
      "  AP by size   tiny 0.612   small 0.800   medium   -  ",
      "  checkpoints  /w/checkpoints",
      "  pictures     /w/pictures/step_00000600/sheet.jpg",
  ]
  none = progress.run_summary(steps=4, wall_s=3, images_per_s=None, last_map=None, best_map=None,
                             ap_by_size=None, paths={})
  assert none.splitlines() == ["Done: 4 steps in 3s", "  mAP@0.5     no evaluation ran"]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_builder_progress_lines_and_status_records():
  """data/report.with_progress: one INFO line per finished split, status records (DEBUG) between."""
  from mdssd_jax.data import report
  now = [0.0]

  def examples(n):
    for i in range(n):
      now[0] += 0.2        # every example takes 0.2 s
      yield i

  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append((record.name, record.levelno, record.getMessage()))

  keep = Keep(level=logging.DEBUG)
  root, status = logging.getLogger(), logging.getLogger(report.STATUS_LOGGER)
  old_levels = root.level, status.level
  root.addHandler(keep)
  root.setLevel(logging.DEBUG)
  status.setLevel(logging.DEBUG)
  try:
    counted = report._counted("train", examples(7), clock=lambda: now[0])
    assert list(counted) == list(range(7))
  finally:
    root.removeHandler(keep)
    root.setLevel(old_levels[0])
    status.setLevel(old_levels[1])
  info = [m for name, level, m in records if level == logging.INFO]
  assert info == ["preparing data: generating train: 7 examples in 1.4s"]
  # 1.4 s in all, a status record at most every STATUS_EVERY_S (0.5 s): after 3 and 6 examples.
  statuses = [m for name, level, m in records if name == report.STATUS_LOGGER]
  assert statuses == ["preparing data: generating train: 3 examples, 0.6s",
                      "preparing data: generating train: 6 examples, 1.2s"]


def test_console_handler_writes_lines_warnings_and_the_status_line():
  out, err = _Terminal(), io.StringIO()
  handler = console._ConsoleHandler("mdssd_jax.status", stdout=out, stderr=err)
  project = os.path.join(ROOT, "mdssd_jax", "data", "registry.py")
  lib = "/usr/lib/python3.11/site-packages/orbax/checkpoint/async_checkpointer.py"
  status = logging.LogRecord("mdssd_jax.status", logging.DEBUG, project, 1, "generating: 3", None, None)
  handler.handle(status)
  assert out.getvalue() == "\r\033[Kgenerating: 3"
  handler.handle(_record(project, logging.INFO, "preparing done"))
  # The status line is erased, the INFO line written bare on stdout.
  assert out.getvalue() == "\r\033[Kgenerating: 3\r\033[Kpreparing done\n"
  try:
    raise OSError("disk full")
  except OSError:
    failure = logging.LogRecord("absl", logging.ERROR, lib, 7, "save failed", None, sys.exc_info())
  handler.handle(failure)
  # A library's error keeps absl's prefix and its line but not its traceback; stdout is untouched.
  assert err.getvalue().count("\n") == 1 and "save failed" in err.getvalue()
  assert "Traceback" not in err.getvalue() and re.match(r"^E\d{4} ", err.getvalue())
  assert failure.exc_info is not None          # the record itself is left as it was
  # Off a terminal status records show nothing.
  plain = io.StringIO()
  console._ConsoleHandler("mdssd_jax.status", stdout=plain, stderr=err).handle(status)
  assert plain.getvalue() == ""


def test_console_uses_public_switches_only(tmp_path):
  """configure(0) in a fresh process: no import hooks, TFDS's functions untouched, oneDNN's
  notice switched off through the environment, TFDS's bars off only while it prepares."""
  code = textwrap.dedent("""
      import sys
      from mdssd_jax.cli import console
      console.set_library_environment(["main.py"])
      console.configure(0)
      no_hooks = not [f for f in sys.meta_path if type(f).__module__.startswith("mdssd_jax")]
      import tensorflow_datasets as tfds
      from tensorflow_datasets.core import utils as tfds_utils
      from tensorflow_datasets.core import dataset_builder
      import os
      print(no_hooks, os.environ["TF_ENABLE_ONEDNN_OPTS"],
            tfds_utils.tqdm.__module__.startswith("tensorflow_datasets"),
            dataset_builder.DatasetBuilder._log_download_done.__module__.startswith("tensorflow_datasets"))
  """)
  env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env=env, timeout=300)
  assert run.stdout.split() == ["True", "0", "True", "True"], run.stdout + run.stderr
  assert "oneDNN" not in run.stderr, run.stderr


_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+?):\d+\]")
_PROJECT_FILES = {os.path.basename(p) for d in ("mdssd_jax", "mdssd_jax/data", "mdssd_jax/evaluation",
                                                "mdssd_jax/models", ".")
                  for p in os.listdir(os.path.join(ROOT, d)) if p.endswith(".py")}


def _run_main(tmp_path, workdir, *extra):
  # real_console: the tests' conftest sets TF_CPP_MIN_LOG_LEVEL=2; check the real default.
  run = helpers.run_main([f"--workdir={tmp_path / workdir}", *extra], real_console=True, check=True,
                         env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds")))
  return run.stdout.splitlines() + run.stderr.splitlines()


def test_main_is_quiet_by_default_and_verbose_with_v(tmp_path):
  lines = _run_main(tmp_path, "quiet")
  library = [l for l in lines
             if (_ABSL_PREFIX.match(l) and _ABSL_PREFIX.match(l).group(1) not in _PROJECT_FILES)
             or "oneDNN" in l or "absl::InitializeLog" in l or "Generating splits" in l
             or "Downloading and preparing dataset" in l]
  assert not library, "\n".join(library)
  assert len(lines) <= 40, "\n".join(lines)
  assert any(l.startswith("preparing data: generating train") for l in lines), "\n".join(lines)
  verbose = _run_main(tmp_path, "verbose", "-v")
  library = [l for l in verbose if _ABSL_PREFIX.match(l)
             and _ABSL_PREFIX.match(l).group(1) not in _PROJECT_FILES]
  assert any("checkpoint_manager.py" in l for l in library), "\n".join(verbose[:50])


def test_filter_hides_orbax_preemption_failed_save_and_slow_save_lines_only():
  """Orbax's lines of a multi-process preemption, of a failed save (main.py's one Error: line
  reports that failure) and its "Waiting for previous save" notice stay off the default console;
  its other errors and -v keep them."""
  quiet, loud = console._LibraryFilter(0), console._LibraryFilter(1)
  multihost = "/x/site-packages/orbax/checkpoint/_src/multihost/multihost.py"
  future = "/x/site-packages/orbax/checkpoint/_src/futures/future.py"
  expected = [_record(multihost, logging.WARNING, "[process=0][thread=MainThread] Reached "
                      "preemption sync point, step=146"),
              _record(future, logging.ERROR, "[process=0][thread=array_type_handler] "
                      "_SignalingThread.run() raised an exception: [Errno 28] No space left"),
              _record(future, logging.ERROR, "[process=0] Failed to run 4 Handler Commit "
                      "operations or the Commit callback in background save thread"),
              _record(future, logging.ERROR, "[process=0][step=3][wait_until_finished] Save "
                      "Finalize thread (save_finalize) failed."),
              _record("/x/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING,
                      "Waiting for previous save to complete took 12.500000 seconds. If this "
                      "number is high, consider checkpointing less frequently.")]
  assert not any(quiet.filter(r) for r in expected)
  assert all(loud.filter(r) for r in expected)
  assert quiet.filter(_record(future, logging.ERROR, "something else went wrong"))


_NATIVE_LINES = textwrap.dedent("""
    import os, sys
    from mdssd_jax.cli import console
    console.hide_native_library_lines()
    os.write(1, b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\\n")
    os.write(2, b"W1207 15:02:15.724408    5924 preemption_notifier.cc:90] SIGTERM caught at 2026\\n")
    os.write(2, b"E1207 15:02:15.724408    5924 other.cc:1] a native error stays\\n")
    print("the run's own line")
    console.restore_native_output()
    sys.stderr.write("Error: last\\n")
""")


def test_native_library_lines_are_hidden_in_multi_process_runs():
  """What native code writes to the file descriptors (Gloo's greeting on stdout, the coordination
  service's "SIGTERM caught" on stderr) is filtered by line; everything else passes, in order."""
  run = subprocess.run([sys.executable, "-c", _NATIVE_LINES], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert run.stdout.splitlines() == ["the run's own line"]
  assert run.stderr.splitlines() == ["E1207 15:02:15.724408    5924 other.cc:1] a native error stays",
                                     "Error: last"]
