"""The context setting of the generated data (config.data.synthetic.context): a tiny object's class is
its shape and the kind of a scene marker far away, so only a model that sees far can tell it.

The promise is checked on the rendered pixels: two images that differ only in the marker's kind are
identical, pixel for pixel, everywhere but inside the marker, in particular in a window around every
tiny object wider than what the shallow heads see; their tiny objects' labels differ by the scene.
"""

import numpy as np
import pytest

from mdssd_jax.data import synthetic

# VGG16's receptive fields at the input, worked out here from its layers (3x3 convs, stride 1; 2x2
# pools, stride 2): r grows by 2 * jump per conv and by jump per pool, jump doubling at each pool.
def receptive_field(layers):
  r, jump = 1, 1
  for kind in layers:
    if kind == "conv":
      r += 2 * jump
    else:
      r += jump
      jump *= 2
  return r


CONV3_3 = ["conv"] * 2 + ["pool"] + ["conv"] * 2 + ["pool"] + ["conv"] * 3
CONV4_3 = CONV3_3 + ["pool"] + ["conv"] * 3


def test_receptive_fields_and_the_margin():
  assert receptive_field(CONV3_3) == 40 and receptive_field(CONV4_3) == 92
  # The shallow fine head: two 3x3 convs of the Fusion Block's shallow branch and the 3x3 head conv
  # on conv3_3's stride-4 map.
  assert receptive_field(CONV3_3 + ["conv"] * 3) == 64
  assert synthetic.CONTEXT_MARGIN_PX >= receptive_field(CONV4_3) / 2


SPEC = synthetic.SyntheticSpec(image_size_px=192, num_train=8, num_test=8, min_object_px=8,
                               max_object_px=40, max_objects=24, max_distractors=2, context=True)


@pytest.mark.parametrize("index", range(12))
def test_only_the_marker_differs_between_scenes(index):
  stripes = synthetic.render_context(SPEC, "train", index, scene=0)
  checks = synthetic.render_context(SPEC, "train", index, scene=1)
  np.testing.assert_array_equal(stripes[1], checks[1])           # the same boxes
  differ = np.any(stripes[0] != checks[0], axis=-1)
  ys, xs = np.nonzero(differ)
  assert len(ys) > 0, "the two scenes must look different"
  tiny = np.max(stripes[1][:, 2:] - stripes[1][:, :2], axis=1) < synthetic.TINY_LIMIT_PX
  num_tiny = len(synthetic.CONTEXT_TINY_SHAPES)
  np.testing.assert_array_equal(checks[2][tiny], stripes[2][tiny] + num_tiny)   # other class
  np.testing.assert_array_equal(checks[2][~tiny], stripes[2][~tiny])            # local: the same
  margin = synthetic.CONTEXT_MARGIN_PX
  for x0, y0, x1, y1 in stripes[1][tiny]:
    # The window a 64 px head centred on the object sees, and more: identical in both scenes.
    lo_x, lo_y = int(max(0, np.floor(x0 - margin + 1))), int(max(0, np.floor(y0 - margin + 1)))
    hi_x, hi_y = int(np.ceil(x1 + margin - 1)), int(np.ceil(y1 + margin - 1))
    assert not differ[lo_y:hi_y, lo_x:hi_x].any()
    # Every differing pixel (the marker) keeps the margin from the tiny object's box.
    gap = np.maximum(np.maximum(x0 - xs - 1, xs - x1), np.maximum(y0 - ys - 1, ys - y1))
    assert gap.min() >= margin - 1


def test_context_classes_and_counts():
  assert SPEC.class_names[:3] == ["circle@stripes", "square@stripes", "triangle@stripes"]
  assert len(SPEC.class_names) == 9 and "_context_" in SPEC.config_name()
  labels = np.concatenate([synthetic.render(SPEC, "test", i)[2] for i in range(8)])
  assert (labels < 6).sum() >= 8 and (labels >= 6).sum() >= 8   # both families drawn
  plain = synthetic.SyntheticSpec(image_size_px=192, num_train=8, num_test=8)
  assert plain.config_name() != SPEC.config_name()


def test_tiny_confusion_counts_right_shape_wrong_scene():
  """Worked by hand: class 1 circle@stripes, 4 circle@checks, 2 square@stripes, 7 plus."""
  from benchmarks import study_small_objects as study   # pylint: disable=g-import-not-at-top
  names = SPEC.class_names
  gt = {"boxes": np.array([[10, 10, 20, 20], [50, 50, 62, 60], [100, 100, 130, 130]], float),
        "labels": np.array([1, 2, 7])}
  pred = {"boxes": np.array([[10, 10, 20, 20],      # circle@stripes on the circle: right
                             [11, 10, 20, 20],      # circle@checks on the circle: wrong scene
                             [10, 11, 20, 21],      # square@stripes on the circle: other shape
                             [50, 50, 62, 60],      # square@checks on the square: wrong scene
                             [51, 50, 62, 60],      # square@checks at score 0.1: not counted
                             [100, 100, 130, 130],  # plus on the plus: local class, not counted
                             [0, 0, 5, 5]], float),  # nowhere near
          "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.9, 0.9]),
          "labels": np.array([1, 4, 2, 5, 5, 7, 4])}
  assert study.tiny_confusion([pred], [gt], names) == pytest.approx(2 / 3)
  assert study.tiny_confusion([dict(pred, scores=pred["scores"] * 0)], [gt], names) is None


def test_study_variants_on_context_data_have_its_nine_classes():
  from benchmarks import study_small_objects as study   # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import registry   # pylint: disable=g-import-not-at-top
  for variant in study.CONTEXT.variants:
    config = study.variant_config(variant, "context", study.CONTEXT, seed=0, lr=6e-3)
    assert config.data.synthetic.context and config.model.num_classes == 9
    assert registry.get_dataset(config.data).class_names == SPEC.class_names
  assert study.steps_out(2400, "context").endswith("study_context_2400steps.json")
