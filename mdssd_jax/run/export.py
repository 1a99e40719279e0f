"""`--mode=export`: a trained detector as a TF SavedModel, a TFLite file and a jax.export artifact.

    python main.py --config=CONFIG --workdir=DIR --mode=export [--step=N] [--formats=saved_model,tflite,jax]

writes DIR/export/ (docs/deploying.md, "Deploying a trained detector"):

- saved_model/: `serving_default` in the TF Object Detection API's convention. Input `images` uint8
  [batch, height, width, 3] RGB of any size; inside: the warp to S x S that `--mode=predict` does on
  the host (OpenCV's linear resize, reproduced bit for bit by `resize_like_opencv`), the pixel
  convention of the weights, the network, box decoding and NMS (`predict.make_predict_fn`, the one
  predict path, run by jax2tf as an XLA program). Outputs detection_boxes float32 [batch, K, 4]
  normalised (ymin, xmin, ymax, xmax), detection_scores [batch, K], detection_classes float32 [batch, K]
  (the `category_id` of --mode=predict's JSON), num_detections float32 [batch]. Slots past
  num_detections are zero.
- model.tflite: uint8 [1, S, S, 3] (TFLite needs a fixed size) -> the network and box decoding:
  `boxes` float32 [1, A, 4] normalised (ymin, xmin, ymax, xmax) of every default box and `scores`
  float32 [1, A, C] (softmax, background dropped). The caller resizes and runs NMS (TFLite has no
  sort, which the batched NMS needs).
- jax/detector.jax: `jax.export` of the same predict function with the weights inside, lowered for
  config.export.platforms; `jax.export.deserialize(bytes).call(images uint8 (B, S, S, 3))`.
- labels.txt (line k = the name of detection class k) and export_info.json.

The files do not depend on the caller: the XLA programs carry as source locations only the innermost
file name and line of each op (not the caller's call stack, nor directories), and `--mode=export`
(a fresh process) writes byte-identical files for the same checkpoint and config (the random uuid
TF puts in saved_model/fingerprint.pb is replaced by one derived from the model's hashes). A
SavedModel saved inside a longer-running process differs in TF's internal function-name counters.

Everything is written into a temporary folder beside DIR/export and renamed into place at the end,
so an error leaves the previous export (or none) untouched; the checkpoint is only read.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mdssd_jax.core import boxes as box_lib
from mdssd_jax.core import pixels
from mdssd_jax.core import postprocess
from mdssd_jax.inference import predictor as predict_lib
from mdssd_jax.report import progress
from mdssd_jax.run import predict as run_predict
from mdssd_jax.state import weights

FORMATS = ("saved_model", "tflite", "jax")
TFLITE_QUANTIZATIONS = ("none", "float16", "dynamic_range")
PLATFORMS = ("cpu", "cuda", "tpu")
EXPORT_DIR = "export"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
JAX_FILE = os.path.join("jax", "detector.jax")
LABELS_FILE = "labels.txt"
INFO_FILE = "export_info.json"
# What labels.txt has for an id no class uses (COCO's category ids have gaps), as TFLite's COCO maps.
UNUSED_LABEL = "???"

# OpenCV's fixed-point linear resize of uint8 images (imgproc/src/resize.cpp, INTER_LINEAR):
# 11-bit interpolation weights; the horizontal pass keeps the full products, the vertical pass
# multiplies (value >> 4) by the weight and keeps the high 16 bits, then rounds off 2 more bits.
_COEF_BITS = 11
_COEF_ONE = 1 << _COEF_BITS


def check_formats(formats):
  """A tuple of known formats from a sequence or a comma-separated string; ValueError otherwise."""
  if isinstance(formats, str):
    formats = [f.strip() for f in formats.split(",") if f.strip()]
  formats = tuple(dict.fromkeys(formats))
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ValueError(f"unknown export format(s) {unknown or formats!r}; choose from {', '.join(FORMATS)} "
                     "(--formats=saved_model,tflite,jax or config.export.formats)")
  return formats


def check_quantization(quantization):
  if quantization not in TFLITE_QUANTIZATIONS:
    raise ValueError(f"unknown TFLite quantisation {quantization!r}; choose from "
                     f"{', '.join(TFLITE_QUANTIZATIONS)} (--tflite_quantization or "
                     "config.export.tflite_quantization)")
  return quantization


def _check_platforms(platforms):
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"config.export.platforms={platforms!r}: choose from {', '.join(PLATFORMS)}")
  return platforms


# ---------------------------------------------------------------------------------------------------
# The host resize of --mode=predict, in TensorFlow.
# ---------------------------------------------------------------------------------------------------

def _source_taps(src_len, dst_len, clamp_weight):
  """Source indices (i0, i1) and 11-bit weights (w0, w1) of each output pixel along one axis.

  src_len: scalar int32 tensor (dynamic); dst_len: int. The centre of output pixel d maps to source
  (d + 0.5) * src / dst - 0.5 (half-pixel centres, computed in float64 and rounded to float32 as
  OpenCV does). Outside the image the index is clamped; OpenCV also zeroes the weight there along
  x (clamp_weight=True) but keeps it along y, where both taps then read the same row.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (TensorFlow only for the export)
  src = tf.cast(src_len, tf.float64)
  scale = 1.0 / (tf.constant(float(dst_len), tf.float64) / src)
  centre = tf.cast((tf.range(dst_len, dtype=tf.float64) + 0.5) * scale - 0.5, tf.float32)
  floor = tf.floor(centre)
  frac = centre - floor
  first = tf.cast(floor, tf.int32)
  if clamp_weight:
    outside = (first < 0) | (first >= src_len - 1)
    frac = tf.where(outside, tf.zeros_like(frac), frac)
  w1 = tf.cast(tf.round(tf.cast(frac, tf.float64) * _COEF_ONE), tf.int32)
  w0 = _COEF_ONE - w1
  i0 = tf.clip_by_value(first, 0, src_len - 1)
  i1 = tf.clip_by_value(first + 1, 0, src_len - 1)
  return i0, i1, w0, w1


