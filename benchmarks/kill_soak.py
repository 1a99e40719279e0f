"""Kill -9 soak: training killed at random moments (mid-save included) resumes bit for bit.

Each trial trains the tiny config (configs/tiny_mdssd.py) for --steps steps with a checkpoint after
every step (so most kills land while Orbax is writing one), in a `main.py` subprocess that gets
SIGKILL after a random delay; the same command is rerun until the run completes (at most --kills
kills per trial, then it is left to finish). The final checkpoint's parameters and optimiser state
are then compared, leaf by leaf and bit for bit, with those of one uninterrupted run.

    python -m benchmarks.kill_soak --trials=10 --steps=6          # prints a table
    python -m benchmarks.kill_soak --trials=3 --json=/tmp/soak.json

The random delays are drawn between half the time the uninterrupted run took to reach its first
checkpoint and the whole time it took, so some kills land in start-up, most in training, and many
while a save is under way ("mid-save": a temporary checkpoint folder existed at the moment of the
kill). tests/test_reliability.py runs a short form (3 trials).
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/tiny_mdssd.py"


def _train_command(workdir, data_dir, steps):
  return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={steps}",
          "--config.train.checkpoint_every_steps=1", "--config.train.keep_checkpoints=2"]


def _saving_now(workdir):
  """Whether Orbax is writing a checkpoint (a temporary step folder exists)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any("tmp" in name for name in os.listdir(ckpt))


def _first_checkpoint_seen(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and bool(os.listdir(ckpt))


def run_uninterrupted(workdir, data_dir, steps, log):
  """Trains to the end without a kill; returns (seconds to the first checkpoint activity, total)."""
  start = time.time()
  first = None
  with open(log, "w") as out:
    proc = subprocess.Popen(_train_command(workdir, data_dir, steps), cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT)
    while proc.poll() is None:
      if first is None and _first_checkpoint_seen(workdir):
        first = time.time() - start
      time.sleep(0.05)
  total = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"the uninterrupted run failed ({proc.returncode}); see {log}")
  return (first if first is not None else total / 2), total


def run_trial(workdir, data_dir, steps, delay_range_s, max_kills, rng, log):
  """Kills and reruns until the run completes; returns {"kills", "mid_save", "runs"}."""
  kills = mid_save = runs = 0
  while True:
    runs += 1
    with open(log, "a") as out:
      out.write(f"\n===== run {runs} =====\n")
      out.flush()
      proc = subprocess.Popen(_train_command(workdir, data_dir, steps), cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT)
      deadline = time.time() + rng.uniform(*delay_range_s) if kills < max_kills else None
      while proc.poll() is None:
        if deadline is not None and time.time() >= deadline:
          saving = _saving_now(workdir)
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          kills += 1
          mid_save += int(saving)
          break
        time.sleep(0.02)
    if proc.returncode == 0:
      return dict(kills=kills, mid_save=mid_save, runs=runs)
    if proc.returncode != -signal.SIGKILL:
      raise RuntimeError(f"a resumed run failed ({proc.returncode}); see {log}")


def final_leaves(workdir, data_dir, steps):
  """{path: numpy array} of params and opt_state in the latest checkpoint of workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import tiny_mdssd  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  config = tiny_mdssd.get_config()
  config.data.data_dir = data_dir
  config.train.num_steps = steps
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), config.train,
                                       create=False)
  try:
    step = manager.latest_step()
    state = experiment.Setup(config).restore(manager, step)
  finally:
    manager.close()
  out = {"step": jax.device_get(state["step"])}
  for part in ("params", "opt_state", "batch_stats"):
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state[part]))
    out.update({f"{part}{jax.tree_util.keystr(path)}": leaf for path, leaf in flat})
  return out


def bit_exact(a, b):
  """(equal, number of leaves that differ): same keys, dtypes, shapes and bytes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if set(a) != set(b):
    return False, len(set(a) ^ set(b))
  differ = 0
  for key in a:
    x, y = np.asarray(a[key]), np.asarray(b[key])
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      differ += 1
  return differ == 0, differ


def prepare_data(data_dir):
  subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), f"--config={CONFIG}", "--mode=prepare",
                  f"--config.data.data_dir={data_dir}"], cwd=ROOT, check=True, capture_output=True)


def soak(trials, steps, max_kills, seed, data_dir=None, scratch=None):
  """Runs the soak; returns a dict with one row per trial and the totals."""
  scratch = scratch or tempfile.mkdtemp(prefix="kill_soak_")
  os.makedirs(scratch, exist_ok=True)
  if data_dir is None:
    data_dir = os.path.join(scratch, "tfds")
    prepare_data(data_dir)
  rng = random.Random(seed)
  reference_dir = os.path.join(scratch, "uninterrupted")
  shutil.rmtree(reference_dir, ignore_errors=True)
  first_s, total_s = run_uninterrupted(reference_dir, data_dir, steps,
                                       os.path.join(scratch, "uninterrupted.log"))
  reference = final_leaves(reference_dir, data_dir, steps)
  delay_range_s = (0.5 * first_s, total_s)
  rows = []
  for trial in range(trials):
    workdir = os.path.join(scratch, f"trial_{trial}")
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.time()
    row = run_trial(workdir, data_dir, steps, delay_range_s, max_kills, rng,
                    os.path.join(scratch, f"trial_{trial}.log"))
    same, differ = bit_exact(reference, final_leaves(workdir, data_dir, steps))
    row.update(trial=trial, bit_exact=same, leaves_differing=differ, wall_s=time.time() - start)
    rows.append(row)
  return dict(trials=trials, steps=steps, leaves=len(reference), delay_range_s=delay_range_s,
              uninterrupted_s=total_s, rows=rows, bit_exact=sum(r["bit_exact"] for r in rows),
              kills=sum(r["kills"] for r in rows), mid_save=sum(r["mid_save"] for r in rows),
              scratch=scratch)


def table(result):
  lines = [f"kill -9 soak: {result['trials']} trial(s) of {result['steps']} steps (tiny config, a "
           f"checkpoint every step); kill delays {result['delay_range_s'][0]:.1f}-"
           f"{result['delay_range_s'][1]:.1f} s after start; {result['leaves']} leaves compared",
           "| trial | kills | of them mid-save | runs | bit-exact | leaves differing | wall s |",
           "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['trial']} | {r['kills']} | {r['mid_save']} | {r['runs']} | "
                 f"{'yes' if r['bit_exact'] else 'NO'} | {r['leaves_differing']} | {r['wall_s']:.0f} |")
  lines.append(f"| all | {result['kills']} | {result['mid_save']} | | {result['bit_exact']} of "
               f"{result['trials']} | | |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--steps", type=int, default=6, help="training steps per run")
  parser.add_argument("--kills", type=int, default=2, help="at most this many kills per trial")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=None, help="a prepared tiny data set (default: prepare one)")
  parser.add_argument("--scratch", default=None, help="where the workdirs go (default: a temp dir)")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args()
  result = soak(args.trials, args.steps, args.kills, args.seed, data_dir=args.data_dir,
                scratch=args.scratch)
  print(table(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  sys.exit(0 if result["bit_exact"] == result["trials"] else 1)


if __name__ == "__main__":
  main()
