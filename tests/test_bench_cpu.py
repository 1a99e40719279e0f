"""The CPU benchmark's torch side stands alone, and its layer list is the model's own.

benchmarks/torch_cpu.py runs under a benchmark-only Python that has torch and torchvision and
nothing of this project: every module it imports must be the standard library, NumPy, torch or
torchvision (checked on its source, since CI has no torch).
"""

import ast
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = {"argparse", "json", "time", "numpy", "torch", "torchvision"}


def test_torch_runner_imports_only_torch_torchvision_numpy_and_the_standard_library():
  path = os.path.join(ROOT, "benchmarks", "torch_cpu.py")
  tree = ast.parse(open(path).read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module.split(".")[0])
  assert imported <= ALLOWED, imported - ALLOWED
  # And it loads in a fresh interpreter where this project, JAX and ml_collections cannot import.
  blocker = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "  def find_spec(self, name, path, target=None):\n"
             "    if name.split('.')[0] in ('jax', 'ml_collections', 'mdssd_jax', 'configs', 'flax'):\n"
             "      raise ImportError('blocked: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "import runpy, numpy as np\n"
             f"m = runpy.run_path({path!r}, run_name='torch_cpu')\n"
             "b = m['random_arrays'](2, 300, 64, 20, np.random.default_rng(0))\n"
             "print(b['image'].shape, b['boxes'].shape, int((b['labels'] > 0).sum()))\n")
  out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, check=True,
                       cwd="/")
  assert out.stdout.split() == ["(2,", "300,", "300,", "3)", "(2,", "64,", "4)", "32"]


def test_random_arrays_are_valid_normalised_boxes():
  sys.path.insert(0, ROOT)
  from benchmarks import torch_cpu  # pylint: disable=g-import-not-at-top
  batch = torch_cpu.random_arrays(3, 64, 40, 6, np.random.default_rng(1))
  boxes, labels = batch["boxes"], batch["labels"]
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (3, 64, 64, 3)
  assert np.all((boxes >= 0) & (boxes <= 1))
  assert np.all(boxes[..., 2:] > boxes[..., :2])
  assert np.all(labels[:, :10] >= 1) and np.all(labels[:, :10] <= 6) and np.all(labels[:, 10:] == 0)