def resize_like_opencv(images_uint8, size_px):
  """uint8 [B, H, W, 3] (any H, W) -> uint8 [B, S, S, 3], equal to cv2.resize(INTER_LINEAR) per image.

  The warp `--mode=predict` applies on the host (data/augment.py `resize`), in integer arithmetic,
  so the SavedModel sees the very pixels the JAX predict path sees (tests/test_export.py checks
  equality over many sizes, up and down).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = tf.cast(images_uint8, tf.int32)
  shape = tf.shape(images)
  y0, y1, wy0, wy1 = _source_taps(shape[1], size_px, clamp_weight=False)
  x0, x1, wx0, wx1 = _source_taps(shape[2], size_px, clamp_weight=True)
  wx0, wx1 = wx0[None, None, :, None], wx1[None, None, :, None]
  rows = tf.gather(images, x0, axis=2) * wx0 + tf.gather(images, x1, axis=2) * wx1   # [B, H, S, 3]
  rows = tf.bitwise.right_shift(rows, 4)
  wy0, wy1 = wy0[None, :, None, None], wy1[None, :, None, None]
  top = tf.bitwise.right_shift(tf.gather(rows, y0, axis=1) * wy0, 16)
  bottom = tf.bitwise.right_shift(tf.gather(rows, y1, axis=1) * wy1, 16)
  out = tf.bitwise.right_shift(top + bottom + 2, 2)
  return tf.cast(tf.clip_by_value(out, 0, 255), tf.uint8)


# ---------------------------------------------------------------------------------------------------
# Pieces of the exported graphs.
# ---------------------------------------------------------------------------------------------------

def category_id_table(num_classes, label_to_category_id=None):
  """int32 (C + 1,): entry k is the category id of label k (entry 0, no detection: 0)."""
  table = np.arange(num_classes + 1, dtype=np.int32)
  if label_to_category_id:
    for label, category in label_to_category_id.items():
      table[int(label)] = int(category)
  return table


def label_lines(class_names, label_to_category_id=None):
  """labels.txt: line k (1-based) is the name of detection class k; ids no class uses say '???'."""
  table = category_id_table(len(class_names), label_to_category_id)
  lines = [UNUSED_LABEL] * int(table.max())
  for label, name in enumerate(class_names, start=1):
    lines[table[label] - 1] = str(name)
  return lines


def sort_top_k(operand, k):
  """lax.top_k as a stable descending sort and a slice: the same values and indices, ties included.

  JAX lowers lax.top_k to a `chlo.top_k` composite that the XLA in TensorFlow 2.21 cannot refine for
  a symbolic batch (and TFLite cannot read); a sort is plain StableHLO. `-x + 0.0` orders -0.0 and
  0.0 as equal, as top_k does; the stable sort keeps the lower index first among equal scores.
  """
  last = operand.ndim - 1
  index = jax.lax.broadcasted_iota(jnp.int32, operand.shape, last)
  negated, index = jax.lax.sort((-operand + 0.0, index), dimension=last, is_stable=True, num_keys=1)
  return -negated[..., :k], index[..., :k]


@contextlib.contextmanager
def _reproducible_locations():
  """Source locations in lowered programs without the call stack and directories.

  By default JAX records each op's whole Python call stack with absolute paths, so the bytes of an
  artifact depended on who called the export (a test, main.py, a notebook) and where the code
  lives; the innermost file name and line still say where each op comes from.
  """
  flags = {"jax_include_full_tracebacks_in_locations": False,
           "jax_hlo_source_file_canonicalization_regex": r".*/"}
  saved = {name: getattr(jax.config, name) for name in flags}
  try:
    for name, value in flags.items():
      jax.config.update(name, value)
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)


def _host_variables(variables):
  """Flax variables as NumPy arrays on the host (the first shard of replicated global arrays)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), variables)


