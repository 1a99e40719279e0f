"""Training end to end: main.py, exact resume, crash safety, data parallelism, multi-process."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from tests import helpers


tiny_config = helpers.tiny_config


def train_losses(workdir):
  """{step: train/loss} read back from the TensorBoard event files clu wrote."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  losses = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def run_main(args, env=None, check=True, timeout=600):
  """helpers.run_main with --config among `args`, failing on a non-zero exit status by default."""
  return helpers.run_main(args, config=None, env=env, check=check, timeout=timeout)


def _data_dir_flags(data_dir):
  return [f"--config.data.data_dir={data_dir}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One prepared tiny synthetic data set shared by the tests of this module."""
  path = str(tmp_path_factory.mktemp("tfds"))
  run_main(["--config=configs/tiny_mdssd.py", "--mode=prepare"] + _data_dir_flags(path))
  return path


def test_main_trains_evaluates_and_says_where(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_main(["--config=configs/tiny_mdssd.py", f"--workdir={workdir}",
                   "--config.train.num_steps=3"] + _data_dir_flags(data_dir))
  # The closing summary says where everything is.
  assert re.search(r"^\s+checkpoints\s+\S+", proc.stdout, re.M), proc.stdout
  assert re.search(r"^\s+pictures\s+\S+", proc.stdout, re.M), proc.stdout
  results = [json.loads(l) for l in open(os.path.join(workdir, "eval_results.jsonl"))]
  assert results[-1]["step"] == 3 and 0.0 <= results[-1]["mAP"] <= 1.0
  assert glob.glob(os.path.join(workdir, "pictures", "step_00000003", "*.jpg"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
  losses = train_losses(workdir)
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))

  # --mode=eval on the latest checkpoint appends one more line for the same step.
  run_main(["--config=configs/tiny_mdssd.py", f"--workdir={workdir}", "--mode=eval"]
           + _data_dir_flags(data_dir))
  results = [json.loads(l) for l in open(os.path.join(workdir, "eval_results.jsonl"))]
  assert len(results) == 2 and results[1]["step"] == 3
  assert results[1]["mAP"] == pytest.approx(results[0]["mAP"], abs=1e-6)


def test_resume_is_exact(data_dir, tmp_path):
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 6, "data.data_dir": data_dir}), straight)
  interrupted = str(tmp_path / "interrupted")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3, "train.checkpoint_every_steps": 3,
                                          "data.data_dir": data_dir}), interrupted)
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 6, "data.data_dir": data_dir}), interrupted)
  a, b = train_losses(straight), train_losses(interrupted)
  assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    assert a[step] == b[step], (step, a[step], b[step])   # bit for bit on CPU


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    from mdssd_jax.state import checkpointing
    from mdssd_jax.run import train
    from configs import tiny_mdssd
    real_save = checkpointing.save
    def save_then_die(manager, step, *args, **kwargs):
      real_save(manager, step, *args, **kwargs)
      if step == 4:   # the second save: die while Orbax is still writing it
        os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.save = save_then_die
    config = tiny_mdssd.get_config()
    config.data.data_dir = {data_dir!r}
    config.train.num_steps = 6
    train.train_and_evaluate(config, {workdir!r})
