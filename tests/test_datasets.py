"""Data sets: the registry, and every builder through the real TFDS code path on tiny data made here.

The synthetic set is generated; VOC, COCO and TT100K are written by the tests in the official file
layouts (VOC as the official tar files and as an extracted VOCdevkit/ folder).
"""

import io
import json
import os
import tarfile

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from mdssd_jax.data import pipeline
from mdssd_jax.data import prepare
from mdssd_jax.data import registry
from mdssd_jax.data import report
from mdssd_jax.data import synthetic

tfds.disable_progress_bar()


def _config(tmp_path, name, **data):
  c = common.base_config()
  c.data.name = name
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.num_workers = 0
  for key, value in data.items():
    c.data[key] = value
  return c


def _jpeg(image_rgb):
  ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image_rgb[..., ::-1]),
                             [cv2.IMWRITE_JPEG_QUALITY, 98])
  assert ok
  return encoded.tobytes()


def _no_augmentation(c):
  c.augment.photometric_prob = 0.0
  c.augment.channel_swap_prob = 0.0
  c.augment.expand_prob = 0.0
  c.augment.crop_min_ious = (None,)
  c.augment.flip_prob = 0.0


# ---- registry -------------------------------------------------------------------------------------

def test_unknown_name_lists_known_ones():
  c = common.base_config()
  c.data.name = "vocc/2007"
  with pytest.raises(ValueError) as err:
    registry.get_dataset(c.data)
  for name in ("synthetic_small_objects", "voc/2007", "voc/2012", "voc/2007+2012", "coco/2017", "tt100k"):
    assert name in str(err.value)


def test_dataset_infos():
  c = common.base_config()
  c.data.name = "voc/2007+2012"
  voc = registry.get_dataset(c.data)
  assert voc.num_classes == 20 and voc.class_names[0] == "aeroplane" and voc.class_names[-1] == "tvmonitor"
  c.data.name = "coco/2017"
  coco = registry.get_dataset(c.data)
  assert coco.num_classes == 80 and coco.class_names[0] == "person" and coco.class_names[-1] == "toothbrush"
  assert coco.label_to_category_id[1] == 1 and coco.label_to_category_id[80] == 90
  assert len(set(coco.label_to_category_id.values())) == 80
  c.data.name = "tt100k"
  tt = registry.get_dataset(c.data)
  assert tt.num_classes == 45 and "pl50" in tt.class_names and tt.train_crop_size_px == 512
  c.data.tt100k.classes = ("pl50", "p11")
  assert registry.get_dataset(c.data).class_names == ["pl50", "p11"]
  c.data.name = "synthetic_small_objects"
  c.data.synthetic.num_classes = 4
  assert registry.get_dataset(c.data).class_names == ["circle", "square", "triangle", "plus"]


# ---- synthetic ------------------------------------------------------------------------------------

def _synthetic_config(tmp_path, seed=7):
  c = _config(tmp_path, "synthetic_small_objects")
  c.data.synthetic.update(num_train=16, num_test=8, image_size_px=96, seed=seed, min_object_px=6,
                          max_object_px=24, max_objects=6)
  return c


def _read_split(c, split):
  info = registry.get_dataset(c.data)
  name = info.parts[0].tfds_name
  return tfds.data_source(name, split=split, data_dir=c.data.data_dir, download=False)


