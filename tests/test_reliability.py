"""Faults injected as a user would meet them (issue: reliability), each with the clear end it must have.

Huge learning rates (no non-finite checkpoint is ever written or called good), two trainers on one
workdir (the second stops at once; a lock of a killed run is taken over), --mode=eval without a
checkpoint and a full disk (one message naming the cause and the fix, nothing created, the previous
checkpoint intact), a truncated JPEG given to predict, a kill between the final evaluation and the
final save (no duplicate result line), and a short kill -9 soak (benchmarks/kill_soak.py).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from tests import helpers


tiny_config = helpers.tiny_config


run_main = helpers.run_main


def error_lines(text):
  return [line for line in text.splitlines() if line.startswith("Error:")]


def assert_one_clear_error(proc, *fragments):
  """Exit status 1, no traceback, and exactly one `Error:` line, the last line, holding `fragments`."""
  text = proc.stdout + proc.stderr
  assert proc.returncode == 1, text[-4000:]
  assert "Traceback" not in text, text[-4000:]
  for noise in ("cannot schedule new futures", "sys.meta_path is None", "Event loop is closed"):
    assert noise not in text, text[-4000:]
  errors = error_lines(text)
  assert len(errors) == 1, text[-4000:]
  assert proc.stderr.strip().splitlines()[-1] == errors[0]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def checkpoint_steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) if os.path.isdir(ckpt) else []


def restore_all(config, workdir):
  """{step: state} of every checkpoint on disk, restored as training would."""
  from mdssd_jax.state import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), config.train,
                                       create=False)
  try:
    return {step: experiment.Setup(config).restore(manager, step)
            for step in checkpoint_steps(workdir)}
  finally:
    manager.close()


def count_nonfinite(tree):
  """Non-finite floating-point leaves of a pytree (a plain NumPy walk)."""
  import jax  # pylint: disable=g-import-not-at-top
  bad = 0
  for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
      bad += 1
  return bad


def leaf_count(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return len(jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One prepared tiny synthetic data set for the whole module."""
  from mdssd_jax.data import prepare  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  prepare.prepare(tiny_config(path))
  return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A workdir trained 2 steps (checkpoints of steps 1 and 2); copy it before changing it."""
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 2,
                                                    "train.checkpoint_every_steps": 1}), workdir)
  assert checkpoint_steps(workdir) == [1, 2]
  return workdir


def copy_workdir(src, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


# ---------------------------------------------------------------------------------------------------
# 1. Huge learning rates: no non-finite state is saved, and the error names the last good step.
# ---------------------------------------------------------------------------------------------------

def test_sgd_lr_1e38_stops_at_step_1_and_claims_no_checkpoint(data_dir, tmp_path):
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "sgd")
  config = tiny_config(data_dir, **{"train.optimizer": "sgd", "train.base_lr": 1e38,
                                    "train.warmup_steps": 0, "train.num_steps": 3,
                                    "train.checkpoint_every_steps": 1, "train.log_every_steps": 1})
  with pytest.raises(train.NonFiniteLossError) as err:
    train.train_and_evaluate(config, workdir)
  message = str(err.value)
  # The first update overflows the parameters (its loss and gradient are finite): step 1.
  assert "at step 1;" in message, message
  assert "Last good checkpoint" not in message and "No checkpoint was saved" in message, message
  assert checkpoint_steps(workdir) == []


def test_adamw_lr_1e39_after_good_steps_keeps_only_finite_checkpoints(data_dir, trained, tmp_path):
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  workdir = copy_workdir(trained, tmp_path)
  config = tiny_config(data_dir, **{"train.base_lr": 1e39, "train.warmup_steps": 0,
                                    "train.num_steps": 4, "train.checkpoint_every_steps": 1,
                                    "train.log_every_steps": 1})
  with pytest.raises(train.NonFiniteLossError) as err:
    train.train_and_evaluate(config, workdir)
  message = str(err.value)
  assert "at step 3;" in message and "Last good checkpoint: step 2 in" in message, message
  assert checkpoint_steps(workdir) == [1, 2]
  states = restore_all(config, workdir)
  assert sorted(states) == [1, 2]
  for step, state in states.items():
    assert leaf_count(state["params"]) > 10 and leaf_count(state["opt_state"]) > 10
    assert count_nonfinite(state["params"]) == 0, step
    assert count_nonfinite(state["opt_state"]) == 0, step
    assert count_nonfinite(state["batch_stats"]) == 0, step
    assert int(state["first_nonfinite_step"]) == -1 and int(state["step"]) == step


# ---------------------------------------------------------------------------------------------------
# 3. One trainer per workdir.
# ---------------------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mdssd_jax.state import workdir_lock
    with workdir_lock.WorkdirLock(sys.argv[1]):
      print("held", flush=True)
      time.sleep(600)
""")


