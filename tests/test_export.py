"""--mode=export: SavedModel = --mode=predict, TFLite raw outputs = the network, jax.export = live.

One tiny model is trained for 2 steps once per module and exported once; each test reads that
export. References are independent of mdssd_jax/run/export.py: OpenCV itself for the resize, the JSON
that --mode=predict writes for the detections, and a NumPy decoding of SSD boxes for TFLite.
"""

import hashlib
import json
import os

import cv2
import numpy as np
import pytest

from mdssd_jax.run import predict as run_predict
from tests import helpers

# Images of several sizes and aspect ratios, smaller and larger than the 96 px input, and 96 itself.
IMAGE_SIZES_HW = ((96, 96), (60, 150), (211, 130), (400, 333))
BOX_TOLERANCE_PX = 1.0
SCORE_TOLERANCE = 1e-3
# TFLite runs the same float32 network through other kernels (XNNPACK): summation order differs.
TFLITE_TOLERANCE = 1e-4


def _tiny_config(data_dir, **overrides):
  return helpers.tiny_config(data_dir, **{"train.num_steps": 2, **overrides})


def _tree_hashes(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _export_in_a_fresh_process(config, workdir):
  """`python main.py --mode=export` on workdir (what a user runs); returns the export folder."""
  helpers.run_main([f"--workdir={workdir}", "--mode=export", f"--config.data.data_dir={config.data.data_dir}",
                    f"--config.train.num_steps={config.train.num_steps}"], check=True)
  return os.path.join(workdir, "export")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir) of a tiny model trained 2 steps, and its exported folder."""
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import prepare  # pylint: disable=g-import-not-at-top
  config = _tiny_config(str(tmp_path_factory.mktemp("tfds")))
  prepare.prepare(config)
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(config, workdir)
  before = _tree_hashes(os.path.join(workdir, "checkpoints"))
  export_dir = _export_in_a_fresh_process(config, workdir)
  first = _tree_hashes(export_dir)
  from mdssd_jax.data import registry  # pylint: disable=g-import-not-at-top
  class_names = registry.get_dataset(config.data).class_names
  return dict(config=config, workdir=workdir, export_dir=export_dir, checkpoint_hashes=before,
              first_export_hashes=first, class_names=list(class_names))


def _images(tmp_path):
  rng = np.random.default_rng(7)
  paths, images = [], []
  for i, (h, w) in enumerate(IMAGE_SIZES_HW):
    # Smooth noise with a few bright shapes, so a barely trained model gives varied scores.
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    for _ in range(3):
      x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
      cv2.rectangle(image, (x, y), (x + 15, y + 12), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    path = str(tmp_path / f"image_{i}.png")
    cv2.imwrite(path, image[..., ::-1])
    paths.append(path)
    images.append(image)
  return paths, images


def test_resize_equals_opencv_linear():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import export  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for h, w in ((96, 96), (50, 70), (333, 517), (97, 95), (7, 300), (1, 5), (1024, 768)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for size in (96, 300):
      want = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
      got = export.resize_like_opencv(tf.constant(image[None]), size).numpy()[0]
      np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w} -> {size}")


def test_saved_model_equals_mode_predict(trained, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths, images = _images(tmp_path)
  out_dir = str(tmp_path / "predictions")
  run_predict.predict_from_checkpoint(trained["config"], trained["workdir"], paths, output_dir=out_dir)
  with open(os.path.join(out_dir, "detections.json")) as f:
    expected = json.load(f)
  serve = tf.saved_model.load(os.path.join(trained["export_dir"], "saved_model")).signatures[
      "serving_default"]
  compared = 0
  for index, image in enumerate(images):
    out = {k: v.numpy() for k, v in serve(images=tf.constant(image[None])).items()}
    assert out["detection_boxes"].dtype == np.float32 and out["detection_classes"].dtype == np.float32
    n = int(out["num_detections"][0])
    h, w = image.shape[:2]
    got = [(int(c), float(s), b * np.array([h, w, h, w]))
           for b, s, c in zip(out["detection_boxes"][0][:n], out["detection_scores"][0][:n],
                              out["detection_classes"][0][:n])]
    want = [d for d in expected if d["image_id"] == index]
    assert n == len(want) > 0, (index, n, len(want))
    assert not out["detection_scores"][0][n:].any()
    for det in want:
      x, y, bw, bh = det["bbox"]
      box_yxyx = np.array([y, x, y + bh, x + bw])
      # The JSON rounds boxes to 0.01 px and scores to 1e-5; find the same detection (the order of
      # near-equal scores may differ).
      match = [g for g in got if g[0] == det["category_id"] and abs(g[1] - det["score"]) <= SCORE_TOLERANCE
               and np.abs(g[2] - box_yxyx).max() <= BOX_TOLERANCE_PX]
      assert match, (index, det)
      compared += 1
  assert compared > 10


def _np_decode_yxyx(loc, anchors_cxcywh, variances, max_log_scale):
  """SSD's box decoding written out: centre offsets scaled by the default box, log sizes."""
  cx = anchors_cxcywh[:, 0] + loc[..., 0] * variances[0] * anchors_cxcywh[:, 2]
  cy = anchors_cxcywh[:, 1] + loc[..., 1] * variances[0] * anchors_cxcywh[:, 3]
  w = anchors_cxcywh[:, 2] * np.exp(np.minimum(loc[..., 2] * variances[1], max_log_scale))
  h = anchors_cxcywh[:, 3] * np.exp(np.minimum(loc[..., 3] * variances[1], max_log_scale))
  return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def test_predict_restores_weights_only(trained, tmp_path, monkeypatch):
  """Predict with another optimiser, learning rate, retention and data set name in config.train /
  config.data: the same detections as with the training config (only weights, batch statistics and
  metadata are read; the optimiser state's structure depends on config.train), no optimiser is
  built, and the restored variables are exactly the training state's params and batch statistics."""
  import jax  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment, optim, weights  # pylint: disable=g-import-not-at-top
  config = trained["config"]
  paths, _ = _images(tmp_path)
  want_dir = str(tmp_path / "want")
  run_predict.predict_from_checkpoint(config, trained["workdir"], paths, output_dir=want_dir)
  changed = _tiny_config(config.data.data_dir, **{
      "train.optimizer": "sgd", "train.base_lr": 0.5, "train.momentum": 0.5,
      "train.keep_checkpoints": 1})
  changed.data.name = "no_such_data_set"   # the class names come from the checkpoint
  assert changed.train.optimizer != config.train.optimizer
  def no_optimizer(*args, **kwargs):
    raise AssertionError("prediction built an optimiser")
  monkeypatch.setattr(optim, "make_optimizer", no_optimizer)
  got_dir = str(tmp_path / "got")
  run_predict.predict_from_checkpoint(changed, trained["workdir"], paths, output_dir=got_dir)
  with open(os.path.join(want_dir, "detections.json")) as f, \
       open(os.path.join(got_dir, "detections.json")) as g:
    assert json.load(f) == json.load(g)
  detector = weights.load_detector(changed, trained["workdir"])
  monkeypatch.undo()
  _, state, step = experiment.load_checkpoint(config, trained["workdir"])
  assert detector.step == step and set(detector.variables) == {"params", "batch_stats"}
  for name in ("params", "batch_stats"):
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), detector.variables[name],
                                  jax.device_get(state[name]))
    assert all(jax.tree_util.tree_leaves(same))
  assert detector.class_names == tuple(trained["class_names"])
  # A checkpoint of another model is still refused, naming the field.
  other = _tiny_config(config.data.data_dir, **{"anchors.min_sizes": (7, 12, 24, 40, 56, 72)})
  with pytest.raises(ValueError, match="anchors.min_sizes"):
    weights.load_detector(other, trained["workdir"])