def test_synthetic_builds_and_draws_what_it_labels(tmp_path):
  c = _synthetic_config(tmp_path)
  summary = prepare.prepare(c)
  assert list(summary.values()) == [{"train": 16, "test": 8}]
  spec = synthetic.spec_from_config(c.data.synthetic)
  train = _read_split(c, "train")
  assert len(train) == 16 and len(_read_split(c, "test")) == 8
  num_boxes = 0
  for index in range(len(train)):
    record = train[index]
    image = record["image"]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    bbox = np.asarray(record["objects"]["bbox"], np.float64).reshape(-1, 4)
    labels = np.asarray(record["objects"]["label"])
    assert np.all((bbox >= 0) & (bbox <= 1))
    assert np.all(bbox[:, 2] > bbox[:, 0]) and np.all(bbox[:, 3] > bbox[:, 1])
    assert np.all((labels >= 0) & (labels < spec.num_classes))
    sides_px = np.stack([bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]], 1) * 96
    assert np.all(sides_px.max(1) <= spec.max_object_px + 1e-3)
    assert np.all(sides_px.max(1) >= spec.min_object_px / spec.aspect_jitter - 1e-3)
    # The stored image is the rendered one (up to JPEG), and the render without its class shapes
    # differs from it inside every box and nowhere else.
    drawn = synthetic.render(spec, "train", index)[0].astype(np.float64)
    assert np.abs(image - drawn).mean() < 6
    plain = synthetic.render(spec, "train", index, draw_objects=False)[0].astype(np.float64)
    diff = np.abs(drawn - plain).sum(-1)
    outside = np.ones((96, 96), bool)
    for ymin, xmin, ymax, xmax in bbox * 96:
      box_diff = diff[int(ymin):int(np.ceil(ymax)), int(xmin):int(np.ceil(xmax))]
      assert box_diff.mean() > 20, (index, box_diff.mean())
      outside[int(ymin):int(np.ceil(ymax)), int(xmin):int(np.ceil(xmax))] = False
    assert np.all(diff[outside] == 0)
    # Tight boxes: where an object overlaps no other box, the changed pixels span its box.
    for k, (ymin, xmin, ymax, xmax) in enumerate(bbox * 96):
      others = np.delete(bbox * 96, k, axis=0)
      if np.any((others[:, 0] < ymax + 3) & (others[:, 2] > ymin - 3) &
                (others[:, 1] < xmax + 3) & (others[:, 3] > xmin - 3)):
        continue
      y0, x0 = max(0, int(ymin) - 3), max(0, int(xmin) - 3)
      ys, xs = np.nonzero(diff[y0:int(ymax) + 4, x0:int(xmax) + 4] > 60)
      assert abs(ys.min() + y0 - ymin) <= 1.5 and abs(ys.max() + 1 + y0 - ymax) <= 1.5
      assert abs(xs.min() + x0 - xmin) <= 1.5 and abs(xs.max() + 1 + x0 - xmax) <= 1.5
    num_boxes += len(labels)
  assert num_boxes >= 16  # many objects, not a near-empty set


def test_synthetic_is_reproducible_and_seeded(tmp_path):
  first = _synthetic_config(tmp_path / "a", seed=7)
  again = _synthetic_config(tmp_path / "b", seed=7)
  other = _synthetic_config(tmp_path / "c", seed=8)
  for c in (first, again, other):
    prepare.prepare(c)
  for index in (0, 5):
    a, b, o = (_read_split(c, "test")[index] for c in (first, again, other))
    assert np.array_equal(a["image"], b["image"])
    assert np.array_equal(np.asarray(a["objects"]["bbox"]), np.asarray(b["objects"]["bbox"]))
    assert not np.array_equal(a["image"], o["image"])
  # The data set's name hashes every value that shapes it: another seed is another folder.
  assert (registry.get_dataset(first.data).parts[0].tfds_name
          != registry.get_dataset(other.data).parts[0].tfds_name)


def test_synthetic_parallel_generation_equals_serial(monkeypatch):
  spec = synthetic.SyntheticSpec(image_size_px=32, num_train=8, num_test=1, min_object_px=4,
                                 max_object_px=12)
  serial = list(synthetic._examples(spec, "train", 8))
  monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 4)   # 8 images -> 2 worker processes
  parallel = list(synthetic._examples(spec, "train", 8))
  assert [i for i, _ in parallel] == list(range(8))
  for (_, a), (_, b) in zip(serial, parallel):
    assert a["image"] == b["image"] and a["objects"]["label"] == b["objects"]["label"]
    np.testing.assert_array_equal(np.asarray(a["objects"]["bbox"]), np.asarray(b["objects"]["bbox"]))


# ---- TT100K ---------------------------------------------------------------------------------------

SIGN_RGB = (230, 20, 20)


