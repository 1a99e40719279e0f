"""A 2-process job that loses a process loses nothing (issue 36): preemption notices reaching one
process, a process killed while a checkpoint is written, a process stopped at a collective, and a
short random-kill soak; every restart compared bit for bit with one uninterrupted 2-process run.

The processes are `main.py --multihost` on 127.0.0.1 with CPU devices, as tests/test_train.py starts
them. A job is costly on 2 cores (two interpreters compiling), so the module shares one prepared data
set and one uninterrupted reference run (`reference`, a checkpoint at every step), and the tests
chain what they can: the preemption test's resume also stops a process below the timeout, the
mid-save kill's workdir is then soaked. docs/training.md, "What a pod survives", lists what each
test proves.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers
from tests.conftest import ROOT

# The reference run's length; every interrupted job is compared with it at a step <= STEPS.
STEPS = 5
# config.train.collective_timeout_s of the fault tests: long enough for a loaded 2-core machine not
# to take a slow process for a dead one, short enough for a test.
TIMEOUT_S = 20
TIMEOUT_FLAG = f"--config.train.collective_timeout_s={TIMEOUT_S}"
# How long a job may take, start-up and compile included, on a loaded machine (generous: a job that
# hangs is what these tests look for, and this limit ends it).
JOB_LIMIT_S = 600


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """The two processes of one `main.py --multihost` job; their output goes to files (a process
  blocked on a full pipe would miss the others' barriers)."""

  def __init__(self, tmp_path, name, workdir, data_dir, *flags):
    port = _free_port()
    self.logs = [tmp_path / f"{name}.process{i}.log" for i in range(2)]
    self.procs = []
    for pid, log in enumerate(self.logs):
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/tiny_mdssd.py",
             f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
             "--config.train.keep_checkpoints=100", "--multihost",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={pid}"] + list(flags),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))

  def text(self, pid):
    return self.logs[pid].read_text()

  def step(self):
    """The last step process 0's progress lines show (0 before the first)."""
    steps = re.findall(r"^step\s+(\d+)/", self.text(0), re.M)
    return int(steps[-1]) if steps else 0

  def wait_until(self, condition, what):
    deadline = time.time() + JOB_LIMIT_S
    while not condition():
      if any(p.poll() is not None for p in self.procs) or time.time() > deadline:
        self.kill()
        raise AssertionError(f"the job ended or hung before {what}:\n{self.text(0)[-3000:]}\n"
                             f"{self.text(1)[-3000:]}")
      time.sleep(0.02)

  def signal(self, pid, signum):
    self.procs[pid].send_signal(signum)

  def wait(self, pids=(0, 1), limit_s=JOB_LIMIT_S):
    """The exit statuses of `pids`, waiting at most limit_s (then everything is killed and the test
    fails)."""
    deadline = time.time() + limit_s
    try:
      return [self.procs[p].wait(timeout=max(1, deadline - time.time())) for p in pids]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"still running after {limit_s} s:\n{self.text(0)[-3000:]}\n"
                           f"{self.text(1)[-3000:]}") from None

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


def complete_steps(workdir):
  from mdssd_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  return checkpointing.available_steps(os.path.join(workdir, "checkpoints"))


def tmp_folders(workdir):
  from mdssd_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  return checkpointing.leftover_tmp_folders(os.path.join(workdir, "checkpoints"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  helpers.run_main(["--mode=prepare", f"--config.data.data_dir={path}"], check=True)
  return path


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 2-process run of STEPS steps with a checkpoint at every step, all kept."""
  tmp_path = tmp_path_factory.mktemp("reference")
  workdir = str(tmp_path / "run")
  job = Job(tmp_path, "reference", workdir, data_dir, f"--config.train.num_steps={STEPS}",
            "--config.train.checkpoint_every_steps=1")
  assert job.wait() == [0, 0], job.text(0)[-3000:] + job.text(1)[-3000:]
  assert complete_steps(workdir) == list(range(1, STEPS + 1))
  return workdir


class Checkpoints:
  """Restores checkpoints of the tiny config in this process, for bit-exact comparisons."""

  def __init__(self, data_dir):
    from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
    self.setup = experiment.Setup(helpers.tiny_config(data_dir))

  def state(self, workdir, step):
    from mdssd_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    manager = checkpointing.make_reader(os.path.join(workdir, "checkpoints"))
    try:
      return jax.device_get(self.setup.restore(manager, step))
    finally:
      manager.close()

  def assert_same(self, workdir, reference, step):
    """Parameters, batch statistics, optimiser state, step, RNG and every process's data-iterator
    position of checkpoint `step` equal the reference run's, bit for bit."""
    import jax  # pylint: disable=g-import-not-at-top
    got, want = self.state(workdir, step), self.state(reference, step)
    paths_got = jax.tree_util.tree_leaves_with_path(got)
    paths_want = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in paths_got] == [p for p, _ in paths_want]
    differ = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(paths_got, paths_want)
              if not np.array_equal(np.asarray(a), np.asarray(b))]
    assert not differ, f"step {step}: {len(differ)} of {len(paths_got)} leaves differ: {differ[:5]}"
    for pid in range(2):
      name = f"process_{pid}-of-2.json"
      iterators = [json.load(open(os.path.join(w, "checkpoints", str(step), "data_iter", name)))
                   for w in (workdir, reference)]
      assert iterators[0] == iterators[1], (pid, iterators)


@pytest.fixture(scope="module")
def checkpoints(data_dir):
  return Checkpoints(data_dir)


