"""Tsinghua-Tencent 100K traffic signs as a TFDS builder over the official layout, and its train crops.

Signs of classes outside the chosen list are dropped (the customary 45-class protocol counts only its
classes, in training and in evaluation). Images are 2048x2048 with signs of a few pixels: training
takes crops at the image's own resolution (`train_crop`) instead of shrinking the whole image.
"""

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from mdssd_jax.data import features
from mdssd_jax.data import image_files
from mdssd_jax.data import report

# The customary 45 classes (docs/data_formats.md): those with at least 100 instances in TT100K.
TT100K_45_CLASSES = (
    "i2", "i4", "i5", "il100", "il60", "il80", "io", "ip", "p10", "p11", "p12", "p19", "p23", "p26",
    "p27", "p3", "p5", "p6", "pg", "ph4", "ph4.5", "ph5", "pl100", "pl120", "pl20", "pl30", "pl40",
    "pl5", "pl50", "pl60", "pl70", "pl80", "pm20", "pm30", "pm55", "pn", "pne", "po", "pr40", "w13",
    "w32", "w55", "w57", "w59", "wo")

ANNOTATIONS_FILE = "annotations.json"
SPLITS = ("train", "test")


def find_root(manual_dir):
  """The folder holding annotations.json: manual_dir itself or its `data/` (the archive's layout)."""
  for root in (manual_dir, os.path.join(manual_dir, "data")):
    if os.path.isfile(os.path.join(root, ANNOTATIONS_FILE)):
      return root
  return None


def missing_files_message(manual_dir):
  """None when manual_dir holds the TT100K layout; else what to put where."""
  root = find_root(manual_dir)
  missing = []
  if root is None:
    missing.append(os.path.join(manual_dir, ANNOTATIONS_FILE))
    root = manual_dir
  missing += [os.path.join(root, s) + "/" for s in SPLITS if not os.path.isdir(os.path.join(root, s))]
  if not missing:
    return None
  return (f"tt100k: missing {', '.join(missing)}. Put the official TT100K `data` folder's contents "
          f"in {manual_dir}: {ANNOTATIONS_FILE} (with its \"types\" and \"imgs\"), train/ and test/ "
          "with the JPEG images (other/ is not needed). Set --config.data.manual_dir to that folder.")


@dataclasses.dataclass
class Tt100kConfig(tfds.core.BuilderConfig):
  classes: tuple = TT100K_45_CLASSES


def builder_config(classes=()):
  """The BuilderConfig for a class list (() = the customary 45); the name hashes the list."""
  classes = tuple(classes) or TT100K_45_CLASSES
  if len(set(classes)) != len(classes):
    raise ValueError(f"config.data.tt100k.classes has duplicates: {classes}")
  if classes == TT100K_45_CLASSES:
    return _DEFAULT_CONFIG
  digest = hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()[:10]
  return Tt100kConfig(name=f"c{len(classes)}_{digest}", version=_DEFAULT_CONFIG.version,
                      classes=classes, description=" ".join(classes))


_DEFAULT_CONFIG = Tt100kConfig(name="c45", version="1.0.0", classes=TT100K_45_CLASSES,
                               description="the customary 45 classes")


class Tt100k(tfds.core.GeneratorBasedBuilder):
  """TT100K from its official folder (annotations.json, train/, test/) in manual_dir."""

  BUILDER_CONFIGS = [_DEFAULT_CONFIG]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put annotations.json, train/ and test/ of TT100K's data/ in manual_dir."

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.detection_features(list(self.builder_config.classes)),
        homepage="https://cg.cs.tsinghua.edu.cn/traffic-sign/",
        disable_shuffling=True,  # record i = i-th image of the split in annotations.json's id order
    )

  def _split_generators(self, dl_manager):
    # The private attribute: the public `manual_dir` raises its own, less specific error first.
    manual_dir = os.fspath(getattr(dl_manager, "_manual_dir", None) or "")
    message = missing_files_message(manual_dir)
    if message:
      raise FileNotFoundError(message)
    root = find_root(manual_dir)
    with open(os.path.join(root, ANNOTATIONS_FILE)) as f:
      annotations = json.load(f)
    return report.with_progress({split: self._generate_examples(root, annotations, split)
                                 for split in SPLITS})

  def _generate_examples(self, root, annotations, split):
    label_of = {name: i for i, name in enumerate(self.builder_config.classes)}
    prepare_report = report.for_builder(self)
    source = os.path.join(root, ANNOTATIONS_FILE)
    for image_id in sorted(annotations["imgs"], key=str):
      entry = annotations["imgs"][image_id]
      path = entry["path"]
      if path.split("/")[0] != split:
        continue
      counts = lambda what, n, path=path: prepare_report.count(split, what, path, n)
      try:
        try:
          with open(os.path.join(root, path), "rb") as f:
            encoded = f.read()
        except OSError as e:
          raise report.BadAnnotation(os.path.join(root, path), f"the image cannot be read "
                                     f"({e.strerror or e})", "restore it from the official archive")
        # Decoded once here (its size normalises the boxes), so that training never meets an
        # image it cannot decode.
        checked = image_files.checked_image(encoded, os.path.join(root, path))
        objects = _objects(entry, (checked.width_px, checked.height_px), label_of,
                           f"{source} (image {image_id})", counts)
      except report.BadAnnotation as e:
        prepare_report.bad(split, e)
        continue
      yield str(image_id), {"image": checked.encoded, "image/filename": path, "objects": objects}