def _write_tt100k(root):
  """A TT100K folder in the official layout; returns {image id: [(category, (x0, y0, x1, y1))]}.

  Image "4" (train) and "6" (test) are truncated JPEGs; "3" has only a sign of an unlisted class.
  """
  height, width = 300, 400
  signs = {
      "1": [("pl50", (40, 50, 60, 70)), ("p11", (200, 100, 212, 116)), ("pl5x", (300, 200, 316, 216))],
      "2": [("p11", (350, 250, 380, 280))],
      "3": [("ip", (100, 100, 120, 120))],
      "4": [("pl50", (10, 10, 30, 30))],
      "5": [("pl50", (150, 120, 174, 140)), ("p11", (20, 200, 33, 214))],
      "6": [("p11", (50, 50, 70, 70))],
      "9": [("pl50", (50, 50, 70, 70))],
  }
  split_of = {"1": "train", "2": "train", "3": "train", "4": "train", "5": "test", "6": "test",
              "9": "other"}
  rng = np.random.default_rng(0)
  imgs = {}
  for image_id, objects in signs.items():
    image = rng.integers(60, 180, size=(height, width, 3)).astype(np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 3)  # smooth, so the signs' edges stay sharp in the JPEG
    for _, (x0, y0, x1, y1) in objects:
      image[y0:y1, x0:x1] = SIGN_RGB
    encoded = _jpeg(image)
    if image_id in ("4", "6"):
      encoded = encoded[:len(encoded) // 2]  # a partial download: header fine, data cut off
    path = f"{split_of[image_id]}/{image_id}.jpg"
    os.makedirs(os.path.join(root, split_of[image_id]), exist_ok=True)
    with open(os.path.join(root, path), "wb") as f:
      f.write(encoded)
    imgs[image_id] = {"path": path, "id": int(image_id), "objects": [
        {"bbox": {"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}, "category": cat}
        for cat, (x0, y0, x1, y1) in objects]}
  with open(os.path.join(root, "annotations.json"), "w") as f:
    json.dump({"types": ["pl50", "p11", "pl5x", "ip"], "imgs": imgs}, f)
  return signs, (height, width)


def test_tt100k_missing_files_are_named(tmp_path):
  c = _config(tmp_path, "tt100k", manual_dir=str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError) as err:
    prepare.prepare(c)
  assert os.path.join(str(tmp_path / "empty"), "annotations.json") in str(err.value)
  assert "train/" in str(err.value) and "test/" in str(err.value)
  with pytest.raises(FileNotFoundError, match="--mode=prepare"):
    pipeline.make_train_iterator(c)


def test_tt100k_builds_filters_classes_and_crops_at_full_resolution(tmp_path):
  root = str(tmp_path / "tt100k")
  signs, (height, width) = _write_tt100k(root)
  c = _config(tmp_path, "tt100k", manual_dir=root, max_boxes=4)
  c.data.tt100k.classes = ("pl50", "p11")
  c.data.tt100k.train_crop_size_px = 128
  c.data.tt100k.crop_on_object_prob = 1.0
  c.model.input_size_px = 128   # crop size = input size: no resize, signs keep their pixel size
  c.model.num_classes = 2
  c.train.global_batch_size = 2
  c.eval.batch_size = 2
  _no_augmentation(c)
  # The truncated images are found at prepare: refused by name, or skipped and counted.
  with pytest.raises(report.BadAnnotation, match=r"train/4.jpg: the image cannot be decoded"):
    prepare.prepare(c)
  c.data.bad_annotations = "skip"
  summary = prepare.prepare(c)
  assert list(summary.values()) == [{"train": 3, "test": 1}]
  builder = registry.prepared_builders(registry.get_dataset(c.data), c.data.data_dir, (0,))[0]
  skipped = report.read(builder.data_path)["splits"]
  assert [os.path.basename(e["file"]) for e in skipped["train"]["skipped"]] == ["4.jpg"]
  assert [os.path.basename(e["file"]) for e in skipped["test"]["skipped"]] == ["6.jpg"]

  # Records: classes outside the list dropped, boxes normalised by the image's own size.
  train = _read_split(c, "train")
  record = train[0]   # image "1"
  assert record["image/filename"] in (b"train/1.jpg", "train/1.jpg")
  np.testing.assert_array_equal(record["objects"]["label"], [0, 1])
  np.testing.assert_allclose(np.asarray(record["objects"]["bbox"]),
                             [[50 / height, 40 / width, 70 / height, 60 / width],
                              [100 / height, 200 / width, 116 / height, 212 / width]], atol=1e-6)
  assert len(train[2]["objects"]["label"]) == 0   # image "3": an unlisted sign only

  # Training crops: signs at their real size in pixels, really there; no damaged image left.
  sizes = {(x1 - x0, y1 - y0) for objects in signs.values() for cat, (x0, y0, x1, y1) in objects
           if cat in ("pl50", "p11")}
  iterator = pipeline.make_train_iterator(c)
  seen = 0
  for _ in range(6):
    batch = next(iterator)
    assert batch["image"].shape == (2, 128, 128, 3)
    for image, boxes, labels in zip(batch["image"], batch["boxes"], batch["labels"]):
      for box in boxes[labels > 0] * 128:
        w, h = box[2] - box[0], box[3] - box[1]
        if box[0] > 0 and box[1] > 0 and box[2] < 128 and box[3] < 128:   # not cut by the crop
          assert min(abs(w - sw) + abs(h - sh) for sw, sh in sizes) < 1e-3, (w, h)
          x0, y0, x1, y1 = np.round(box).astype(int)
          centre = image[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3).mean(0)
          assert np.abs(centre - SIGN_RGB).max() < 25
          seen += 1
  assert seen >= 6
  assert iterator.stats.corrupt_images == 0

  # Eval: full images available; the damaged one was left out at prepare, the batch padded.
  batches = pipeline.make_eval_batches(c, with_original_images=True)
  (batch,) = list(batches)
  np.testing.assert_array_equal(batch["batch_mask"], [True, False])
  np.testing.assert_array_equal(batch["image_id"], [0, -1])
  np.testing.assert_array_equal(batch["orig_size"][0], [height, width])
  assert batch["original_image"][0].shape == (height, width, 3) and batch["original_image"][1] is None
  np.testing.assert_allclose(batch["boxes"][0, :2] * [width, height, width, height],
                             [[150, 120, 174, 140], [20, 200, 33, 214]], atol=1e-3)
  np.testing.assert_array_equal(batch["labels"][0], [1, 2, 0, 0])
  assert batches.stats.corrupt_images == 0


# ---- VOC ------------------------------------------------------------------------------------------

def _voc_xml(width, height, objects):
  parts = [f"<annotation><folder>VOC</folder><size><width>{width}</width><height>{height}</height>"
           "<depth>3</depth></size>"]
  for name, difficult, (x0, y0, x1, y1) in objects:
    parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                 f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                 f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
  return ("".join(parts) + "</annotation>").encode()


def _voc_files(year, images, lists):
  """{member path: bytes} of a VOCdevkit tree."""
  rng = np.random.default_rng(int(year))
  files = {}
  for image_id, (width, height, objects) in images.items():
    files[f"VOCdevkit/VOC{year}/JPEGImages/{image_id}.jpg"] = _jpeg(
        rng.integers(0, 255, size=(height, width, 3)).astype(np.uint8))
    files[f"VOCdevkit/VOC{year}/Annotations/{image_id}.xml"] = _voc_xml(width, height, objects)
  for name, ids in lists.items():
    files[f"VOCdevkit/VOC{year}/ImageSets/Main/{name}.txt"] = ("\n".join(ids) + "\n").encode()
  return files


def _write_tar(path, files):
  with tarfile.open(path, "w") as tar:
    for member, data in files.items():
      info = tarfile.TarInfo(member)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


VOC07_TRAINVAL = {"000005": (64, 48, [("chair", False, (10, 12, 30, 40)), ("dog", True, (1, 1, 64, 48))]),
                  "000007": (50, 40, [("car", False, (5, 6, 45, 30))]),
                  "000009": (40, 60, [("person", False, (2, 3, 20, 50)), ("horse", False, (8, 9, 39, 59))])}
VOC07_TEST = {"000001": (60, 40, [("dog", False, (3, 4, 50, 38)), ("person", True, (20, 2, 30, 20))]),
              "000002": (30, 30, [("train", False, (1, 2, 29, 28))])}
VOC12 = {"2008_000001": (40, 40, [("cat", False, (4, 4, 36, 36))]),
         "2008_000002": (44, 36, [("bird", False, (2, 2, 10, 10))])}


def test_voc_missing_files_are_named(tmp_path):
  c = _config(tmp_path, "voc/2012", manual_dir=str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError) as err:
    prepare.prepare(c)
  assert os.path.join(str(tmp_path / "empty"), "VOCtrainval_11-May-2012.tar") in str(err.value)


def test_voc_from_official_tars_and_folders(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  # VOC2007 as the two official tar files, VOC2012 as an extracted VOCdevkit/ folder.
  _write_tar(manual / "VOCtrainval_06-Nov-2007.tar",
             _voc_files("2007", VOC07_TRAINVAL, {"train": ["000005", "000007"], "val": ["000009"],
                                                 "trainval": ["000005", "000007", "000009"]}))
  _write_tar(manual / "VOCtest_06-Nov-2007.tar", _voc_files("2007", VOC07_TEST,
                                                            {"test": ["000001", "000002"]}))
  for member, data in _voc_files("2012", VOC12, {"train": ["2008_000001"],
                                                 "val": ["2008_000002"]}).items():
    (manual / member).parent.mkdir(parents=True, exist_ok=True)
    (manual / member).write_bytes(data)

  c = _config(tmp_path, "voc/2007+2012", manual_dir=str(manual), train_split="trainval",
              eval_split="test")
  summary = prepare.prepare(c)
  assert summary == {"mdssd_voc/2007": {"train": 2, "validation": 1, "test": 2},
                     "mdssd_voc/2012": {"train": 1, "validation": 1}}

  # Records as TFDS voc has them: boxes / size as (ymin, xmin, ymax, xmax), difficult flags.
  labels = list(registry.get_dataset(c.data).class_names)
  record = tfds.data_source("mdssd_voc/2007", split="train", data_dir=c.data.data_dir)[0]
  assert record["image"].shape == (48, 64, 3)
  np.testing.assert_allclose(np.asarray(record["objects"]["bbox"]),
                             [[12 / 48, 10 / 64, 40 / 48, 30 / 64], [1 / 48, 1 / 64, 1, 1]], atol=1e-6)
  np.testing.assert_array_equal(record["objects"]["label"], [labels.index("chair"), labels.index("dog")])
  np.testing.assert_array_equal(record["objects"]["is_difficult"], [False, True])

  # voc/2007+2012 trains on trainval of both years and evaluates on 2007 test.
  train_source = registry.open_split(registry.get_dataset(c.data), c.data.data_dir, "trainval")
  assert len(train_source) == 3 + 2
  assert train_source[4]["image/filename"] in (b"2008_000002.jpg", "2008_000002.jpg")
  c.eval.batch_size = 4
  (batch,) = list(pipeline.make_eval_batches(c))
  np.testing.assert_array_equal(batch["image_id"], [0, 1, -1, -1])
  np.testing.assert_array_equal(batch["orig_size"][:2], [[40, 60], [30, 30]])
  np.testing.assert_allclose(batch["boxes"][0, :2], [[3 / 60, 4 / 40, 50 / 60, 38 / 40],
                                                     [20 / 60, 2 / 40, 30 / 60, 20 / 40]], atol=1e-6)
  np.testing.assert_array_equal(batch["labels"][0, :3], [labels.index("dog") + 1,
                                                         labels.index("person") + 1, 0])
  np.testing.assert_array_equal(batch["difficult"][0, :2], [False, True])


# ---- COCO -----------------------------------------------------------------------------------------

def test_coco_from_official_files(tmp_path):
  manual = tmp_path / "coco"
  (manual / "annotations").mkdir(parents=True)
  rng = np.random.default_rng(0)
  categories = [{"id": 1, "name": "person", "supercategory": "person"},
                {"id": 18, "name": "dog", "supercategory": "animal"},
                {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
  splits = {
      "train2017": {10: (64, 48, [(1, (4, 6, 20, 10), 0), (90, (30, 20, 10, 8), 0), (1, (0, 0, 64, 48), 1)]),
                    20: (32, 32, [])},
      "val2017": {30: (40, 50, [(18, (5, 5, 20, 30), 0), (1, (0, 0, 40, 50), 1)])},
  }
  ann_id = 100
  for folder, images in splits.items():
    (manual / folder).mkdir()
    data = {"images": [], "annotations": [], "categories": categories}
    for image_id, (width, height, anns) in images.items():
      file_name = f"{image_id:012d}.jpg"
      (manual / folder / file_name).write_bytes(
          _jpeg(rng.integers(0, 255, size=(height, width, 3)).astype(np.uint8)))
      data["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
      for category_id, bbox, crowd in anns:
        ann_id += 1
        data["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                    "bbox": list(bbox), "area": bbox[2] * bbox[3], "iscrowd": crowd})
    name = "instances_train2017.json" if folder == "train2017" else "instances_val2017.json"
    (manual / "annotations" / name).write_text(json.dumps(data))

  c = _config(tmp_path, "coco/2017", manual_dir=str(manual), train_split="train",
              eval_split="validation")
  assert prepare.prepare(c) == {"mdssd_coco/2017": {"train": 2, "validation": 1}}
  info = registry.get_dataset(c.data)
  train = tfds.data_source("mdssd_coco/2017", split="train", data_dir=c.data.data_dir)
  record = train[0]
  assert int(record["image/id"]) == 10 and record["image"].shape == (48, 64, 3)
  # Labels are contiguous (0-based in TFDS); the DatasetInfo maps label + 1 back to the category id.
  assert [info.label_to_category_id[int(l) + 1] for l in record["objects"]["label"]] == [1, 90, 1]
  np.testing.assert_allclose(np.asarray(record["objects"]["bbox"])[:2],
                             [[6 / 48, 4 / 64, 16 / 48, 24 / 64], [20 / 48, 30 / 64, 28 / 48, 40 / 64]],
                             atol=1e-6)
  np.testing.assert_array_equal(record["objects"]["is_crowd"], [False, False, True])
  assert len(train[1]["objects"]["label"]) == 0   # an image without annotations is kept

  # Training never sees crowd regions (keep_difficult or not); evaluation flags them as ignored.
  source = registry.open_split(info, c.data.data_dir, "train")
  decoded = pipeline._DecodeTrain("coco/2017", keep_difficult=True).map({"index": 0, "record": source[0]})
  np.testing.assert_array_equal(decoded["labels"], [1, 80])
  (batch,) = list(pipeline.make_eval_batches(c))
  # dog (category 18) is the 17th of the 80 categories: label 17.
  np.testing.assert_array_equal(batch["labels"][0, :3], [17, 1, 0])
  np.testing.assert_array_equal(batch["difficult"][0, :2], [False, True])
  np.testing.assert_allclose(batch["boxes"][0, 0], [5 / 40, 5 / 50, 25 / 40, 35 / 50], atol=1e-6)


def test_coco_eval_batches_carry_the_annotated_area(tmp_path):
  """`area` (B, M): COCO's annotated area in pixels of the original image, in the order of the
  boxes, -1 for padding; the box area would be different (a segment is smaller than its box)."""
  manual = tmp_path / "coco"
  (manual / "annotations").mkdir(parents=True)
  categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
  anns = {"train2017": [], "val2017": [  # (category, bbox x, y, w, h, area, iscrowd)
      (18, (5, 5, 40, 30), 700.0, 0), (1, (50, 10, 35, 35), 1000.5, 0), (1, (0, 0, 90, 60), 4000.0, 1)]}
  for folder, image_anns in anns.items():
    (manual / folder).mkdir()
    image = {"id": 7, "file_name": "000000000007.jpg", "width": 90, "height": 60}
    (manual / folder / image["file_name"]).write_bytes(
        _jpeg(np.random.default_rng(1).integers(0, 255, size=(60, 90, 3)).astype(np.uint8)))
    data = {"images": [image], "categories": categories, "annotations": [
        {"id": k + 1, "image_id": 7, "category_id": cat, "bbox": list(bbox), "area": area,
         "iscrowd": crowd} for k, (cat, bbox, area, crowd) in enumerate(image_anns)]}
    name = "instances_train2017.json" if folder == "train2017" else "instances_val2017.json"
    (manual / "annotations" / name).write_text(json.dumps(data))
  c = _config(tmp_path, "coco/2017", manual_dir=str(manual), eval_split="validation", max_boxes=4)
  c.eval.batch_size = 2
  prepare.prepare(c)
  (batch,) = list(pipeline.make_eval_batches(c))
  assert batch["area"].dtype == np.float32 and batch["area"].shape == batch["labels"].shape == (2, 4)
  np.testing.assert_allclose(batch["area"][0], [700.0, 1000.5, 4000.0, -1.0])
  np.testing.assert_array_equal(batch["area"][1], [-1.0] * 4)   # a padding example
  np.testing.assert_array_equal(batch["difficult"][0, :3], [False, False, True])
  box_px = batch["boxes"][0, 0] * [90, 60, 90, 60]
  assert (box_px[2] - box_px[0]) * (box_px[3] - box_px[1]) == pytest.approx(1200.0, abs=1e-3)