# TF 2.21 warns that tf.lite.Interpreter moves to the ai_edge_litert package; it still works.
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_raw_outputs_equal_the_network(trained):
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.core import pixels, postprocess
  config = trained["config"]
  setup, state, _ = experiment.load_checkpoint(config, trained["workdir"])
  size = config.model.input_size_px
  image = np.random.default_rng(3).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  loc, logits = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))(
      experiment.model_variables(state), pixels.normalize(image, setup.convention))
  loc, logits = np.asarray(loc, np.float64), np.asarray(logits, np.float64)
  want_boxes = _np_decode_yxyx(loc, np.asarray(setup.anchors, np.float64), config.anchors.variances,
                               postprocess.DEFAULT_MAX_LOG_SCALE)
  want_scores = np.exp(logits - logits.max(-1, keepdims=True))
  want_scores = (want_scores / want_scores.sum(-1, keepdims=True))[..., 1:]

  interpreter = tf.lite.Interpreter(model_path=os.path.join(trained["export_dir"], "model.tflite"))
  runner = interpreter.get_signature_runner("serving_default")
  assert interpreter.get_input_details()[0]["shape"].tolist() == [1, size, size, 3]
  got = runner(images=image)
  assert got["boxes"].shape == (1, len(setup.anchors), 4)
  assert got["scores"].shape == (1, len(setup.anchors), config.model.num_classes)
  np.testing.assert_allclose(got["boxes"], want_boxes, atol=TFLITE_TOLERANCE)
  np.testing.assert_allclose(got["scores"], want_scores, atol=TFLITE_TOLERANCE)