def make_serving_module(predict_fn, variables, input_size_px, category_ids, platforms=("cpu",)):
  """A tf.Module whose `serve` is the OD API signature around predict_fn (see the module doc).

  Args:
    predict_fn: predict.make_predict_fn's (variables, uint8 (B, S, S, 3)) -> detections.
    variables: Flax variables (NumPy); they become tf.Variables of the SavedModel.
    input_size_px: S.
    category_ids: (C + 1,) int table, label -> category id (category_id_table).
    platforms: the XLA platforms the program is lowered for.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  size = int(input_size_px)
  tf_predict = jax2tf.convert(predict_fn, polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
                                with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), variables)
  module.category_ids = tf.constant(np.asarray(category_ids, np.float32))

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
               autograph=False)
  def serve(images):
    resized = resize_like_opencv(images, size)
    dets = tf_predict(module.variables_tree, resized)
    valid = tf.cast(dets["valid"], tf.float32)
    return {
        "detection_boxes": tf.gather(dets["boxes"], [1, 0, 3, 2], axis=-1) * valid[..., None],
        "detection_scores": dets["scores"] * valid,
        "detection_classes": tf.gather(module.category_ids, dets["classes"]) * valid,
        "num_detections": tf.reduce_sum(valid, axis=-1),
    }

  module.serve = serve
  return module


def make_raw_detector(model, anchors_cxcywh, config, convention):
  """(variables, uint8 (B, S, S, 3)) -> {boxes (B, A, 4) normalised yxyx, scores (B, A, C)}.

  The TFLite graph: the network in float32 with the kernels TFLite can convert, then the decoding
  and softmax of postprocess.detect (its NMS is the caller's).
  """
  anchors = jnp.asarray(anchors_cxcywh, jnp.float32)
  portable = model.clone(kernels="portable", dtype=jnp.float32)

  def raw(variables, images_uint8):
    images = pixels.normalize(images_uint8, convention, jnp.float32)
    loc_preds, cls_logits = portable.apply(variables, images, train=False)
    boxes = box_lib.decode(loc_preds, anchors, tuple(config.anchors.variances),
                           max_log_scale=postprocess.DEFAULT_MAX_LOG_SCALE)
    return {"boxes": boxes[..., jnp.array([1, 0, 3, 2])],
            "scores": jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[..., 1:]}

  return raw


def tflite_bytes(raw_fn, variables, input_size_px, quantization="none"):
  """The TFLite flatbuffer of raw_fn (make_raw_detector) for one uint8 [1, S, S, 3] image."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  check_quantization(quantization)
  size = int(input_size_px)
  tf_raw = jax2tf.convert(raw_fn, with_gradient=False, native_serialization_platforms=("cpu",))
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), variables)

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name="images")],
               autograph=False)
  def serve(images):
    return tf_raw(module.variables_tree, images)

  converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], module)
  if quantization == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantization == "dynamic_range":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  return converter.convert()


