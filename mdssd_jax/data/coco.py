"""COCO 2017 detection as a TFDS builder that reads the official files offline.

Why our own builder rather than TFDS's `coco/2017`: TFDS's wants the test2017 and unlabeled archives
as well (its URL list), with registered checksums, and cannot read extracted folders. This one reads
`annotations/instances_{train,val}2017.json` with `train2017/`, `val2017/` (folders or the official
zips). Labels are contiguous 1..80 in COCO category-id order; COCO_CATEGORY_IDS maps them back.
"""

import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from mdssd_jax.data import features
from mdssd_jax.data import image_files
from mdssd_jax.data import report
from mdssd_jax.data.voc import OfficialFiles

# The 80 COCO detection categories (category id, name), in id order: label k (1-based) is entry k-1.
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
    (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"),
    (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASS_NAMES = tuple(name for _, name in COCO_CATEGORIES)
COCO_CATEGORY_IDS = tuple(cid for cid, _ in COCO_CATEGORIES)

# Split -> (annotation file, image folder), as the official 2017 release names them.
_SPLITS = {"train": ("annotations/instances_train2017.json", "train2017"),
           "validation": ("annotations/instances_val2017.json", "val2017")}
_ARCHIVES = ("annotations_trainval2017.zip", "train2017.zip", "val2017.zip")


def label_to_category_id():
  """{label 1..80: COCO category id}, for the COCO evaluator and for COCO-style JSON output."""
  return {label: cid for label, cid in enumerate(COCO_CATEGORY_IDS, start=1)}


def _files(manual_dir):
  return OfficialFiles([os.path.join(manual_dir, name) for name in _ARCHIVES] + [manual_dir])


def missing_files_message(manual_dir):
  """None when manual_dir holds the annotation files; else what to put where."""
  files = _files(manual_dir)
  try:
    missing = [ann for ann, _ in _SPLITS.values() if files.find(ann) is None]
  finally:
    files.close()
  if not missing:
    return None
  return (f"coco/2017: {', '.join(missing)} not found in {manual_dir}. Put the official files there: "
          f"{os.path.join(manual_dir, 'annotations', 'instances_train2017.json')}, "
          f"{os.path.join(manual_dir, 'annotations', 'instances_val2017.json')}, and the image folders "
          f"{os.path.join(manual_dir, 'train2017')}/ and {os.path.join(manual_dir, 'val2017')}/ "
          f"(or the unextracted {', '.join(_ARCHIVES)} in {manual_dir}). "
          "Set --config.data.manual_dir to that folder.")


def _check_categories(categories, annotation_file):
  """Refuses annotation files whose category ids / names differ from the 80 COCO categories."""
  known = dict(COCO_CATEGORIES)
  for cat in categories:
    if known.get(cat["id"]) != cat["name"]:
      raise ValueError(f"{annotation_file}: category {cat['id']} {cat['name']!r} is not one of the 80 "
                       "COCO 2017 detection categories (mdssd_jax/data/coco.py COCO_CATEGORIES); "
                       "this builder reads the official instances_*2017.json files only.")


class MdssdCoco(tfds.core.GeneratorBasedBuilder):
  """COCO 2017 detection from the official files in manual_dir (no download)."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017", version=tfds.core.Version("1.0.0"))]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put annotations/instances_{train,val}2017.json and train2017/, val2017/ (or the official "
      "zips) in manual_dir.")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.detection_features(
            COCO_CLASS_NAMES, is_difficult=False,
            extra_object_features={"id": np.int64, "area": np.float32, "is_crowd": np.bool_},
            extra_features={"image/id": np.int64}),
        metadata=tfds.core.MetadataDict(category_ids=list(COCO_CATEGORY_IDS)),
        homepage="https://cocodataset.org/",
        disable_shuffling=True,  # record i = image i of the annotation file, in its order
    )

  def _split_generators(self, dl_manager):
    # The private attribute: the public `manual_dir` raises its own, less specific error first.
    manual_dir = os.fspath(getattr(dl_manager, "_manual_dir", None) or "")
    message = missing_files_message(manual_dir)
    if message:
      raise FileNotFoundError(message)
    return report.with_progress({split: self._generate_examples(manual_dir, split)
                                 for split in _SPLITS})

  def _generate_examples(self, manual_dir, split):
    annotation_file, image_folder = _SPLITS[split]
    prepare_report = report.for_builder(self)
    files = _files(manual_dir)
    try:
      data = json.loads(files.read(annotation_file))
      source = files.describe_member(annotation_file)
      _check_categories(data.get("categories", []), annotation_file)
      label_of = {cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)}
      per_image = {}
      for ann in data.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
      for image in data["images"]:
        member = f"{image_folder}/{image['file_name']}"
        try:
          objects = self._objects(image, per_image.get(image["id"], []), label_of, source,
                                  lambda what, n: prepare_report.count(split, what, source, n))
          if files.find(member) is None:
            raise FileNotFoundError(f"coco/2017 {split}: image {member} of {annotation_file} is in "
                                    f"none of {files.describe()}; copy the complete {image_folder}/ "
                                    "folder.")
          # Decoded once here, so that training never meets an image it cannot decode.
          checked = image_files.checked_image(files.read(member), files.describe_member(member))
        except report.BadAnnotation as e:
          prepare_report.bad(split, e)
          continue
        yield image["id"], {"image": checked.encoded, "image/filename": image["file_name"],
                            "image/id": image["id"], "objects": objects}
      logging.info("coco/2017 %s: %d images", split, len(data["images"]))
    finally:
      files.close()

  @staticmethod
  def _objects(image, anns, label_of, source, counts):
    """TFDS objects of one image; counts(what, n) hears of clipped and inverted boxes."""
    width, height = float(image.get("width", 0)), float(image.get("height", 0))
    name = f"image {image['id']} ({image.get('file_name')})"
    if not (width > 0 and height > 0):
      raise report.BadAnnotation(source, f"{name} has width {width:g} and height {height:g}",
                                 "use the official annotation file")
    objects = []
    for ann in anns:
      if ann.get("category_id") not in label_of:
        raise report.BadAnnotation(
            source, f"annotation {ann.get('id')} of {name} has category_id "
            f"{ann.get('category_id')!r}, not one of the 80 COCO categories",
            "use the official annotation file")
      x, y, w, h = (float(v) for v in ann["bbox"])
      raw = np.array([y / height, x / width, (y + h) / height, (x + w) / width])
      ymin, xmin, ymax, xmax = np.clip(raw, 0.0, 1.0)
      counts("boxes_clipped", int(np.any((raw < 0) | (raw > 1))))
      counts("boxes_inverted", int(w < 0 or h < 0))
      objects.append({"id": ann["id"], "area": ann.get("area", w * h),
                      "bbox": tfds.features.BBox(ymin, xmin, max(ymax, ymin), max(xmax, xmin)),
                      "label": label_of[ann["category_id"]],
                      "is_crowd": bool(ann.get("iscrowd", 0))})
    return objects