def _objects(entry, size, label_of, where, counts):
  """TFDS objects of one image entry of annotations.json; counts(what, n) hears of every repair."""
  width, height = size
  objects = []
  for k, obj in enumerate(entry.get("objects", [])):
    try:
      category, b = obj["category"], obj["bbox"]
      xmin, ymin, xmax, ymax = (float(b[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError) as e:
      raise report.BadAnnotation(where, f"object {k + 1} lacks a category or a numeric bbox ({e!r})",
                                 "use the official annotations.json") from e
    if category not in label_of:
      counts("objects_other_classes", 1)
      continue
    raw = np.array([ymin / height, xmin / width, ymax / height, xmax / width])
    ymin_n, xmin_n, ymax_n, xmax_n = np.clip(raw, 0.0, 1.0)
    counts("boxes_clipped", int(np.any((raw < 0) | (raw > 1))))
    if ymax_n <= ymin_n or xmax_n <= xmin_n:
      counts("boxes_degenerate_dropped", 1)   # no box to learn or evaluate
      continue
    objects.append({"bbox": tfds.features.BBox(ymin_n, xmin_n, ymax_n, xmax_n),
                    "label": label_of[category], "is_difficult": False})
  return objects


# ---- training crops at full resolution ------------------------------------------------------------

def make_train_crop(crop_size_px, on_object_prob):
  """The TT100K entry's registry.DatasetInfo.train_crop: train_crop with these settings (config.data.
  tt100k.train_crop_size_px, crop_on_object_prob), or None when crop_size_px <= 0 (whole images)."""
  crop_size_px = int(crop_size_px)
  if crop_size_px <= 0:
    return None
  return functools.partial(train_crop, crop_size_px=crop_size_px,
                           on_object_prob=float(on_object_prob))


def train_crop(image, boxes_xyxy, labels, rng, crop_size_px, on_object_prob):
  """A crop_size_px square of `image` at its own resolution, usually around a random object.

  With probability on_object_prob (and when there is an object) the crop contains a randomly chosen
  object entirely, at a uniformly random position inside the crop (objects larger than the crop are
  centred); otherwise the crop is anywhere. Objects whose centre lies in the crop are kept, clipped.
  An image smaller than the crop keeps its size along that side.

  image: uint8 (H, W, 3); boxes_xyxy: (N, 4) normalised to the image; labels: (N,).
  Returns (crop uint8 (h, w, 3), boxes (N', 4) normalised to the crop, labels (N',)).
  """
  height, width = image.shape[:2]
  crop_w, crop_h = min(crop_size_px, width), min(crop_size_px, height)
  boxes_px = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4) * [width, height, width, height]
  if len(boxes_px) and rng.random() < on_object_prob:
    x1, y1, x2, y2 = boxes_px[rng.integers(len(boxes_px))]
    x0 = _origin_containing(x1, x2, crop_w, width, rng)
    y0 = _origin_containing(y1, y2, crop_h, height, rng)
  else:
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
  crop = image[y0:y0 + crop_h, x0:x0 + crop_w]
  centres = (boxes_px[:, :2] + boxes_px[:, 2:]) / 2
  keep = ((centres[:, 0] >= x0) & (centres[:, 0] < x0 + crop_w) &
          (centres[:, 1] >= y0) & (centres[:, 1] < y0 + crop_h))
  kept = boxes_px[keep] - [x0, y0, x0, y0]
  kept = np.clip(kept, 0, [crop_w, crop_h, crop_w, crop_h]) / [crop_w, crop_h, crop_w, crop_h]
  return crop, kept.astype(np.float32), np.asarray(labels)[keep]


def _origin_containing(lo, hi, crop, limit, rng):
  """A crop start in [0, limit - crop] such that [lo, hi] lies inside the crop (centred if it cannot)."""
  first = max(0, int(np.ceil(hi)) - crop)
  last = min(limit - crop, int(np.floor(lo)))
  if first > last:  # the object is larger than the crop: centre on it
    return int(np.clip(round((lo + hi) / 2 - crop / 2), 0, limit - crop))
  return int(rng.integers(first, last + 1))