""")


def test_kill_during_checkpoint_save_resumes_from_previous(data_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  script = KILL_DURING_SAVE.format(data_dir=data_dir, workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  from mdssd_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import train
  config = tiny_config(**{"train.num_steps": 6, "data.data_dir": data_dir})
  manager = checkpointing.make_manager(ckpt_dir, config.train)
  assert manager.latest_step() == 2   # the half-written step 4 is not a checkpoint
  manager.close()
  train.train_and_evaluate(config, workdir)
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps[-1] == 6


def test_nonfinite_loss_stops_with_step_and_keeps_last_checkpoint(data_dir, tmp_path):
  from mdssd_jax.state import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import train
  import jax  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "nan")
  config = tiny_config(**{"train.num_steps": 40, "train.checkpoint_every_steps": 1,
                          "train.log_every_steps": 1, "train.optimizer": "sgd",
                          "train.base_lr": 1e12, "train.warmup_steps": 0, "data.data_dir": data_dir,
                          # The non-finite path itself: the blow-up guard (test_reliability) would
                          # stop this run at its first step, before anything turns non-finite.
                          "train.max_param_norm_growth": 0.0})
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+") as err:
    train.train_and_evaluate(config, workdir)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), config.train)
  last = manager.latest_step()
  assert last is not None and f"step {last}" in str(err.value)
  setup = experiment.Setup(config)
  state = setup.restore(manager, last)
  leaves = jax.tree_util.tree_leaves(jax.device_get(state["params"]))
  assert all(np.isfinite(leaf).all() for leaf in leaves)
  assert int(state["first_nonfinite_step"]) == -1


def test_checkpoint_of_another_model_is_refused(data_dir, tmp_path):
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "other")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 2, "data.data_dir": data_dir}), workdir)
  wider = tiny_config(**{"train.num_steps": 4, "data.data_dir": data_dir,
                         "model.width_multiplier": 1 / 8})
  with pytest.raises(ValueError, match="belongs to another model(.|\n)*width_multiplier"):
    train.train_and_evaluate(wider, workdir)


DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    mode, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode == "two_processes":
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2,
                                 process_id=pid)
    from mdssd_jax.state import experiment
    from mdssd_jax.core import multihost
    from mdssd_jax.run import train
    from mdssd_jax.data import pipeline
    from configs import tiny_mdssd
    config = tiny_mdssd.get_config()
    config.data.data_dir = {data_dir!r}
    # SGD: the update is linear in the gradient, so the second loss checks the gradients too (Adam's
    # first update, about lr * sign(gradient), turns float noise in near-zero gradients into lr-sized
    # steps).
    config.train.optimizer = "sgd"
    setup = experiment.Setup(config)
    state = setup.initial_state()
    step = jax.jit(train.make_train_step(setup.model, setup.tx, setup.schedule, setup.anchors, config,
                                         setup.convention))
    if mode == "two_processes":   # each process reads its own shard of every global batch
      its = [pipeline.make_train_iterator(config, process_index=pid, process_count=2)]
    else:                         # one process reads both shards and stacks them, process 0's first
      its = [pipeline.make_train_iterator(config, process_index=p, process_count=2) for p in (0, 1)]
    losses = []
    for _ in range(2):
      parts = [next(it) for it in its]
      batch = {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}
      batch = setup.global_batch(batch)
      if not losses:   # as train.py: compile, then meet, so the collectives start together
        step = step.lower(state, batch).compile()
        multihost.barrier("compiled")
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    print(json.dumps(dict(processes=jax.process_count(), devices=jax.device_count(), losses=losses)))
""")