def test_jax_artifact_equals_live_model(trained):
  import jax  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.inference import predictor as predict
  config = trained["config"]
  setup, state, _ = experiment.load_checkpoint(config, trained["workdir"])
  live = predict.LocalPredictor(setup.model, setup.anchors, config, setup.convention)
  live.set_variables(experiment.model_variables(state))
  with open(os.path.join(trained["export_dir"], "jax", "detector.jax"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
  size = config.model.input_size_px
  images = np.random.default_rng(5).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
  want = live(images)
  got = jax.device_get(exported.call(images))
  np.testing.assert_array_equal(got["valid"], want["valid"])
  np.testing.assert_array_equal(got["classes"], want["classes"])
  np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-6)
  np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-6)


def test_export_info_and_labels(trained):
  with open(os.path.join(trained["export_dir"], "export_info.json")) as f:
    info = json.load(f)
  assert info["step"] == 2 and info["input_size_px"] == 96
  assert info["class_names"] and info["pixel_convention"]["channel_order"] in ("RGB", "BGR")
  assert info["fingerprint"]["num_default_boxes"] == info["num_default_boxes"]
  with open(os.path.join(trained["export_dir"], "labels.txt")) as f:
    assert f.read().splitlines() == info["class_names"]


def test_exporting_twice_gives_the_same_files_and_keeps_the_checkpoint(trained):
  # A second export in a fresh process, over the first one: the same bytes, the random uuid TF
  # writes into saved_model/fingerprint.pb included.
  second = _tree_hashes(_export_in_a_fresh_process(trained["config"], trained["workdir"]))
  assert sorted(second) == sorted(trained["first_export_hashes"])
  differing = [p for p in second if second[p] != trained["first_export_hashes"][p]]
  assert differing == [], differing
  assert _tree_hashes(os.path.join(trained["workdir"], "checkpoints")) == trained["checkpoint_hashes"]
  assert not [n for n in os.listdir(trained["workdir"]) if n.startswith(".export.tmp")]


def test_errors_name_the_fix_and_write_nothing(trained, tmp_path):
  from mdssd_jax.run import export  # pylint: disable=g-import-not-at-top
  config = trained["config"]
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="train first"):
    export.export_checkpoint(config, str(empty))
  assert os.listdir(empty) == []
  with pytest.raises(ValueError, match="saved_model, tflite, jax"):
    export.export_checkpoint(config, trained["workdir"], formats="onnx")
  with pytest.raises(FileNotFoundError, match="available steps: 2"):
    export.export_checkpoint(config, trained["workdir"], step=7)
  with pytest.raises(ValueError, match="float16"):
    export.export_checkpoint(config, trained["workdir"], tflite_quantization="int4")
  assert not [n for n in os.listdir(trained["workdir"]) if n.startswith(".export.tmp")]
  assert _tree_hashes(trained["export_dir"]) == trained["first_export_hashes"]