def _start_holder(workdir):
  """A process holding the workdir's trainer lock (as a running trainer does)."""
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def test_lock_is_exclusive_within_one_process(tmp_path):
  from mdssd_jax.state import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"process {os.getpid()} on host"):
      workdir_lock.WorkdirLock(workdir).__enter__()
  with workdir_lock.WorkdirLock(workdir):   # released on exit: taken again
    pass
  assert open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read() == ""


def test_second_trainer_exits_at_once_naming_workdir_and_holder(data_dir, tmp_path):
  workdir = str(tmp_path / "busy")
  holder = _start_holder(workdir)
  try:
    start = time.time()
    proc = run_main([f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"])
    elapsed = time.time() - start
  finally:
    holder.kill()
    holder.wait()
  line = assert_one_clear_error(proc, "WorkdirBusyError", workdir, f"process {holder.pid} on host")
  assert "another --workdir" in line
  assert not os.path.exists(os.path.join(workdir, "checkpoints")), "the second trainer built something"
  assert elapsed < 300


def test_lock_of_a_killed_trainer_is_taken_over_with_a_warning(data_dir, tmp_path, caplog):
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "stale")
  holder = _start_holder(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 1}), workdir)
  warnings = [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]
  assert len(warnings) == 1 and f"process {holder.pid} on host" in warnings[0], warnings
  assert checkpoint_steps(workdir) == [1]


# ---------------------------------------------------------------------------------------------------
# 4. Errors: one clear message, nothing left behind.
# ---------------------------------------------------------------------------------------------------

def test_eval_without_checkpoint_is_one_clear_error_and_creates_nothing(data_dir, tmp_path):
  workdir = str(tmp_path / "empty")
  os.makedirs(workdir)
  proc = run_main([f"--workdir={workdir}", "--mode=eval", f"--config.data.data_dir={data_dir}"])
  assert_one_clear_error(proc, "FileNotFoundError", "no checkpoint in",
                         os.path.join(workdir, "checkpoints"), "train first")
  assert os.listdir(workdir) == []


def test_describe_failure_finds_a_full_disk_anywhere_in_the_chain():
  import errno  # pylint: disable=g-import-not-at-top
  spec = __import__("importlib.util").util.spec_from_file_location("mdssd_main", os.path.join(ROOT, "main.py"))
  module = __import__("importlib.util").util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/3/x")
    except OSError as write_error:
      raise RuntimeError("secondary") from write_error
  except RuntimeError as err:
    message, traceback_helps = module.describe_failure(err, workdir="/w")
  assert message.startswith("no space left on the device holding /w") and not traceback_helps
  assert "OSError" in message and "keep_checkpoints" in message
  # An accelerator out of memory is also RESOURCE_EXHAUSTED, but not a full disk.
  message, _ = module.describe_failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying "
                                                    "to allocate 1.00GiB"), workdir="/w")
  assert "no space left" not in message
  message, traceback_helps = module.describe_failure(ValueError("config.train.x=0 must be ..."))
  assert message == "ValueError: config.train.x=0 must be ..." and not traceback_helps
  assert module.describe_failure(KeyError("bug"))[1]


def _can_mount_tmpfs(path):
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path], capture_output=True)
  if proc.returncode != 0:
    return False
  subprocess.run(["umount", path], check=True)
  return True