def test_sigterm_to_one_process_saves_one_step_everywhere_and_resumes_bit_exact(
    data_dir, reference, checkpoints, tmp_path):
  """SIGTERM to process 1 only: JAX's preemption sync point (CheckpointManager.reached_preemption)
  makes both processes save the same step and exit 0; the resumed job, whose process 1 is stopped
  (SIGSTOP) for a quarter of the timeout on the way, ends bit for bit where the reference ends."""
  workdir = str(tmp_path / "run")
  job = Job(tmp_path, "preempted", workdir, data_dir, "--config.train.num_steps=1000",
            "--config.train.checkpoint_every_steps=1000", TIMEOUT_FLAG)
  job.wait_until(lambda: job.step() >= 1, "its first step")
  job.signal(1, signal.SIGTERM)
  assert job.wait() == [0, 0], job.text(0)[-3000:] + job.text(1)[-3000:]
  stopped = [re.findall(r"stopped at step (\d+) for preemption", job.text(pid)) for pid in range(2)]
  assert stopped[0] and stopped[0] == stopped[1], stopped
  step = int(stopped[0][0])
  assert complete_steps(workdir) == [step] and not tmp_folders(workdir)
  assert step < STEPS, f"preempted at step {step}, past the reference's {STEPS} steps"
  checkpoints.assert_same(workdir, reference, step)

  # The same command (at the reference's length) resumes; a stop below the timeout only delays it.
  job = Job(tmp_path, "resumed", workdir, data_dir, f"--config.train.num_steps={STEPS}",
            "--config.train.checkpoint_every_steps=1000", TIMEOUT_FLAG)
  job.wait_until(lambda: job.step() > step, "its first resumed step")
  job.signal(1, signal.SIGSTOP)
  time.sleep(TIMEOUT_S / 4)
  job.signal(1, signal.SIGCONT)
  assert job.wait() == [0, 0], job.text(0)[-3000:] + job.text(1)[-3000:]
  assert "stopped answering" not in job.text(0) + job.text(1)
  assert complete_steps(workdir)[-1] == STEPS
  checkpoints.assert_same(workdir, reference, STEPS)


def test_process_stopped_past_the_timeout_ends_the_job_naming_it_and_the_key(data_dir, tmp_path):
  """SIGSTOP of process 1 for longer than config.train.collective_timeout_s: process 0 exits (status
  1) within about the timeout with one error naming process 1 and the key."""
  job = Job(tmp_path, "stalled", str(tmp_path / "run"), data_dir, "--config.train.num_steps=1000",
            "--config.train.checkpoint_every_steps=1000", TIMEOUT_FLAG)
  try:
    job.wait_until(lambda: job.step() >= 2, "its second step")
    job.signal(1, signal.SIGSTOP)
    stopped_at = time.time()
    assert job.wait(pids=(0,), limit_s=TIMEOUT_S + 90) == [1], job.text(0)[-3000:]
    waited_s = time.time() - stopped_at
  finally:
    job.kill()
  errors = [l for l in job.text(0).splitlines() if l.startswith("Error:")]
  assert len(errors) == 1, job.text(0)[-3000:]
  assert "process 1 of 2 stopped answering" in errors[0]
  assert f"config.train.collective_timeout_s={TIMEOUT_S}" in errors[0]
  assert TIMEOUT_S <= waited_s < TIMEOUT_S + 90, waited_s


def test_kill_of_one_process_mid_save_then_random_kill_soak_resume_bit_exact(
    data_dir, reference, checkpoints, tmp_path):
  """kill -9 of process 1 while a checkpoint is written: process 0 exits with one error naming
  process 1, the interrupted save is never restored, and the next start removes its temporary
  folder and says so. Then the soak: the resumed job killed (both processes, kill -9) at a random
  moment, resumed again, and ending bit for bit where the reference ends."""
  workdir = str(tmp_path / "run")
  flags = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every_steps=1",
           TIMEOUT_FLAG]
  job = Job(tmp_path, "killed", workdir, data_dir, *flags)
  job.wait_until(lambda: job.step() >= 2 and tmp_folders(workdir), "a save after step 2")
  job.signal(1, signal.SIGKILL)
  leftovers = tmp_folders(workdir)
  assert job.wait(pids=(0,), limit_s=TIMEOUT_S + 90) == [1], job.text(0)[-3000:]
  job.kill()
  errors = [l for l in job.text(0).splitlines() if l.startswith("Error:")]
  assert len(errors) == 1 and "process 1 of 2 stopped answering" in errors[0], job.text(0)[-3000:]
  complete = complete_steps(workdir)
  interrupted = [int(name.split(".")[0]) for name in tmp_folders(workdir)]
  # A save that a process did not finish is not a checkpoint (unless its commit had just ended).
  assert not set(interrupted) & set(complete), (interrupted, complete)
  assert leftovers, "the kill did not land while a save was under way"

  # The soak: resume, kill both at a random moment (often mid-save: a save per step), resume again.
  rng = random.Random(36)
  job = Job(tmp_path, "soaked", workdir, data_dir, *flags)
  if interrupted:
    job.wait_until(lambda: "incomplete checkpoint folder" in job.text(0), "the leftovers' warning")
  start = complete[-1] if complete else 0
  job.wait_until(lambda: job.step() > start, "its first resumed step")
  time.sleep(rng.uniform(0, 2))
  for pid in range(2):
    job.signal(pid, signal.SIGKILL)
  job.wait()
  job = Job(tmp_path, "finished", workdir, data_dir, *flags)
  assert job.wait() == [0, 0], job.text(0)[-3000:] + job.text(1)[-3000:]
  assert not tmp_folders(workdir)
  for step in complete_steps(workdir):
    checkpoints.assert_same(workdir, reference, step)
  assert complete_steps(workdir)[-1] == STEPS
