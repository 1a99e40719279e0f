"""The checkpoint fingerprint: derived from config.model and config.anchors, refuses what changes the
meaning of the parameters, accepts what does not. The fingerprint goes through a JSON round trip, as
it does in a checkpoint's `meta` item."""

import json

import jax
import pytest

from configs import mdssd300_voc, tiny_mdssd
from mdssd_jax.state import checkpointing
from mdssd_jax import models


def _fingerprint(config, **meaning):
  model, anchors = models.build_detector(config)
  variables, _, _ = models.abstract_forward(model, config.model.input_size_px)
  fp = checkpointing.model_fingerprint(config, len(anchors), variables["params"], **meaning)
  return json.loads(json.dumps(fp))   # as stored in the checkpoint's meta


def _refusal(saved, current):
  with pytest.raises(ValueError) as info:
    checkpointing.check_fingerprint(saved, current, "/tmp/workdir/checkpoints")
  return str(info.value)


def test_other_default_box_sizes_are_refused_by_name():
  c = tiny_mdssd.get_config()
  saved = _fingerprint(c)
  c.anchors.min_sizes = tuple(s + 1 for s in c.anchors.min_sizes)   # same count of boxes
  current = _fingerprint(c)
  assert current["num_default_boxes"] == saved["num_default_boxes"]
  message = _refusal(saved, current)
  assert "anchors.min_sizes" in message and "/tmp/workdir/checkpoints" in message
  assert message.count("\n  ") == 1    # the only difference named


@pytest.mark.parametrize("key,value", [("variances", (0.1, 0.1)), ("clip", True),
                                       ("steps", (4, 8, 16, 32, 48, 97))])
def test_every_anchor_field_counts(key, value):
  c = tiny_mdssd.get_config()
  saved = _fingerprint(c)
  c.anchors[key] = value
  assert f"anchors.{key}" in _refusal(saved, _fingerprint(c))


@pytest.mark.parametrize("key,value", [("dtype", "bfloat16"), ("kernels", "native"),
                                       ("remat", "blocks"), ("fusion_deconv_init", "bilinear"),
                                       ("init_from", "/weights/vgg16.safetensors"),
                                       ("fusion_l2norm_init_scale", 10.0)])
def test_settings_that_keep_the_meaning_are_accepted(key, value):
  c = tiny_mdssd.get_config()
  saved = _fingerprint(c)
  c.model[key] = value
  checkpointing.check_fingerprint(saved, _fingerprint(c), "/tmp/workdir")


@pytest.mark.parametrize("key,value,also", [
    ("batch_norm", False, "param_shapes_sha256"),
    ("fusion_deconv_channels", (16, 8, 8), "param_shapes_sha256"),
    ("num_classes", 7, "num_default_boxes"),   # logits widen; the box count stays
])
def test_model_changes_are_refused_by_name(key, value, also):
  c = tiny_mdssd.get_config()
  saved = _fingerprint(c)
  c.model[key] = value
  message = _refusal(saved, _fingerprint(c))
  assert f"model.{key}" in message
  if also != "num_default_boxes":
    assert also in message


def test_a_new_model_field_is_covered_without_code_changes():
  c = tiny_mdssd.get_config()
  saved = _fingerprint(c)
  c.model.some_new_setting = 3
  assert "model.some_new_setting" in _refusal(saved, _fingerprint(c))


def test_class_names_and_pixel_convention_passed_by_the_trainer():
  c = tiny_mdssd.get_config()
  rgb = dict(channel_order="RGB", input_range=1.0, mean=[0.5] * 3, std=[0.25] * 3)
  saved = _fingerprint(c, class_names=["a", "b"], pixel_convention=rgb)
  message = _refusal(saved, _fingerprint(c, class_names=["b", "a"],
                                         pixel_convention=dict(rgb, channel_order="BGR")))
  assert "class_names" in message and "pixel_convention" in message


def test_version_1_fingerprints_are_compared_on_their_fields():
  c = mdssd300_voc.get_config()
  current = _fingerprint(c)
  legacy = {k.split(".", 1)[1]: v for k, v in current.items()
            if k.startswith("model.") and k.split(".", 1)[1] in checkpointing._V1_MODEL_KEYS}
  legacy.update(fusion_deconv_channels=256, num_default_boxes=current["num_default_boxes"],
                param_shapes_sha256=current["param_shapes_sha256"])
  checkpointing.check_fingerprint(legacy, current, "/tmp/workdir")
  legacy["width_multiplier"] = 0.5
  assert "model.width_multiplier" in _refusal(legacy, current)


def test_param_shapes_enter_the_digest():
  c = tiny_mdssd.get_config()
  model, anchors = models.build_detector(c)
  variables, _, _ = models.abstract_forward(model, 96)
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  a = checkpointing.model_fingerprint(c, len(anchors), params)
  params["fusion1"]["out_conv"]["kernel"] = jax.ShapeDtypeStruct((3, 3, 16, 17), "float32")
  b = checkpointing.model_fingerprint(c, len(anchors), params)
  assert a["param_shapes_sha256"] != b["param_shapes_sha256"]


def test_fields_added_later_keep_older_checkpoints_usable():
  """A checkpoint written before model.fusion_deep_branch existed holds the paper's block (True):
  it fits a config with the branch, and is refused by one without it (whose shapes differ too)."""
  c = tiny_mdssd.get_config()
  current = _fingerprint(c)
  assert current["model.fusion_deep_branch"] is True
  older = {k: v for k, v in current.items() if k != "model.fusion_deep_branch"}
  checkpointing.check_fingerprint(older, current, "/tmp/workdir")
  c.model.fusion_deep_branch = False
  shallow = _fingerprint(c)
  message = _refusal(older, shallow)
  assert "model.fusion_deep_branch: checkpoint True vs config False" in message
  assert "param_shapes_sha256" in message