def _du_bytes(path):
  """What `path` occupies on a tmpfs: every file and folder in whole 4 KiB pages."""
  page = 4096
  total = 0
  for dirpath, dirnames, files in os.walk(path):
    total += page * (1 + len(dirnames))
    total += sum(-(-os.path.getsize(os.path.join(dirpath, f)) // page) * page for f in files)
  return total


@pytest.mark.parametrize("free_kb", [96, 512])
def test_full_disk_during_async_save_ends_in_one_message_and_keeps_last_checkpoint(
    data_dir, trained, tmp_path, free_kb):
  """A checkpoint write that meets a full disk: one message, and steps 1 and 2 stay restorable.

  96 KiB free fails the first array writes (TensorStore's other writes then post to Orbax's closed
  event loop: main.py must keep those errors out of the output); 512 KiB fails later, in metadata.
  """
  mount_point = str(tmp_path / "small_disk")
  if not _can_mount_tmpfs(mount_point):
    pytest.skip("mounting a small tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
  # Copy the run into a roomy tmpfs, then shrink it to what the copy uses plus `free_kb` (tmpfs
  # counts pages its own way): the next checkpoint (megabytes) cannot fit.
  size_kb = 2 * _du_bytes(trained) // 1024 + 1024
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mount_point], check=True)
  try:
    workdir = os.path.join(mount_point, "run")
    shutil.copytree(trained, workdir)
    stats = os.statvfs(mount_point)
    used_kb = (stats.f_blocks - stats.f_bfree) * stats.f_frsize // 1024
    subprocess.run(["mount", "-o", f"remount,size={used_kb + free_kb}k", mount_point], check=True)
    proc = run_main([f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                     "--config.train.num_steps=4", "--config.train.checkpoint_every_steps=1"])
    line = assert_one_clear_error(proc, f"no space left on the device holding {workdir}",
                                  "Free some space")
    # The real write error is the one named (not a secondary error of the shutdown).
    assert "No space left" in line or "RESOURCE_EXHAUSTED" in line or "ENOSPC" in line, line
    # Orbax's own error lines about the same failed save stay off the default console.
    library_errors = [l for l in proc.stderr.splitlines() if re.match(r"^E\d{4} ", l)]
    assert not library_errors, "\n".join(library_errors)
    config = tiny_config(data_dir)
    assert checkpoint_steps(workdir)[:2] == [1, 2]
    states = restore_all(config, workdir)
    before = restore_all(config, trained)
    import jax  # pylint: disable=g-import-not-at-top
    for step in (1, 2):
      for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(states[step])),
                      jax.tree_util.tree_leaves(jax.device_get(before[step]))):
        np.testing.assert_array_equal(a, b)
  finally:
    subprocess.run(["umount", "-l", mount_point], check=False)


# ---------------------------------------------------------------------------------------------------
# 8. predict: a truncated JPEG is skipped, named, and counted.
# ---------------------------------------------------------------------------------------------------

