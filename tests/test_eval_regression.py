"""`--mode=eval` gives the numbers it gave before the evaluation code was restructured.

tests/data/eval_regression_variables.npz holds the variables of a tiny SSD (the tiny config with
plain SSD heads, batch norm) trained 400 steps with the code of commit 627e938, the last one before
evaluation moved into per-entry evaluators; EXPECTED_METRICS are what that code's `--mode=eval`
printed for it on the tiny synthetic test split. The test writes those variables as a checkpoint with
today's code and evaluates it through `main.py --mode=eval`: the numbers must not move.
"""

import json
import os

import numpy as np
import pytest

from tests.test_train import run_main

VARIABLES = os.path.join(os.path.dirname(__file__), "data", "eval_regression_variables.npz")
# VOC area AP on the 8 test images, from the 627e938 code's --mode=eval.
EXPECTED_METRICS = {"mAP": 0.0030340861870547333, "AP/circle": 0.0, "AP/square": 0.0,
                    "AP/triangle": 0.0008090614886731391, "AP/plus": 0.008928571428571428,
                    "AP/ring": 0.008466884205083833, "AP/diamond": 0.0}

# The regression model: tiny_mdssd with SSD heads, as a config file main.py can load.
CONFIG_SOURCE = '''
from configs import tiny_mdssd

def get_config():
  c = tiny_mdssd.get_config()
  c.model.architecture = "ssd"
  c.model.fusions = ()
  c.model.head_sources = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2")
  c.anchors.feature_sizes = (12, 6, 3, 2, 1)
  c.anchors.steps = (8, 16, 32, 48, 96)
  c.anchors.min_sizes = (12, 24, 40, 56, 72)
  c.anchors.max_sizes = (24, 40, 56, 72, 96)
  c.anchors.aspect_ratios = ((2,), (2, 3), (2, 3), (2,), (2,))
  # The evaluation settings of the reference run, pinned against later default changes.
  c.eval.score_threshold = 0.01
  c.eval.nms_iou = 0.45
  c.eval.pre_nms_top_k = 200
  c.eval.top_k = 200
  c.eval.batch_size = 4
  return c
'''


def _unflatten(flat, prefix):
  tree = {}
  for key, value in flat.items():
    if not key.startswith(prefix + "/"):
      continue
    node = tree
    *parents, leaf = key[len(prefix) + 1:].split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def test_mode_eval_reproduces_the_metrics_of_the_previous_code(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  config_path = tmp_path / "tiny_ssd_regression.py"
  config_path.write_text(CONFIG_SOURCE)
  data_dir = str(tmp_path / "tfds")
  workdir = str(tmp_path / "run")
  flags = [f"--config={config_path}", f"--config.data.data_dir={data_dir}"]
  run_main(flags + ["--mode=prepare"])

  # The reference variables as a checkpoint of today's code (step 400, as in the reference run).
  namespace = {}
  exec(compile(CONFIG_SOURCE, str(config_path), "exec"), namespace)  # pylint: disable=exec-used
  config = namespace["get_config"]()
  config.data.data_dir = data_dir
  setup = experiment.Setup(config)
  state = setup.initial_state()
  flat = dict(np.load(VARIABLES))
  for section in ("params", "batch_stats"):
    saved = _unflatten(flat, section)
    assert jax.tree_util.tree_structure(saved) == jax.tree_util.tree_structure(
        jax.device_get(state[section])), f"the model's {section} no longer match the reference's"
    state[section] = jax.device_put(saved, setup.replicated)
  state["step"] = jax.device_put(np.int32(400), setup.replicated)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), config.train)
  checkpointing.save(manager, 400, state, None, setup.meta(state))
  manager.wait_until_finished()
  manager.close()

  run_main(flags + [f"--workdir={workdir}", "--mode=eval"])
  lines = [json.loads(line) for line in open(os.path.join(workdir, "eval_results.jsonl"))]
  assert len(lines) == 1 and lines[0]["step"] == 400 and lines[0]["evaluator"] == "voc"
  for key, value in EXPECTED_METRICS.items():
    assert lines[0][key] == pytest.approx(value, abs=1e-6), key