def export_jax(predict_fn, variables, input_size_px, platforms):
  """Serialised jax.export of images uint8 (B, S, S, 3) -> detections, weights inside."""
  size = int(input_size_px)
  batch, = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(lambda images: predict_fn(variables, images)),
                               platforms=tuple(platforms))(
                                   jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))
  return bytes(exported.serialize())


# ---------------------------------------------------------------------------------------------------
# The whole export.
# ---------------------------------------------------------------------------------------------------

def _jsonable(value):
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)
  return value


def _deterministic_fingerprint_uuid(saved_model_dir):
  """Replaces the random `uuid` TF writes into fingerprint.pb with one derived from the model's hashes.

  Everything else in fingerprint.pb is a hash of the saved files; the random uuid alone made two
  exports of one checkpoint differ. The derived one (a 128-bit number in decimal, as TF writes it)
  still differs between different models.
  """
  from tensorflow.core.protobuf import fingerprint_pb2  # pylint: disable=g-import-not-at-top
  path = os.path.join(saved_model_dir, "fingerprint.pb")
  if not os.path.exists(path):
    return
  fingerprint = fingerprint_pb2.FingerprintDef()
  with open(path, "rb") as f:
    fingerprint.ParseFromString(f.read())
  fingerprint.ClearField("uuid")
  digest = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).digest()
  fingerprint.uuid = str(int.from_bytes(digest[:16], "big"))
  with open(path, "wb") as f:
    f.write(fingerprint.SerializeToString(deterministic=True))