def test_one_process_and_two_data_parallel_processes_give_the_same_loss(data_dir, tmp_path):
  """The same global batch gives the same loss on one device and split over two processes.

  Two processes with one CPU device each (jax.distributed on 127.0.0.1): the batch is sharded on
  "data", batch norm and the loss reduce over the global batch through cross-process collectives,
  and each process reads its own shard. (Simulated devices in one process,
  --xla_force_host_platform_device_count, are not used: XLA:CPU's in-process collectives can
  starve its thread pool on a 2-core machine and abort after 40 s, whatever the program.)
  """
  script = DATA_PARALLEL.format(data_dir=data_dir)
  single = subprocess.run([sys.executable, "-c", script, "single", "0", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  outs = _run_processes([[sys.executable, "-c", script, "two_processes", str(port), str(pid)]
                         for pid in range(2)], tmp_path)
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  one = json.loads(single.stdout.strip().splitlines()[-1])
  two = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
  assert (one["processes"], one["devices"]) == (1, 1)
  assert [(r["processes"], r["devices"]) for r in two] == [(2, 2), (2, 2)]
  assert two[0]["losses"] == two[1]["losses"]          # every process sees the global loss
  # The first loss is the same function of the same weights and batch: equal to float noise.
  np.testing.assert_allclose(one["losses"][0], two[0]["losses"][0], rtol=1e-5)
  # The second checks the averaged gradient through the loss it brought down. Not to float noise:
  # hard-negative mining ranks negatives by their loss, and noise-level differences can swap two
  # near-equal negatives at the cut, which leaves the loss unchanged but moves the gradient
  # (measured: the decreases differ by 1.6%). A gradient summed instead of averaged over the two
  # devices doubles the SGD step, and with it, to first order, the decrease.
  decreases = [r["losses"][0] - r["losses"][1] for r in (one, two[0])]
  assert min(decreases) > 0, decreases
  np.testing.assert_allclose(decreases[0], decreases[1], rtol=0.1)


def _run_processes(cmds, tmp_path, timeout=600, env=None):
  """[(returncode, stdout, stderr)] of commands run at once (the processes of one distributed job).

  Their output goes to files, not pipes: a process blocked on a full pipe, while the test reads
  another's, would miss the job's shutdown barrier and take the others down with it.
  """
  procs, logs = [], []
  for i, cmd in enumerate(cmds):
    logs.append((tmp_path / f"process{i}.out", tmp_path / f"process{i}.err"))
    with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env))
  deadline = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(1, deadline - time.time()))
  return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together(data_dir, tmp_path):
  """Two processes train one run, its evaluation results written once (by process 0); the default
  console shows the project's lines only, not Gloo's greeting of its peers (the preemption lines
  of JAX and Orbax are tested in test_console.py, without a run)."""
  port = _free_port()
  workdir = str(tmp_path / "multi")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}   # the real console
  outs = _run_processes([[sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/tiny_mdssd.py",
                          f"--workdir={workdir}", "--config.train.num_steps=3",
                          f"--config.data.data_dir={data_dir}", "--multihost",
                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={pid}"] for pid in range(2)], tmp_path, env=env)
  for code, _, err in outs:
    assert code == 0, err[-4000:]
  # The run's own lines (logging INFO included) go to stdout, the console's one channel.
  assert "process 0 of 2" in outs[0][1] and "process 1 of 2" in outs[1][1]
  results = [json.loads(l) for l in open(os.path.join(workdir, "eval_results.jsonl"))]
  assert len(results) == 1 and results[0]["step"] == 3   # written once, by process 0
  assert sorted(train_losses(workdir)) == [1, 2, 3]
  for _, out, err in outs:
    noise = [l for l in (out + err).splitlines() if "[Gloo]" in l or _library_log_line(l)]
    assert not noise, "\n".join(noise)


_PROJECT_FILES = {f for _, _, files in os.walk(os.path.join(ROOT, "mdssd_jax")) for f in files} | {
    "main.py"}


def _library_log_line(line):
  """A log line with absl's prefix from a file outside this project (a library's)."""
  match = re.match(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+?):\d+\]", line)
  return bool(match) and match.group(1) not in _PROJECT_FILES


def test_sigterm_saves_a_checkpoint_and_stops(data_dir, tmp_path):
  """A preemption notice (SIGTERM) makes the run save at the current step and exit cleanly."""
  workdir = str(tmp_path / "preempted")
  log_path = tmp_path / "log.txt"
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/tiny_mdssd.py",
         f"--workdir={workdir}", "--config.train.num_steps=100000",
         "--config.train.checkpoint_every_steps=100000", f"--config.data.data_dir={data_dir}"]
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not re.search(r"step\s+\d+/", log_path.read_text()):   # training has started
      assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
  text = log_path.read_text()
  assert code == 0, text[-3000:]
  stopped = int(re.search(r"stopped at step (\d+) for preemption", text).group(1))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [stopped] and 1 <= stopped < 100000


def test_tiled_prediction_equals_whole_image_when_one_tile_covers_the_image(data_dir):
  """The tiled eval path (TT100K configs) on images of exactly the input size: one tile, no seams,
  so it must find the boxes and scores of the whole-image path (its NMS across tiles is then a no-op)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.inference import predictor as predict
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"data.data_dir": data_dir, "eval.tiled.enabled": True})
  setup = experiment.Setup(config)
  state = setup.initial_state()
  variables = experiment.model_variables(state)
  batch = next(iter(pipeline.make_eval_batches(config, with_original_images=True)))
  assert batch["original_image"][0].shape == batch["image"][0].shape   # 96 px images, 96 px input
  whole = jax.device_get(jax.jit(predict.make_predict_fn(
      setup.model, setup.anchors, config, setup.convention))(variables, batch["image"]))
  predictor = predict.LocalPredictor(setup.model, setup.anchors, config, setup.convention)
  tiled = predict.tiled_batch_detect(predictor.set_variables(variables), batch["original_image"],
                                     config)
  for i in range(len(batch["image"])):
    # The ten best whole-image boxes that lie inside the image (tiling clips boxes to the image).
    inside = np.all((whole["boxes"][i] >= 0) & (whole["boxes"][i] <= 1), axis=-1)
    w = np.flatnonzero(whole["valid"][i] & inside)[:10]
    t = np.flatnonzero(tiled["valid"][i])
    for j in w:
      same = (tiled["classes"][i, t] == whole["classes"][i, j]) & np.all(
          np.abs(tiled["boxes"][i, t] - whole["boxes"][i, j]) < 1e-4, axis=-1)
      assert same.any(), (i, j)
      np.testing.assert_allclose(tiled["scores"][i, t][same][0], whole["scores"][i, j], rtol=1e-4)
