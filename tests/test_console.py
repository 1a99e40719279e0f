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


def test_tfds_bar_stand_in_counts_into_one_line():
  out = io.StringIO()
  prep = progress._Preparation(stream=out, tty=False, clock=lambda: 0.0)
  old = progress._preparation
  progress._preparation = prep
  try:
    for _ in console._TfdsBar(range(7), desc="Generating train examples...", unit=" examples"):
      pass
    shuffle = console._TfdsBar(range(7), desc="Shuffling /d/x-train.array_record-[0-9]...", unit=" examples")
    assert shuffle.stage == "shuffling train"
    list(shuffle)
    with console._TfdsBar(desc="Generating splits...", unit=" splits") as splits:
      splits.update(1)
  finally:
    progress._preparation = old
  assert out.getvalue() == "preparing data: generating train: 7 examples in 0s\n"


def test_native_info_lines_dropped_from_a_quiet_import(tmp_path):
  """A module whose import writes C++-style log lines to file descriptor 2, imported under the hook."""
  (tmp_path / "noisy_native.py").write_text(textwrap.dedent("""
      import os
      os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
      os.write(2, b"I0000 00:00:1796138808.813476    4923 port.cc:153] oneDNN custom operations are on.\\n")
      os.write(2, b"W0000 00:00:1796138808.813476    4923 gpu.cc:1] a real warning\\n")
      VALUE = 3
  """))
  code = textwrap.dedent(f"""
      import sys
      from mdssd_jax.cli import console
      hook = console._ImportHook("noisy_native", console._native_stderr_without_info, None)
      sys.meta_path.insert(0, hook)
      import noisy_native
      print(noisy_native.VALUE)
  """)
  # The noisy module's folder on the path through the environment; the checkout is the working folder.
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
  assert run.stdout.strip() == "3"
  assert run.stderr.splitlines() == ["W0000 00:00:1796138808.813476    4923 gpu.cc:1] a real warning"]


_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+?):\d+\]")
_PROJECT_FILES = {os.path.basename(p) for d in ("mdssd_jax", "mdssd_jax/data", "mdssd_jax/evaluation",
                                                "mdssd_jax/models", ".")
                  for p in os.listdir(os.path.join(ROOT, d)) if p.endswith(".py")}


def _run_main(tmp_path, workdir, *extra):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)     # the tests' conftest sets 2; check the real default
  run = subprocess.run([sys.executable, "main.py", "--config=configs/tiny_mdssd.py",
                        f"--workdir={tmp_path / workdir}", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
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
