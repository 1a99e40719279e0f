"""The package's layers (pyproject.toml's import-linter contracts) hold: `lint-imports` passes.

core < models | data | metrics < state | inference | report < evaluation < run < cli < main.py; no
cycles; the pure layers import no TFDS, Grain or console; prediction and export never import the
training input pipeline or the optimiser. docs/architecture.md describes each layer.
"""

import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT


def _lint_imports():
  exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
  return subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_contracts_hold():
  proc = _lint_imports()
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "BROKEN" not in proc.stdout
  assert proc.stdout.count("KEPT") >= 4, proc.stdout


def test_a_climb_up_the_layers_is_caught(tmp_path):
  """The contracts are not vacuous: a core module importing from run/ breaks them."""
  probe = os.path.join(ROOT, "mdssd_jax", "core", "_layer_probe.py")
  with open(probe, "w") as f:
    f.write("from mdssd_jax.run import train  # deliberately up the layers\n")
  try:
    proc = _lint_imports()
  finally:
    os.remove(probe)
  assert proc.returncode != 0 and "mdssd_jax.core._layer_probe -> mdssd_jax.run.train" in proc.stdout