def test_predict_skips_a_truncated_jpeg_and_counts_it(data_dir, trained, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for name in ("a.jpg", "b.jpg", "c.jpg"):
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(images / name, quality=90)
  whole = (images / "c.jpg").read_bytes()
  (images / "c.jpg").write_bytes(whole[:len(whole) // 2])   # cut mid-scan, as an interrupted copy
  proc = run_main([f"--workdir={trained}", "--mode=predict", f"--images={images}/*.jpg",
                   f"--output_dir={tmp_path / 'out'}", f"--config.data.data_dir={data_dir}"])
  text = proc.stdout + proc.stderr
  assert proc.returncode == 0, text[-4000:]
  assert "Predicted 2 image(s)" in proc.stdout, proc.stdout
  assert "Skipped 1 of 3" in proc.stdout and "c.jpg" in proc.stdout, proc.stdout
  warnings = [l for l in proc.stderr.splitlines() if "c.jpg" in l]
  assert warnings, proc.stderr[-3000:]
  detections = json.load(open(tmp_path / "out" / "detections.json"))
  assert {os.path.basename(d["file_name"]) for d in detections} <= {"a.jpg", "b.jpg"}
  pictures = sorted(n for n in os.listdir(tmp_path / "out") if not n.endswith(".json"))
  assert len(pictures) == 2 and not any(n.startswith("c") for n in pictures), pictures


# ---------------------------------------------------------------------------------------------------
# 10a. A kill between the final evaluation and the final save: no duplicate result line on resume.
# ---------------------------------------------------------------------------------------------------

KILL_BEFORE_FINAL_SAVE = textwrap.dedent("""
    import os, signal
    from mdssd_jax.state import checkpointing
    from mdssd_jax.run import train
    from configs import tiny_mdssd
    real_save = checkpointing.save
    def die_before_final_save(manager, step, *args, **kwargs):
      if step == 3:   # evaluated already, not yet saved
        os.kill(os.getpid(), signal.SIGKILL)
      real_save(manager, step, *args, **kwargs)
    checkpointing.save = die_before_final_save
    config = tiny_mdssd.get_config()
    config.data.data_dir = {data_dir!r}
    config.train.num_steps = 3
    config.train.checkpoint_every_steps = 1
    train.train_and_evaluate(config, {workdir!r})
""")


def test_kill_between_final_eval_and_save_leaves_one_result_line(data_dir, trained, tmp_path):
  from mdssd_jax.report import history  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import train
  workdir = copy_workdir(trained, tmp_path)
  proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_FINAL_SAVE.format(data_dir=data_dir,
                                                                            workdir=workdir)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  results_path = os.path.join(workdir, history.EVAL_RESULTS_FILE)
  lines = [json.loads(l) for l in open(results_path)]
  assert [r["step"] for r in lines] == [2, 3]   # step 3 was evaluated, then the kill
  assert checkpoint_steps(workdir) == [1, 2]
  train.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 3,
                                                    "train.checkpoint_every_steps": 1}), workdir)
  lines = [json.loads(l) for l in open(results_path)]
  assert [(r["step"], r["mode"]) for r in lines] == [(2, "train"), (3, "train")], lines
  assert checkpoint_steps(workdir)[-1] == 3


# ---------------------------------------------------------------------------------------------------
# The kill -9 soak, short form.
# ---------------------------------------------------------------------------------------------------

def test_kill_soak_three_trials_resume_bit_exact(data_dir, tmp_path):
  out = tmp_path / "soak.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.kill_soak", "--trials=3",
                         "--steps=4", "--kills=1", "--seed=1", f"--data_dir={data_dir}",
                         f"--scratch={tmp_path / 'scratch'}", f"--json={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  result = json.load(open(out))
  assert result["trials"] == 3 and result["bit_exact"] == 3, proc.stdout
  assert result["kills"] >= 1, proc.stdout   # at least one run was really killed
  assert result["leaves"] > 20
  # Every checkpoint a killed-and-resumed run left behind restores and is finite.
  config = tiny_config(data_dir, **{"train.num_steps": 4})
  for trial in range(3):
    states = restore_all(config, str(tmp_path / "scratch" / f"trial_{trial}"))
    assert states and all(count_nonfinite(s["params"]) == 0 and count_nonfinite(s["opt_state"]) == 0
                          for s in states.values())


# ---------------------------------------------------------------------------------------------------
# 11. Mistakes on the command line and runs with nothing to do: one line, nothing left behind
#     (issue 37).
# ---------------------------------------------------------------------------------------------------

def assert_short(proc, max_lines=3):
  """The whole output is a few lines (the project's own), not a traceback or library chatter."""
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert len(lines) <= max_lines, "\n".join(lines)
  return lines


@pytest.mark.parametrize("config, args, fragments", [
    ("configs/tiny_mdssd.py", ["--config.train.num_stepz=5"],
     ["unknown config key config.train.num_stepz", "closest known: config.train.num_steps"]),
    ("configs/tiny_mdssd.py", ["--config.eval.every_steps=5"],
     ["unknown config key config.eval.every_steps", "config.evals.voc.every_steps"]),
    ("configs/nope.py", [], ["the config file configs/nope.py does not exist", "--config=configs/"]),
])
def test_command_line_mistake_is_one_error_line(tmp_path, config, args, fragments):
  workdir = str(tmp_path / "run")
  proc = run_main([f"--workdir={workdir}", *args], config=config)
  assert_one_clear_error(proc, *fragments)
  assert_short(proc, max_lines=2)
  assert not os.path.exists(workdir)


