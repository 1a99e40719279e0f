"""A user's own files (config.data.name = "custom"): COCO JSON, YOLO and VOC folders, and fine-tuning.

The generated demo set is written out in each format by tests/custom_formats.py (writers that follow
each format's published layout), prepared, and compared with the native builder's records: the same
image bytes, boxes within half a pixel, the same class of every object by name. Every kind of bad
input gets its own message; fine-tuning loads what fits from a checkpoint and from a file with the
key names and shapes of torchvision's ssd300_vgg16.
"""

import io
import json
import os
import re
import shutil

import cv2
import numpy as np
from PIL import Image, ImageOps
import pytest

from mdssd_jax.data import custom
from mdssd_jax.data import prepare
from mdssd_jax.data import registry
from mdssd_jax.data import report
from tests import custom_formats
from tests import helpers

# COCO category ids of the six demo classes: neither contiguous, nor from 1, nor in class order.
CATEGORY_IDS = (90, 3, 17, 5, 44, 12)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
  """The native records of the tiny generated set: {"train": [...], "test": [...]}, class names."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  config = helpers.tiny_config(data_dir)
  info = registry.get_dataset(config.data)
  splits = {s: custom_formats.records_of(registry.open_split(info, data_dir, s))
            for s in ("train", "test")}
  return splits, list(info.class_names)


@pytest.fixture(scope="module")
def sources(native, tmp_path_factory):
  """The native records written as a COCO JSON export, an ultralytics folder and a VOC folder."""
  (splits, names), root = native, tmp_path_factory.mktemp("sources")
  coco_dir = root / "coco"
  custom_formats.write_coco(splits["train"], names, str(coco_dir / "annotations" / "train.json"),
                            str(coco_dir / "images"), CATEGORY_IDS, subfolder="sub folder")
  custom_formats.write_coco(splits["test"], names, str(coco_dir / "annotations" / "val.json"),
                            str(coco_dir / "images"), CATEGORY_IDS)
  yolo_yaml = custom_formats.write_yolo({"train": splits["train"], "val": splits["test"]}, names,
                                        str(root / "yolo"), names_as_dict=True)
  custom_formats.write_voc({"train": splits["train"], "test": splits["test"]}, names, str(root / "voc"))
  return {
      "coco": {"data.custom.train": str(coco_dir / "annotations" / "train.json"),
               "data.custom.train_images": str(coco_dir / "images"),
               "data.custom.eval": str(coco_dir / "annotations" / "val.json"),
               "data.custom.eval_images": str(coco_dir / "images")},
      "yolo": {"data.custom.train": yolo_yaml},
      "voc": {"data.custom.train": str(root / "voc"), "data.custom.train_split": "train",
              "data.custom.eval_split": "test"},
  }


def custom_config(data_dir, **overrides):
  base = {"data.name": "custom", "model.num_classes": 0, "data.eval_split": "validation",
          "evals.voc.type": "auto", "eval.best_metric": "voc/auto"}
  config = helpers.tiny_config(str(data_dir), **{**base, **overrides})
  config.evals.voc.coco_backend = "pycocotools"
  return config


def prepared(config):
  prepare.prepare(config)
  info = registry.get_dataset(config.data)
  data_dir = config.data.data_dir
  return info, {split: custom_formats.records_of(registry.open_split(info, data_dir, split))
                for split in ("train", "validation")}


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_each_format_prepares_the_native_records(native, sources, tmp_path, capsys, fmt):
  (splits, names) = native
  info, got = prepared(custom_config(tmp_path, **sources[fmt]))
  first_line = capsys.readouterr().out.splitlines()[0]
  assert first_line.startswith("custom data: ") and {"coco": "COCO JSON", "yolo": "YOLO",
                                                      "voc": "VOC folder"}[fmt] in first_line
  if fmt == "voc":   # names from the XMLs, sorted
    assert list(info.class_names) == sorted(names)
  elif fmt == "coco":   # category-id order, and the ids kept for the COCO evaluator
    assert list(info.class_names) == [n for _, n in sorted(zip(CATEGORY_IDS, names))]
    assert {info.class_names[l - 1]: cid for l, cid in info.label_to_category_id.items()} == dict(
        zip(names, CATEGORY_IDS))
  else:
    assert list(info.class_names) == names and info.label_to_category_id is None
  for split, native_split in (("train", "train"), ("validation", "test")):
    assert len(got[split]) == len(splits[native_split])
    for want, have in zip(splits[native_split], got[split]):
      assert have["image"] == want["image"]
      assert [info.class_names[l] for l in have["labels"]] == [names[l] for l in want["labels"]]
      # VOC's integer corners are the only rounding: within half a pixel of the 96 px image.
      np.testing.assert_allclose(have["boxes_xyxy"] * 96, want["boxes_xyxy"] * 96, atol=0.5 + 1e-3)
  data_path = registry.prepared_builders(info, str(tmp_path), (0,))[0].data_path
  totals = report.read(data_path)["splits"]["train"]["totals"]
  boxes = sum(len(r["labels"]) for r in splits["train"])
  assert totals == dict(images_in_files=len(splits["train"]), images_stored=len(splits["train"]),
                        images_skipped=0, boxes_in_files=boxes, boxes_stored=boxes, boxes_skipped=0)


def test_without_eval_a_seeded_share_is_held_out(native, sources, tmp_path):
  splits, _ = native
  yaml_path = sources["yolo"]["data.custom.train"]
  text = open(yaml_path).read().replace("val: images/val\n", "")
  no_val = os.path.join(os.path.dirname(yaml_path), "no_val.yaml")
  with open(no_val, "w") as f:
    f.write(text)
  runs = []
  for k in range(2):   # two data folders: the same split both times
    _, got = prepared(custom_config(tmp_path / str(k), **{"data.custom.train": no_val,
                                                          "data.custom.holdout_fraction": 0.25}))
    runs.append({s: sorted(r["image"] for r in got[s]) for s in got})
  os.remove(no_val)   # prepared data needs its source no more (training on another machine)
  config = custom_config(tmp_path / "0", **{"data.custom.train": no_val,
                                            "data.custom.holdout_fraction": 0.25})
  assert len(registry.open_split(registry.get_dataset(config.data), config.data.data_dir,
                                 "validation")) == len(runs[0]["validation"])
  with pytest.raises(FileNotFoundError, match="no_val.yaml: no such file or folder"):
    registry.get_dataset(custom_config(tmp_path / "new", **{"data.custom.train": no_val}).data)
  n = len(splits["train"])
  assert len(runs[0]["validation"]) == round(0.25 * n) and len(runs[0]["train"]) == n - round(0.25 * n)
  assert runs[0] == runs[1]
  assert not set(runs[0]["train"]) & set(runs[0]["validation"])


def _bad_coco(sources, tmp_path, mutate):
  src = sources["coco"]["data.custom.train"]
  data = json.load(open(src))
  mutate(data)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(data))
  return {"data.custom.train": str(path), "data.custom.train_images": sources["coco"][
      "data.custom.train_images"]}


COCO_CASES = {
    "zero_width": (lambda d: d["annotations"][0]["bbox"].__setitem__(2, 0), "width or height <= 0"),
    "unknown_category": (lambda d: d["annotations"][0].__setitem__("category_id", 999),
                         "category_id 999 is not one of the `categories` ids"),
    "orphan": (lambda d: d["annotations"][0].__setitem__("image_id", 4242),
               "refers to image id 4242, which is not in `images`"),
    "missing_image": (lambda d: d["images"][0].__setitem__("file_name", "sub folder/gone.jpg"),
                      "gone.jpg does not exist"),
    "dot_dot": (lambda d: d["images"][0].__setitem__("file_name", "../../etc/passwd"),
                "leads outside"),
    "absolute": (lambda d: d["images"][0].__setitem__("file_name", "/etc/passwd"),
                 "is not a path relative to"),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_bad_coco_annotations_are_named_or_skipped_and_counted(sources, tmp_path, case):
  mutate, message = COCO_CASES[case]
  overrides = _bad_coco(sources, tmp_path, mutate)
  with pytest.raises(report.BadAnnotation, match=message) as raised:
    prepare.prepare(custom_config(tmp_path / "error", **overrides))
  assert "bad.json" in str(raised.value) and "bad_annotations=skip" in str(raised.value)
  info, _ = prepared(custom_config(tmp_path / "skip", **overrides, **{"data.bad_annotations": "skip"}))
  data_path = registry.prepared_builders(info, str(tmp_path / "skip"), (0,))[0].data_path
  split = report.read(data_path)["splits"]
  train, held = split["train"]["totals"], split["validation"]["totals"]
  data = json.load(open(overrides["data.custom.train"]))
  assert train["images_in_files"] + held["images_in_files"] == len(data["images"])
  assert train["boxes_in_files"] + held["boxes_in_files"] == len(data["annotations"])
  for t in (train, held):   # nothing lost silently: every image and box is stored or skipped
    assert t["images_stored"] + t["images_skipped"] == t["images_in_files"]
    assert t["boxes_stored"] + t["boxes_skipped"] == t["boxes_in_files"]
  assert len(split["train"]["skipped"]) + len(split["validation"]["skipped"]) == 1


def test_unparsable_files_and_unsafe_yaml_xml_are_refused(sources, tmp_path):
  broken = tmp_path / "broken.json"
  broken.write_text('{"images": [')
  with pytest.raises(report.BadAnnotation, match=r"broken.json, line 1: the JSON does not parse"):
    prepare.prepare(custom_config(tmp_path / "a", **{"data.custom.train": str(broken)}))
  broken_yaml = tmp_path / "broken.yaml"
  broken_yaml.write_text("path: .\ntrain: [images\nnames: [a]\n")
  with pytest.raises(report.BadAnnotation, match=r"broken.yaml, line \d+: the YAML does not parse"):
    prepare.prepare(custom_config(tmp_path / "y", **{"data.custom.train": str(broken_yaml)}))
  evil = tmp_path / "evil.yaml"
  marker = tmp_path / "ran"
  evil.write_text(f"path: .\ntrain: images\nnames: !!python/object/apply:os.system "
                  f"['touch {marker}']\n")
  with pytest.raises(report.BadAnnotation, match="tags that are refused"):
    prepare.prepare(custom_config(tmp_path / "b", **{"data.custom.train": str(evil)}))
  assert not marker.exists()
  voc = tmp_path / "voc"
  shutil.copytree(sources["voc"]["data.custom.train"], voc)
  xml = voc / "Annotations" / "train_0000.xml"
  xml.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx">]>'
                 + xml.read_text())
  with pytest.raises(report.BadAnnotation, match="DTD or entities, which are refused"):
    prepare.prepare(custom_config(tmp_path / "c", **{"data.custom.train": str(voc),
                                                     "data.custom.class_names": (
                                                         "circle", "diamond", "plus", "ring",
                                                         "square", "triangle")}))


def test_bad_yolo_lines_name_the_file_and_line(sources, tmp_path):
  root = tmp_path / "yolo"
  shutil.copytree(os.path.dirname(sources["yolo"]["data.custom.train"]), root)
  yaml_path = root / "data.yaml"
  yaml_path.write_text(yaml_path.read_text().replace(str(os.path.dirname(
      sources["yolo"]["data.custom.train"])), str(root)))
  label = sorted((root / "labels" / "train").iterdir())[0]
  good = label.read_text()
  for line, message in (("0 0.5 0.5 0.1", "is not five numbers"),
                        ("9 0.5 0.5 0.1 0.1", "class 9 is not one of the ids of `names`"),
                        ("0 0.5 0.5 0.0 0.1", "width 0 and height 0.1")):
    label.write_text(good + line + "\n")
    with pytest.raises(report.BadAnnotation, match=message) as raised:
      prepare.prepare(custom_config(tmp_path / line.replace(" ", "_"),
                                    **{"data.custom.train": str(yaml_path)}))
    assert f"{label.name}, line {len(good.splitlines()) + 1}" in str(raised.value)
  label.write_text(good)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "x.jpg").write_bytes(sorted((root / "images" / "train").iterdir())[0].read_bytes())
  os.symlink(outside / "x.jpg", root / "images" / "train" / "zz_link.jpg")
  with pytest.raises(report.BadAnnotation, match="zz_link.jpg' leads outside"):
    prepare.prepare(custom_config(tmp_path / "link", **{"data.custom.train": str(yaml_path)}))


def _encode(image, ext, exif_orientation=None):
  buffer = io.BytesIO()
  pil = Image.fromarray(image)
  if exif_orientation:
    exif = pil.getexif()
    exif[0x0112] = exif_orientation
    pil.save(buffer, "JPEG", quality=98, exif=exif)
  else:
    pil.save(buffer, ext)
  return buffer.getvalue()


def test_png_grey_rgba_exif_and_broken_images(tmp_path):
  """Boxes are drawn on the image as a viewer shows it; grey and RGBA PNGs become RGB."""
  root = tmp_path / "voc"
  for sub in ("Annotations", "JPEGImages"):
    (root / sub).mkdir(parents=True)
  # Smooth and asymmetric (JPEG keeps it to a few levels; a wrong turn or mirror is far off).
  yy, xx = np.mgrid[0:40, 0:60]
  rgb = np.stack([xx * 4, yy * 6, (xx // 20) * 80 + (yy // 20) * 40], -1).astype(np.uint8)
  files = {"grey": _encode(rgb[..., 0], "PNG"), "rgba": _encode(np.dstack([rgb, rgb[..., :1]]), "PNG"),
           "turned": _encode(rgb, "JPEG", exif_orientation=6)}   # shown rotated 90 degrees clockwise
  for name, data in files.items():
    (root / "JPEGImages" / f"{name}.{'jpg' if name == 'turned' else 'png'}").write_bytes(data)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    objects = [("dot", 2, 3, 12, 20)]
    (root / "Annotations" / f"{name}.xml").write_text(
        custom_formats.voc_xml(name, shown.width, shown.height, objects))
  info, got = prepared(custom_config(tmp_path / "tfds", **{"data.custom.train": str(root),
                                                           "data.custom.holdout_fraction": 0.34}))
  records = {r["file_name"]: r for split in got.values() for r in split}
  for name, data in files.items():
    record = records[f"{name}.{'jpg' if name == 'turned' else 'png'}"]
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(record["image"], np.uint8), cv2.IMREAD_COLOR),
                          cv2.COLOR_BGR2RGB)
    assert stored.shape == shown.shape
    tolerance = 3 if name == "turned" else 0   # re-encoded as a JPEG of quality 95
    assert np.abs(stored.astype(int) - shown).mean() <= tolerance
    h, w = shown.shape[:2]
    np.testing.assert_allclose(record["boxes_xyxy"][0], [2 / w, 3 / h, 12 / w, 20 / h], atol=1e-6)
  (root / "JPEGImages" / "grey.png").write_bytes(b"")
  with pytest.raises(report.BadAnnotation, match=r"grey.png: is empty"):
    prepare.prepare(custom_config(tmp_path / "t2", **{"data.custom.train": str(root)}))
  (root / "JPEGImages" / "grey.png").write_bytes(files["turned"][:len(files["turned"]) // 2])
  with pytest.raises(report.BadAnnotation, match=r"grey.png: the image cannot be decoded"):
    prepare.prepare(custom_config(tmp_path / "t3", **{"data.custom.train": str(root)}))


def test_boxes_outside_the_image_are_clipped_and_counted(sources, tmp_path):
  def mutate(d):
    d["annotations"][0]["bbox"][0] = -5.0
    d["annotations"][0]["bbox"][2] += 5.0
  info, _ = prepared(custom_config(tmp_path, **_bad_coco(sources, tmp_path, mutate)))
  data_path = registry.prepared_builders(info, str(tmp_path), (0,))[0].data_path
  splits = report.read(data_path)["splits"]
  assert splits["train"]["boxes_clipped"] + splits["validation"]["boxes_clipped"] == 1


def test_format_detection_and_class_count_errors(sources, tmp_path):
  with pytest.raises(ValueError, match="cannot tell its format"):
    custom.settings_from_config({"train": str(tmp_path)})
  settings = custom.settings_from_config({"train": sources["voc"]["data.custom.train"]})
  assert (settings.format, settings.format_reason) == ("voc", "detected: a folder with Annotations/")
  from mdssd_jax.state import experiment   # pylint: disable=g-import-not-at-top
  config = custom_config(tmp_path, **sources["yolo"], **{"model.num_classes": 4})
  prepare.prepare(config)
  with pytest.raises(ValueError, match="config.model.num_classes=4 but data set 'custom' has 6"):
    experiment.Setup(config)


# ---- training, evaluation and fine-tuning ------------------------------------------------------------

def test_train_evaluate_and_fine_tune_to_other_classes(native, sources, tmp_path):
  """COCO JSON trains with COCO's metrics; the checkpoint evaluates on the YOLO copy with VOC's; a
  VOC folder with three of the six classes fine-tunes from it: what fits loaded, class heads fresh."""
  import jax   # pylint: disable=g-import-not-at-top
  from mdssd_jax import models   # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import data_config   # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import evaluate   # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import train   # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import weights   # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / "tfds"
  steps = {"train.num_steps": 2, "train.checkpoint_every_steps": 2, "train.warmup_steps": 1}
  coco_config = custom_config(data_dir, **sources["coco"], **steps)
  prepare.prepare(coco_config)
  metrics = train.train_and_evaluate(coco_config, str(tmp_path / "coco_run"))
  assert {"voc/AP", "voc/AP50", "voc/AP_small"} <= set(metrics)   # COCO's metrics, by "auto"
  yolo_config = custom_config(data_dir, **sources["yolo"])
  prepare.prepare(yolo_config)
  metrics = evaluate.evaluate_checkpoint(yolo_config, str(tmp_path / "coco_run"))
  assert "voc/mAP" in metrics and "voc/AP_size/tiny" in metrics

  splits, names = native
  keep = names[:3]
  subset = {split: [dict(r, boxes_xyxy=r["boxes_xyxy"][r["labels"] < 3], labels=r["labels"][r["labels"] < 3])
                    for r in records] for split, records in splits.items()}
  custom_formats.write_voc(subset, names, str(tmp_path / "voc3"))
  fine = custom_config(data_dir, **{"data.custom.train": str(tmp_path / "voc3"),
                                    "data.custom.train_split": "train",
                                    "data.custom.eval_split": "test",
                                    "model.init_from": str(tmp_path / "coco_run"), **steps})
  prepare.prepare(fine)
  fine_resolved, info = data_config.resolve(fine)
  assert list(info.class_names) == sorted(keep) and fine_resolved.model.num_classes == 3
  model, _ = models.build_detector(fine_resolved)
  fresh_variables = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), models.abstract_forward(model, 96)[0])
  variables, convention, what = weights.init_from_checkpoint(str(tmp_path / "coco_run"),
                                                             fresh_variables)
  trained = weights.load_detector(coco_config, str(tmp_path / "coco_run")).variables
  for collection, path in (("params", ("vgg", "conv1_1", "conv", "kernel")),
                           ("params", ("fusion1_loc", "kernel")),
                           ("batch_stats", ("vgg", "conv1_1", "bn", "mean"))):
    got, want = variables[collection], trained[collection]
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_array_equal(got, np.asarray(want))
  assert "conv1_1" in what["loaded"] and "fusion1_loc" in what["loaded"]
  assert sorted(what["fresh"]) == sorted(f"{s}_conf" for s in fine.model.head_sources)
  # fusion1's head: 4 default boxes x (6 + 1) outputs in the checkpoint, 4 x (3 + 1) here.
  assert re.fullmatch(r"(bias \(28,\)|kernel \(3, 3, \d+, 28\)) there, \((\d+, )*16,?\) here",
                      what["fresh"]["fusion1_conf"]), what["fresh"]["fusion1_conf"]
  assert not np.any(variables["params"]["fusion1_conf"]["kernel"])   # left as initialised
  assert convention == trained_convention(coco_config)
  metrics = train.train_and_evaluate(fine, str(tmp_path / "fine_run"))
  assert set(metrics) >= {"voc/mAP"} and all(np.isfinite(v) for v in metrics.values())


def trained_convention(config):
  from mdssd_jax.core import pixels   # pylint: disable=g-import-not-at-top
  return pixels.as_convention(config.model.pixel)


TV_FEATURES = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512))


def torchvision_ssd300_state():
  """{key: array} with the key names and shapes of torchvision's ssd300_vgg16_coco-b556d3b4.pth
  (torchvision/models/detection/ssd.py: SSDFeatureExtractorVGG and SSDHead), each tensor distinct."""
  shapes = {}
  for index, cin, cout in TV_FEATURES:
    shapes[f"backbone.features.{index}"] = (cout, cin, 3, 3)
  for index in (1, 3, 5):                                   # conv5_1..3 after maxpool4
    shapes[f"backbone.extra.0.{index}"] = (512, 512, 3, 3)
  shapes["backbone.extra.0.7.1"] = (1024, 512, 3, 3)        # fc6, dilated
  shapes["backbone.extra.0.7.3"] = (1024, 1024, 1, 1)       # fc7
  for stage, (cin, mid, cout) in enumerate(((1024, 256, 512), (512, 128, 256), (256, 128, 256),
                                            (256, 128, 256)), start=1):
    shapes[f"backbone.extra.{stage}.0"] = (mid, cin, 1, 1)
    shapes[f"backbone.extra.{stage}.2"] = (cout, mid, 3, 3)
  for i, (cin, boxes) in enumerate(zip((512, 1024, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4))):
    shapes[f"head.regression_head.module_list.{i}"] = (boxes * 4, cin, 3, 3)
    shapes[f"head.classification_head.module_list.{i}"] = (boxes * 91, cin, 3, 3)
  state = {"backbone.scale_weight": np.full((512,), 20.0, np.float32)}
  for k, (prefix, shape) in enumerate(shapes.items()):
    size = int(np.prod(shape))
    state[f"{prefix}.weight"] = ((np.arange(size, dtype=np.float32) % 9973) * 1e-4 + k).reshape(shape)
    state[f"{prefix}.bias"] = np.arange(shape[0], dtype=np.float32) + 1000 * k
  return state


def test_torchvision_ssd300_file_maps_onto_ssd300(tmp_path):
  from configs import ssd300_custom   # pylint: disable=g-import-not-at-top
  from mdssd_jax import models   # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import coco   # pylint: disable=g-import-not-at-top
  from mdssd_jax.models import pretrained   # pylint: disable=g-import-not-at-top
  from tests.test_pretrained import write_torch_zip   # pylint: disable=g-import-not-at-top
  state = torchvision_ssd300_state()
  path = str(tmp_path / "ssd300_vgg16_coco-b556d3b4.pth")
  write_torch_zip(path, state, prefix="ssd300_vgg16_coco-b556d3b4")
  config = ssd300_custom.get_config()
  config.model.num_classes = 80
  abstract, _, _ = models.abstract_forward(models.build_detector(config)[0], 300)
  params, convention, loaded, fresh = pretrained.load_torchvision_ssd300(
      path, abstract["params"], tuple(config.model.head_sources),
      coco_category_ids=coco.COCO_CATEGORY_IDS)
  assert not fresh and len(loaded) == 15 + 8 + 12 + 1
  hwio = lambda w: w.transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(params["vgg"]["conv4_3"]["conv"]["kernel"],
                                hwio(state["backbone.features.21.weight"]))
  np.testing.assert_array_equal(params["vgg"]["conv6"]["conv"]["kernel"],
                                hwio(state["backbone.extra.0.7.1.weight"]))
  np.testing.assert_array_equal(params["conv9_2"]["conv"]["bias"], state["backbone.extra.2.2.bias"])
  np.testing.assert_array_equal(params["conv7_loc"]["kernel"],
                                hwio(state["head.regression_head.module_list.1.weight"]))
  # Class heads: our channel (box a, label l) is torchvision's (box a, COCO id of l); 0 = background.
  w = state["head.classification_head.module_list.2.weight"]
  ours = params["conv8_2_conf"]["kernel"]
  assert ours.shape == (3, 3, 512, 6 * 81)
  for a in range(6):
    for label, cid in [(0, 0), (1, 1), (12, 13), (80, 90)]:
      np.testing.assert_array_equal(ours[..., a * 81 + label], w[a * 91 + cid].transpose(1, 2, 0))
  assert convention["channel_order"] == "RGB" and convention["input_range"] == 255.0
  np.testing.assert_allclose(convention["mean"], (123.0, 117.0, 104.0), atol=0.01)
  # Other classes: the class heads start fresh; MDSSD300 takes the trunk and extras only.
  _, _, _, fresh = pretrained.load_torchvision_ssd300(path, abstract["params"],
                                                      tuple(config.model.head_sources))
  assert sorted(fresh) == sorted(f"{s}_conf" for s in pretrained.TORCHVISION_SSD300_HEADS)
  from configs import mdssd300_custom   # pylint: disable=g-import-not-at-top
  config = mdssd300_custom.get_config()
  config.model.num_classes = 3
  abstract, _, _ = models.abstract_forward(models.build_detector(config)[0], 300)
  _, _, loaded, fresh = pretrained.load_torchvision_ssd300(path, abstract["params"],
                                                           tuple(config.model.head_sources))
  assert set(loaded) >= {"conv1_1", "conv5_3", "conv7", "conv8_2", "conv11_2"}
  assert not {"conv1_1", "conv4_3", "conv7", "conv8_1"} & set(fresh)
  assert all(name.startswith("fusion") or name.endswith(("_conf", "_loc", "_norm"))
             for name in fresh)


def test_prepare_through_main_says_the_format_first_and_refuses_by_name(sources, tmp_path):
  """As a user runs it: the first line names the format; a bad file ends in one Error: line."""
  coco = sources["coco"]
  proc = helpers.run_main(
      ["--mode=prepare", f"--config.data.data_dir={tmp_path}",
       f"--config.data.custom.train={coco['data.custom.train']}",
       f"--config.data.custom.train_images={coco['data.custom.train_images']}"],
      config="configs/mdssd300_custom.py", check=True)
  assert proc.stdout.splitlines()[0].startswith("custom data: COCO JSON "), proc.stdout
  broken = tmp_path / "broken.json"
  broken.write_text("{")
  proc = helpers.run_main(["--mode=prepare", f"--config.data.data_dir={tmp_path}",
                           f"--config.data.custom.train={broken}"], config="configs/mdssd300_custom.py")
  errors = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr
  assert errors[0].startswith("Error: BadAnnotation: ") and "broken.json, line 1" in errors[0]
