"""The paper configs are faithful by default: ImageNet weights required, Caffe SSD's recipe values.

The values checked here are the paper's and Caffe SSD's (docs/training_recipe.md,
docs/augmentation.md, docs/matching.md), written out in this test, not read from the code.
"""

import importlib

import pytest

PAPER_CONFIGS = ("mdssd300_voc", "mdssd512_voc", "mdssd300_coco", "mdssd512_coco", "mdssd512_tt100k",
                 "ssd300_voc", "ssd512_voc")


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_refuses_a_random_trunk_and_names_the_way_out(name, tmp_path):
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  config = _config(name)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  for needed in ("vgg16.tv_in1k", "vgg16-397923af.pth", "vgg16_reducedfc.pth",
                 "--config.model.init_from=", "--config.model.allow_random_trunk=True"):
    assert needed in message, needed
  assert not workdir.exists()   # refused before anything was written


def test_random_trunk_is_allowed_when_asked_or_when_weights_are_named():
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  config = _config("mdssd300_voc")
  config.model.allow_random_trunk = True
  experiment.check_trunk_init(config)
  config = _config("mdssd300_voc")
  config.model.init_from = "/weights/vgg16_reducedfc.pth"
  experiment.check_trunk_init(config)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_use_caffe_ssd_recipe(name):
  config = _config(name)
  assert config.loss.matching == "bipartite"               # MatchBBox: BIPARTITE + PER_PREDICTION
  assert config.loss.iou_threshold == 0.5
  assert config.loss.neg_pos_ratio == 3.0
  assert config.augment.crop_sampler == "caffe"            # batch_sampler, every sampler tried
  assert config.augment.crop_max_trials == 50
  assert tuple(config.augment.crop_scale_range) == (0.3, 1.0)
  assert tuple(config.augment.crop_aspect_range) == (0.5, 2.0)
  assert config.augment.hue_delta_deg == 36.0              # hue_delta 18 in OpenCV's 2-degree units
  assert config.augment.brightness_delta == 32.0
  assert config.train.bias_lr_multiplier == 2.0            # lr_mult 2, decay_mult 0 on biases
  assert not config.train.bias_weight_decay
  assert config.train.momentum == 0.9 and config.train.optimizer == "sgd"
  assert config.eval.nms_iou == 0.45 and config.eval.top_k == 200
  assert config.model.init_from == "" and not config.model.allow_random_trunk
  assert config.eval.best_metric.split("/")[0] in config.evals


@pytest.mark.parametrize("name", [n for n in PAPER_CONFIGS if n.endswith("_voc")])
def test_voc_configs_follow_the_voc07_protocol(name):
  config = _config(name)
  assert config.eval.pre_nms_top_k == 400                  # Caffe's keep_top_k before NMS
  assert config.train.base_lr == 1e-3 and config.train.global_batch_size == 32
  assert tuple(config.train.lr_decay_steps) == (80_000, 100_000) and config.train.num_steps == 120_000
  assert config.evals.voc.type == "voc" and config.evals.voc.use_07_metric   # 11-point AP
