"""Helpers shared by the tests: the tiny config with dotted overrides, the main.py runner, random
ground-truth batches, the kernel variants, and a look at a process's children through Linux's /proc.

    from tests import helpers
    config = helpers.tiny_config(data_dir, **{"train.num_steps": 3, "model.kernels": "cpu"})
"""

import os
import subprocess
import sys
import time
from typing import Iterable, List, Mapping, Optional, Sequence

import numpy as np

from configs import tiny_mdssd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every config.model.kernels choice that computes the model (models/kernels.py); "portable" is the
# lowering-only form for accelerators' export and is tested in test_lowering.py.
KERNEL_VARIANTS = ("cpu", "native", "auto")


def tiny_config(data_dir: Optional[str] = None, **overrides):
  """configs/tiny_mdssd.py with `data_dir` (None: the config's) and dotted overrides, e.g.
  **{"train.num_steps": 3, "eval.tiled.enabled": True}; a key the config lacks raises (KeyError)."""
  config = tiny_mdssd.get_config()
  if data_dir is not None:
    config.data.data_dir = str(data_dir)
  flat = dict(overrides)
  for key in flat:
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        raise KeyError(f"tiny_config: no config key {key!r}")
      node = node[part]
  config.update_from_flattened_dict(flat)
  return config


def run_main(args: Sequence[str], config: Optional[str] = "configs/tiny_mdssd.py",
             env: Optional[Mapping[str, str]] = None, real_console: bool = False,
             check: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
  """`python main.py --config=CONFIG ARGS...` in the repository root, as a user runs it; the one
  main.py runner of the tests. Returns the CompletedProcess (text stdout and stderr).

  config: None when `args` hold --config themselves. env: the environment (default: this one's).
  real_console: without the TF_CPP_MIN_LOG_LEVEL that conftest.py sets, so that the libraries' C++
  log lines reach the console as they would a user's. check: raise AssertionError, with the output,
  unless the exit status is 0.
  """
  env = dict(os.environ if env is None else env)
  if real_console:
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  cmd = [sys.executable, os.path.join(ROOT, "main.py")] + ([f"--config={config}"] if config else [])
  cmd += list(args)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr[-6000:]}")
  return proc


def random_gt_batch(rng: np.random.Generator, batch: int = 4, num_gt: int = 6, num_classes: int = 5,
                    max_corner: float = 0.85, size_range=(0.03, 0.6)):
  """Ground truth as the pipeline pads it: boxes (batch, num_gt, 4) float32 xyxy in [0, 1] and labels
  (batch, num_gt) int in 1..num_classes, each image with 1..num_gt real boxes first and label-0
  padding after them (the padded rows keep random boxes: code must ignore them by label)."""
  xy = rng.uniform(0, max_corner, (batch, num_gt, 2))
  wh = rng.uniform(size_range[0], size_range[1], (batch, num_gt, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], -1).astype(np.float32)
  labels = rng.integers(1, num_classes + 1, (batch, num_gt))
  for b in range(batch):
    labels[b, rng.integers(1, num_gt + 1):] = 0
  return boxes, labels


# ---- processes (Linux /proc) ----------------------------------------------------------------------

def child_pids(pid: int) -> List[int]:
  """Pids of the direct children of `pid`, from every thread's /proc/<pid>/task/<tid>/children."""
  found = []
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      found += [int(p) for p in f.read().split()]
  return found


def running(pid: int) -> bool:
  """True while `pid` exists and is not a zombie (dead, not reaped yet)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def wait_gone(pids: Iterable[int], timeout_s: float) -> bool:
  """Waits up to `timeout_s` for every pid to end; True when they all have."""
  pids = list(pids)
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if not any(running(p) for p in pids):
      return True
    time.sleep(0.1)
  return not any(running(p) for p in pids)