def _write_formats(out_dir, formats, model, anchors_cxcywh, config, convention, variables,
                   predict_fn, category_ids, size, tflite_quantization, platforms):
  """The SavedModel, TFLite and jax.export files into out_dir; {format: relative path}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = {}
  if "saved_model" in formats:
    # The same detector with a sort for top-k, which TensorFlow can load (sort_top_k).
    tf_predict_fn = predict_lib.make_predict_fn(model, anchors_cxcywh, config, convention,
                                                top_k_fn=sort_top_k)
    module = make_serving_module(tf_predict_fn, variables, size, category_ids, platforms)
    path = os.path.join(out_dir, SAVED_MODEL_DIR)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    _deterministic_fingerprint_uuid(path)
    files["saved_model"] = SAVED_MODEL_DIR
  if "tflite" in formats:
    raw_fn = make_raw_detector(model, anchors_cxcywh, config, convention)
    try:
      flatbuffer = tflite_bytes(raw_fn, variables, size, tflite_quantization)
    except Exception as e:  # pylint: disable=broad-except  (the converter raises many kinds)
      raise RuntimeError(
          f"the TFLite converter of TensorFlow {tf.__version__} could not convert this model "
          f"({type(e).__name__}: {str(e)[:500]}); export the other formats with "
          "--formats=saved_model,jax (or set config.export.formats)") from e
    with open(os.path.join(out_dir, TFLITE_FILE), "wb") as f:
      f.write(flatbuffer)
    files["tflite"] = TFLITE_FILE
  if "jax" in formats:
    os.makedirs(os.path.join(out_dir, os.path.dirname(JAX_FILE)))
    with open(os.path.join(out_dir, JAX_FILE), "wb") as f:
      f.write(export_jax(predict_fn, variables, size, platforms))
    files["jax"] = JAX_FILE
  return files


def export_detector(out_dir, model, anchors_cxcywh, config, convention, variables, class_names,
                    label_to_category_id=None, step=None, fingerprint=None, formats=FORMATS,
                    tflite_quantization="none", platforms=PLATFORMS):
  """Writes the formats into out_dir (created; must not exist) and returns export_info's dict."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  formats = check_formats(formats)
  check_quantization(tflite_quantization)
  platforms = _check_platforms(platforms)
  size = int(config.model.input_size_px)
  variables = _host_variables(variables)
  predict_fn = predict_lib.make_predict_fn(model, anchors_cxcywh, config, convention)
  category_ids = category_id_table(len(class_names), label_to_category_id)
  os.makedirs(out_dir)
  with _reproducible_locations():
    files = _write_formats(out_dir, formats, model, anchors_cxcywh, config, convention, variables,
                           predict_fn, category_ids, size, tflite_quantization, platforms)
  with open(os.path.join(out_dir, LABELS_FILE), "w") as f:
    f.write("\n".join(label_lines(class_names, label_to_category_id)) + "\n")
  info = dict(
      step=None if step is None else int(step),
      input_size_px=size,
      num_default_boxes=int(len(anchors_cxcywh)),
      class_names=list(class_names),
      category_ids=[int(c) for c in category_ids[1:]],
      pixel_convention=pixels.as_convention(convention),
      fingerprint=_jsonable(fingerprint),
      files=files,
      platforms=list(platforms),
      tflite_quantization=tflite_quantization if "tflite" in formats else None,
      detection=dict(top_k=int(config.eval.top_k), score_threshold=float(config.eval.score_threshold),
                     nms_iou=float(config.eval.nms_iou), pre_nms_top_k=int(config.eval.pre_nms_top_k)),
      versions=dict(jax=jax.__version__, tensorflow=tf.__version__),
      config=_jsonable(config))
  with open(os.path.join(out_dir, INFO_FILE), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
    f.write("\n")
  return info


def export_checkpoint(config, workdir, step=None, formats=None, tflite_quantization=None):
  """--mode=export: the latest (or `step`) checkpoint of workdir into workdir/export; returns its path.

  Raises FileNotFoundError for a missing checkpoint or step and ValueError for an unknown format,
  before anything is written.
  """
  formats = check_formats(config.export.formats if formats is None else formats)
  quantization = check_quantization(config.export.tflite_quantization if tflite_quantization is None
                                    else tflite_quantization)
  platforms = _check_platforms(config.export.platforms)
  workdir = os.path.abspath(workdir)
  detector = weights.load_detector(config, workdir, step)
  step = detector.step
  final = os.path.join(workdir, EXPORT_DIR)
  staging = tempfile.mkdtemp(prefix=f".{EXPORT_DIR}.tmp-", dir=workdir)
  try:
    export_detector(os.path.join(staging, EXPORT_DIR), detector.model, detector.anchors_cxcywh,
                    config, detector.convention, detector.variables, detector.class_names,
                    label_to_category_id=run_predict.category_ids(config, detector) or None,
                    step=step, fingerprint=detector.fingerprint, formats=formats,
                    tflite_quantization=quantization, platforms=platforms)
    # Swap in the new export: the old one is moved aside first, so a crash leaves one of the two.
    previous = None
    if os.path.exists(final):
      previous = os.path.join(staging, "previous")
      os.rename(final, previous)
    os.rename(os.path.join(staging, EXPORT_DIR), final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("exported step %d to %s", step, final)
  progress.say(f"Exported the checkpoint of step {step} ({', '.join(formats)}) to {final}")
  if config.eval.tiled.enabled:
    # The exported graphs take one S x S input (the SavedModel warps the whole image to it); the
    # tiling of --mode=predict is host code that is not exported.
    progress.say("Note: config.eval.tiled.enabled is True, but the export warps each whole image to "
          f"{config.model.input_size_px} px; to match --mode=predict on large images, cut tiles of "
          f"that size (overlap {config.eval.tiled.overlap_px} px) and merge their detections as "
          "mdssd_jax/inference/predictor.py's tiled_detect does.")
  return final