def test_read_only_workdir_is_one_error_line(data_dir, tmp_path):
  mount_point = str(tmp_path / "read_only")
  os.makedirs(mount_point)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", mount_point],
                    capture_output=True).returncode != 0:
    if os.geteuid() == 0:
      pytest.skip("mounting a read-only tmpfs is not permitted here")
    os.chmod(mount_point, 0o555)   # not root: a folder without write permission does the same
  try:
    workdir = os.path.join(mount_point, "run")
    proc = run_main([f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"])
    line = assert_one_clear_error(proc, f"the workdir {workdir} cannot be written", "--workdir")
    assert "Read-only file system" in line or "Permission denied" in line, line
    assert_short(proc)
  finally:
    subprocess.run(["umount", "-l", mount_point], capture_output=True)


def test_num_steps_at_the_checkpoint_step_says_complete_and_trains_nothing(data_dir, trained):
  before = sorted(os.listdir(trained)), checkpoint_steps(trained)
  proc = run_main([f"--workdir={trained}", f"--config.data.data_dir={data_dir}",
                   "--config.train.num_steps=2"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  lines = assert_short(proc)
  assert "Nothing to train: the run is already complete" in proc.stdout, lines
  assert "at step 2" in proc.stdout and "config.train.num_steps=2" in proc.stdout, lines
  assert "training" not in proc.stdout and "Done:" not in proc.stdout, lines
  assert (sorted(os.listdir(trained)), checkpoint_steps(trained)) == before


def test_run_failing_before_its_first_step_leaves_no_trace(data_dir, tmp_path):
  """A fresh workdir and a bad eval batch size, found after the model and checkpoint manager
  were built: no workdir (with its empty checkpoints/ and lock file) is left behind."""
  workdir = str(tmp_path / "fresh" / "run")
  proc = run_main([f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                   "--config.eval.batch_size=0"])
  assert_one_clear_error(proc, "config.eval.batch_size=0")
  assert_short(proc)
  assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_blow_up_stops_before_the_checkpoint_and_a_resume_at_a_sane_lr_trains(data_dir, trained,
                                                                              tmp_path):
  """lr 1e12 makes finite weights of 1e13 (a finiteness test alone would save them): the step is
  refused, the message names checkpoint 2, and the same run at the config's lr trains on."""
  workdir = copy_workdir(trained, tmp_path)
  common = [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.train.num_steps=3", "--config.train.checkpoint_every_steps=1"]
  proc = run_main(common + ["--config.train.base_lr=1e12", "--config.train.warmup_steps=0"])
  assert_one_clear_error(proc, "NonFiniteLossError", "blew up at step 3",
                         "config.train.max_param_norm_growth=2",
                         f"Last good checkpoint: step 2 in {os.path.join(workdir, 'checkpoints')}")
  assert_short(proc, max_lines=5)
  assert checkpoint_steps(workdir) == [1, 2]
  # The same run at the config's lr (in this process: its compiled step is the `trained` one's).
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(tiny_config(data_dir, **{"train.num_steps": 3,
                                                    "train.checkpoint_every_steps": 1}), workdir)
  assert checkpoint_steps(workdir)[-1] == 3
  state = restore_all(tiny_config(data_dir), workdir)[3]
  assert count_nonfinite(state["params"]) == 0 and int(state["first_nonfinite_step"]) == -1


def test_predict_on_an_empty_folder_says_folder(data_dir, trained, tmp_path):
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  proc = run_main([f"--workdir={trained}", "--mode=predict", f"--images={empty}",
                   f"--config.data.data_dir={data_dir}"])
  assert_one_clear_error(proc, f"the folder '{empty}' holds no image files")
  assert_short(proc)
