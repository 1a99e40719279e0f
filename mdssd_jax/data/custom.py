"""Your own detection data, no code: COCO JSON, YOLO (ultralytics) folders or VOC folders.

`config.data.name = "custom"` with `config.data.custom.train` (and optionally `.eval`) naming what a
labelling tool exported (CVAT, Label Studio, Roboflow and the like):

  COCO JSON   train=.../train.json, images in custom.train_images (default: the JSON's folder);
              labels follow the category ids in id order (any ids); `iscrowd` kept (the evaluators
              ignore crowd regions, as COCO does); images without annotations kept, with no objects.
  YOLO        train=.../data.yaml (ultralytics: `path`, `train`, `val`, `names` as list or dict);
              `images/...` beside `labels/...`, one `class cx cy w h` line per object (normalised);
              an image without a label file, or with an empty one, has no objects.
  VOC folder  train=DIR with Annotations/*.xml and JPEGImages/ (ImageSets/Main/<split>.txt
              optional); class names from the XMLs (sorted) unless custom.class_names lists them.

The format is detected from the path (`custom.format` overrides it). Without an eval source the
prepare holds out `custom.holdout_fraction` of the training images (seeded: the same every run).
Images: JPEG or PNG (anything OpenCV reads), grey, RGB or RGBA, any size, EXIF orientation applied
as viewers show it (image_files.py). Files from strangers are data: YAML is read with the safe
loader, XML with a DTD is refused, an image path that leads outside its folder is refused by name.

Prepared like VOC and COCO (array_record, one prepare per data set, kill -9 safe: registry.py) into
<data_dir>/custom_detection/<name of the source folder>_<hash of the settings>/. The prepared data
keeps the class names and category ids (its metadata.json), so training, evaluation and prediction
read them from there and never need the source files again. docs/your_data.md has examples.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
import yaml

from mdssd_jax.data import features
from mdssd_jax.data import image_files
from mdssd_jax.data import report
from mdssd_jax.data import voc

FORMATS = ("coco", "yolo", "voc")
FORMAT_NAMES = {"coco": "COCO JSON", "yolo": "YOLO (ultralytics data.yaml)", "voc": "VOC folder"}
SPLITS = ("train", "validation")
BUILDER_NAME = "custom_detection"
VERSION = "1.0.0"
METADATA_FILE = "metadata.json"   # TFDS writes the builder's MetadataDict there
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Images decoded at once while preparing (threads: OpenCV releases the GIL while it decodes).
_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_DECODE_CHUNK = 64


# ---- what the config says --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
  """config.data.custom, checked, with absolute paths and the format decided.

  train/eval: the annotation source (a .json, a data.yaml or a VOC folder); eval "" = hold out
  holdout_fraction of train (for YOLO: the data.yaml's `val` first). train_images/eval_images: COCO's
  image folders. train_split/eval_split: VOC's ImageSets/Main lists ("" = every XML).
  class_names: () = from the data.
  """
  format: str
  train: str
  eval: str = ""
  train_images: str = ""
  eval_images: str = ""
  train_split: str = ""
  eval_split: str = ""
  class_names: Tuple[str, ...] = ()
  holdout_fraction: float = 0.1
  holdout_seed: int = 0
  format_reason: str = ""

  def config_name(self) -> str:
    """A readable name and a hash of every setting: other settings never reuse prepared data."""
    fields = dataclasses.asdict(self)
    fields.pop("format_reason")
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    base = os.path.basename(self.train.rstrip("/"))
    if self.format == "coco" or base in ("data.yaml", "data.yml"):
      base = os.path.basename(os.path.dirname(self.train.rstrip("/"))) + "_" + os.path.splitext(base)[0]
    base = re.sub(r"[^A-Za-z0-9]+", "_", base).strip("_")[:40] or "data"
    return f"{self.format}_{base}_{digest}"


def detect_format(path: str) -> Tuple[str, str]:
  """(format, why) from an annotation path; raises ValueError naming the three layouts."""
  lower = path.lower()
  if lower.endswith(".json"):
    return "coco", "a .json file"
  if lower.endswith((".yaml", ".yml")):
    return "yolo", "a .yaml file"
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.custom.train={path}: no such file or folder")
  if os.path.isdir(path):
    if os.path.isdir(os.path.join(path, "Annotations")):
      return "voc", "a folder with Annotations/"
    for name in ("data.yaml", "data.yml"):
      if os.path.isfile(os.path.join(path, name)):
        return "yolo", f"a folder with {name}"
  raise ValueError(
      f"config.data.custom.train={path!r}: cannot tell its format. Give a COCO JSON file "
      "(.../train.json), an ultralytics data.yaml, or a VOC folder (with Annotations/ and "
      "JPEGImages/), or set --config.data.custom.format=coco|yolo|voc")


def settings_from_config(custom_cfg) -> Settings:
  """Settings from config.data.custom; raises ValueError naming the key and the fix."""
  cfg = dict(custom_cfg)
  known = {f.name for f in dataclasses.fields(Settings)} - {"format_reason"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown config.data.custom keys {unknown}; known: {sorted(known)}")
  train = str(cfg.get("train") or "")
  if not train:
    raise ValueError("config.data.name='custom' needs --config.data.custom.train=PATH: a COCO JSON "
                     "file, an ultralytics data.yaml or a VOC folder (docs/your_data.md)")
  absolute = lambda p: os.path.abspath(os.path.expanduser(str(p))) if p else ""
  train = absolute(train)
  # A missing source is no error here: prepared data needs it no more (builder_config); prepare
  # and an unprepared data set say that it is missing (missing_files_message, read_classes).
  fmt = str(cfg.get("format") or "")
  if fmt:
    if fmt not in FORMATS:
      raise ValueError(f"config.data.custom.format={fmt!r}; use one of {', '.join(FORMATS)} "
                       "(or leave it empty to detect it from the path)")
    reason = "set by config.data.custom.format"
  else:
    fmt, reason = detect_format(train)
    reason = f"detected: {reason}"
  eval_path = absolute(cfg.get("eval"))
  fraction = float(cfg.get("holdout_fraction", 0.1))
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.data.custom.holdout_fraction={fraction}: must be between 0 and 1 "
                     "(the share of training images held out for evaluation when no eval is given)")
  names = tuple(str(n) for n in (cfg.get("class_names") or ()))
  if len(set(names)) != len(names):
    raise ValueError(f"config.data.custom.class_names has duplicates: {list(names)}")
  train_images = absolute(cfg.get("train_images"))
  if fmt == "coco" and not train_images:
    train_images = os.path.dirname(train)   # Roboflow's layout: the JSON beside its images
  eval_images = absolute(cfg.get("eval_images"))
  if fmt == "coco" and eval_path and not eval_images:
    eval_images = os.path.dirname(eval_path)
  return Settings(format=fmt, train=train, eval=eval_path, train_images=train_images,
                  eval_images=eval_images, train_split=str(cfg.get("train_split") or ""),
                  eval_split=str(cfg.get("eval_split") or ""), class_names=names,
                  holdout_fraction=fraction, holdout_seed=int(cfg.get("holdout_seed", 0)),
                  format_reason=reason)


# ---- one image of the source -------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
  """One image of the source, or (path "") an annotation that belongs to no image.

  key: unique within the split; path: the image file (inside `root`); boxes_px: (N, 4) xyxy pixels,
  or boxes_norm (N, 4) xyxy normalised (YOLO); labels (N,) 0-based; crowd (N,) bool; area (N,)
  pixels, -1 where unknown; declared_size_px: (width, height) the annotation states, or None;
  xml: VOC's annotation bytes (parsed once the image size is known); error: a BadAnnotation found
  while reading the annotations (the image is refused or skipped under the policy).
  """
  key: str
  file: str
  path: str = ""
  root: str = ""
  image_id: int = -1
  boxes_px: Optional[np.ndarray] = None
  boxes_norm: Optional[np.ndarray] = None
  labels: Optional[np.ndarray] = None
  crowd: Optional[np.ndarray] = None
  area: Optional[np.ndarray] = None
  declared_size_px: Optional[Tuple[float, float]] = None
  xml: Optional[bytes] = None
  source_boxes: int = 0
  error: Optional[report.BadAnnotation] = None
  is_image: bool = True


def _inside(root: str, relative: str, source: str, what: str) -> str:
  """root/relative, refused (BadAnnotation) when it leads outside root (../, absolute, symlinks)."""
  if not relative or os.path.isabs(relative) or relative.startswith(("~", "\\")):
    raise report.BadAnnotation(source, f"{what} {relative!r} is not a path relative to {root}",
                               f"give image paths relative to {root}")
  path = os.path.join(root, relative)
  real_root = os.path.realpath(root)
  if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
    raise report.BadAnnotation(source, f"{what} {relative!r} leads outside {root}",
                               f"keep the images inside {root} (no '..', no symlinks out of it)")
  return path


def _need_file(path: str, source: str, what: str) -> None:
  if not os.path.isfile(path):
    raise report.BadAnnotation(source, f"{what} {path} does not exist",
                               "copy the image there or remove it from the annotations")


# ---- COCO JSON ----------------------------------------------------------------------------------------

def _load_json(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except json.JSONDecodeError as e:
    raise report.BadAnnotation(path, f"the JSON does not parse ({e.msg}, column {e.colno})",
                               "export the annotations again", line=e.lineno) from e
  except UnicodeDecodeError as e:
    raise report.BadAnnotation(path, f"the file is not UTF-8 text ({e.reason})",
                               "export the annotations again as JSON") from e


def coco_categories(path: str) -> Tuple[List[str], List[int]]:
  """(class names, category ids) of a COCO JSON file, in category-id order."""
  data = _load_json(path)
  categories = data.get("categories") if isinstance(data, dict) else None
  if not isinstance(categories, list) or not categories:
    raise report.BadAnnotation(path, "it has no `categories` list",
                               "export the annotations as COCO JSON (images, annotations, categories)")
  pairs = []
  for k, cat in enumerate(categories):
    if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
      raise report.BadAnnotation(path, f"categories[{k}] is {cat!r}, not {{'id': int, 'name': str}}",
                                 "export the annotations as COCO JSON again")
    pairs.append((cat["id"], str(cat["name"])))
  pairs.sort()
  ids = [cid for cid, _ in pairs]
  if len(set(ids)) != len(ids):
    raise report.BadAnnotation(path, f"category ids repeat: {ids}", "give each category its own id")
  return [name for _, name in pairs], ids


def _coco_entries(path: str, image_root: str, category_ids: Sequence[int]) -> List[Entry]:
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise report.BadAnnotation(path, "it has no `images` list", "export the annotations as COCO JSON")
  label_of = {cid: k for k, cid in enumerate(category_ids)}
  entries, by_id = [], {}
  for k, image in enumerate(data["images"]):
    where = f"images[{k}]"
    entry = Entry(key="", file=f"{path} ({where})")
    try:
      if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
        raise report.BadAnnotation(path, f"{where} lacks `id` or `file_name`",
                                   "export the annotations as COCO JSON again")
      entry.key, entry.image_id = str(image["id"]), int(image["id"])
      entry.file = f"{path} (image {image['id']}, {image['file_name']})"
      if entry.key in by_id:
        raise report.BadAnnotation(path, f"image id {image['id']} appears twice",
                                   "give each image its own id")
      entry.root = image_root
      entry.path = _inside(image_root, str(image["file_name"]), path, f"image {image['id']}: file_name")
      width, height = image.get("width"), image.get("height")
      if width and height:
        entry.declared_size_px = (float(width), float(height))
    except report.BadAnnotation as e:
      entry.error = e
    except (TypeError, ValueError) as e:
      entry.error = report.BadAnnotation(path, f"{where} is {image!r:.200} ({e})",
                                         "export the annotations as COCO JSON again")
    entry.boxes_px, entry.labels, entry.crowd, entry.area = [], [], [], []
    entries.append(entry)
    if entry.key and entry.key not in by_id:
      by_id[entry.key] = entry
  annotations = data.get("annotations") or []
  for k, ann in enumerate(annotations):
    image_id = str(ann.get("image_id")) if isinstance(ann, dict) else None
    entry = by_id.get(image_id)
    if entry is None:
      orphan = Entry(key=f"annotation {k}", file=path, source_boxes=1, is_image=False)
      orphan.error = report.BadAnnotation(
          path, f"annotation {ann.get('id') if isinstance(ann, dict) else k} refers to image id "
          f"{image_id}, which is not in `images`", "remove the annotation or add its image")
      entries.append(orphan)
      continue
    entry.source_boxes += 1
    if entry.error is not None:
      continue
    try:
      bbox = ann.get("bbox")
      if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"bbox {bbox!r} is not four numbers [x, y, width, height]")
      x, y, w, h = (float(v) for v in bbox)
      if not all(np.isfinite([x, y, w, h])):
        raise ValueError(f"bbox {bbox!r} is not four finite numbers")
      if w <= 0 or h <= 0:
        raise ValueError(f"bbox {bbox!r} has width or height <= 0")
      if ann.get("category_id") not in label_of:
        raise ValueError(f"category_id {ann.get('category_id')!r} is not one of the `categories` "
                         f"ids {list(category_ids)}")
    except (TypeError, ValueError) as e:
      entry.error = report.BadAnnotation(
          path, f"annotation {ann.get('id', k)} of image {image_id}: {e}",
          "correct or remove that annotation in the labelling tool and export again")
      continue
    entry.boxes_px.append((x, y, x + w, y + h))
    entry.labels.append(label_of[ann["category_id"]])
    entry.crowd.append(bool(ann.get("iscrowd", 0)))
    area = ann.get("area")
    entry.area.append(float(area) if isinstance(area, (int, float)) and area > 0 else -1.0)
  for entry in entries:
    if entry.error is None and entry.path:
      entry.boxes_px = np.asarray(entry.boxes_px, np.float64).reshape(-1, 4)
      entry.labels = np.asarray(entry.labels, np.int64)
      entry.crowd = np.asarray(entry.crowd, bool)
      entry.area = np.asarray(entry.area, np.float32)
  return entries


# ---- YOLO (ultralytics) ------------------------------------------------------------------------------

def read_yaml(path: str) -> Dict[str, Any]:
  """An ultralytics data.yaml, read with the safe loader (Python tags are refused, never run)."""
  try:
    with open(path, "rb") as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    raise report.BadAnnotation(
        path, f"the YAML does not parse or uses tags that are refused ({str(e).splitlines()[0]})",
        "write plain YAML: path, train, val, names", line=mark.line + 1 if mark else None) from e
  if not isinstance(data, dict):
    raise report.BadAnnotation(path, "it is not a YAML mapping", "write path:, train:, val:, names:")
  return data


def yolo_names(data: Dict[str, Any], path: str) -> Tuple[List[str], Dict[int, int]]:
  """(class names, {class id in the label files: 0-based label}) from data.yaml's `names`."""
  names = data.get("names")
  if isinstance(names, list) and names:
    ids = list(range(len(names)))
    values = [str(n) for n in names]
  elif isinstance(names, dict) and names:
    try:
      ids = sorted(int(k) for k in names)
    except (TypeError, ValueError) as e:
      raise report.BadAnnotation(path, f"`names` has a key that is not a class id: {e}",
                                 "write names as a list, or as {0: name, 1: name, ...}") from e
    values = [str(names.get(i, names.get(str(i)))) for i in ids]
  else:
    raise report.BadAnnotation(path, "it has no `names` (a list or a {id: name} mapping)",
                               "add the class names as `names: [a, b, ...]`")
  if "nc" in data and int(data["nc"]) != len(values):
    raise report.BadAnnotation(path, f"nc: {data['nc']} but `names` has {len(values)} entries",
                               "make nc equal the number of names (or remove nc)")
  return values, {cid: k for k, cid in enumerate(ids)}


def _yolo_root(data: Dict[str, Any], yaml_path: str) -> str:
  root = str(data.get("path") or "")
  folder = os.path.dirname(yaml_path)
  if not root:
    return folder
  root = os.path.expanduser(root)
  # ultralytics reads a relative `path` from the folder the yaml is in (and its parent); the
  # yaml's folder is what a copied export relies on.
  return root if os.path.isabs(root) else os.path.normpath(os.path.join(folder, root))


def _yolo_images(root: str, listing, yaml_path: str, key: str) -> List[str]:
  """Image paths of data.yaml's `train` / `val`: folders, .txt lists, or lists of them."""
  paths = []
  for item in listing if isinstance(listing, list) else [listing]:
    item = str(item)
    location = _inside(root, item, yaml_path, f"`{key}`")
    if os.path.isdir(location):
      for folder, _, names in sorted(os.walk(location)):
        paths += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    elif location.lower().endswith(".txt") and os.path.isfile(location):
      with open(location) as f:
        for line in (l.strip() for l in f):
          if line:   # ultralytics: "./x" is relative to the list's folder, "x" to `path`
            base = os.path.dirname(location) if line.startswith("./") else root
            paths.append(os.path.normpath(os.path.join(base, line)))
    else:
      raise report.BadAnnotation(yaml_path, f"`{key}: {item}` is neither a folder of images nor a "
                                 f".txt list of them under {root}", f"point `{key}` at images/<split>")
  return paths


def _yolo_label_path(image_path: str) -> str:
  """ultralytics' rule: the last /images/ of the path becomes /labels/, the extension .txt."""
  head, sep, tail = image_path.rpartition(f"{os.sep}images{os.sep}")
  base = f"{head}{os.sep}labels{os.sep}{tail}" if sep else image_path
  return os.path.splitext(base)[0] + ".txt"


def _yolo_entry(image_path: str, root: str, label_of: Dict[int, int], yaml_path: str) -> Entry:
  relative = os.path.relpath(image_path, root)
  entry = Entry(key=relative, file=image_path, root=root)
  boxes, labels = [], []
  try:
    entry.path = _inside(root, relative, yaml_path, "image")
    label_path = _yolo_label_path(image_path)
    lines = []
    if os.path.isfile(label_path):
      entry.file = label_path
      with open(label_path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    entry.source_boxes = sum(1 for line in lines if line.strip())
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      fields = line.split()
      try:
        values = [float(v) for v in fields]
      except ValueError:
        values = []
      if len(fields) != 5 or len(values) != 5 or not np.all(np.isfinite(values)):
        raise report.BadAnnotation(label_path, f"{line.strip()!r} is not five numbers "
                                   "(class cx cy w h)", "write one `class cx cy w h` line per "
                                   "box, normalised to 0..1 (segments are not read)", line=number)
      cls, cx, cy, w, h = values
      if cls != int(cls) or int(cls) not in label_of:
        raise report.BadAnnotation(label_path, f"class {fields[0]} is not one of the ids of `names` "
                                   f"in {yaml_path} ({sorted(label_of)})", "use a class id of "
                                   "`names`, or add the class there", line=number)
      if w <= 0 or h <= 0:
        raise report.BadAnnotation(label_path, f"the box has width {w:g} and height {h:g}; both "
                                   "must be > 0", "correct or remove the box", line=number)
      boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
      labels.append(label_of[int(cls)])
  except report.BadAnnotation as e:
    entry.error = e
    return entry
  entry.boxes_norm = np.asarray(boxes, np.float64).reshape(-1, 4)
  entry.labels = np.asarray(labels, np.int64)
  entry.crowd = np.zeros(len(labels), bool)
  entry.area = np.full(len(labels), -1.0, np.float32)
  return entry


# ---- VOC folder -----------------------------------------------------------------------------------

def _voc_ids(folder: str, split: str) -> List[str]:
  """Image ids of a VOC folder: ImageSets/Main/<split>.txt, or every Annotations/*.xml."""
  if split:
    listing = os.path.join(folder, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(listing):
      raise FileNotFoundError(f"{listing} does not exist; set the split to one of "
                              f"{_voc_listed_splits(folder) or 'nothing (no ImageSets/Main)'} "
                              "or to '' for every XML in Annotations/")
    with open(listing) as f:
      return [line.split()[0] for line in f if line.strip()]
  annotations = os.path.join(folder, "Annotations")
  return sorted(os.path.splitext(n)[0] for n in os.listdir(annotations) if n.endswith(".xml"))


def _voc_listed_splits(folder: str) -> List[str]:
  main = os.path.join(folder, "ImageSets", "Main")
  return sorted(n[:-4] for n in os.listdir(main) if n.endswith(".txt")) if os.path.isdir(main) else []


def _voc_image(folder: str, image_id: str, source: str) -> str:
  for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
    path = _inside(os.path.join(folder, "JPEGImages"), image_id + ext, source, "image")
    if os.path.isfile(path):
      return path
  raise report.BadAnnotation(source, f"no image {image_id}.jpg (or .png) in "
                             f"{os.path.join(folder, 'JPEGImages')}", "copy the image there")


_NAME_RE = re.compile(rb"<object>.*?<name>\s*(.*?)\s*</name>", re.S)


def voc_class_names(folder: str, ids: Sequence[str]) -> List[str]:
  """Sorted class names of the objects in a VOC folder's XMLs (read fast, without a full parse)."""
  names = set()
  for image_id in ids:
    path = os.path.join(folder, "Annotations", f"{image_id}.xml")
    if os.path.isfile(path):
      with open(path, "rb") as f:
        names.update(m.decode("utf-8", "replace") for m in _NAME_RE.findall(f.read()))
  if not names:
    raise ValueError(f"no <object><name> in the XMLs of {os.path.join(folder, 'Annotations')}: "
                     "nothing to learn; set config.data.custom.class_names if the names are elsewhere")
  return sorted(names)


def _voc_entries(folder: str, ids: Sequence[str]) -> List[Entry]:
  entries = []
  for image_id in ids:
    annotation = os.path.join(folder, "Annotations", f"{image_id}.xml")
    entry = Entry(key=image_id, file=annotation, root=os.path.join(folder, "JPEGImages"))
    try:
      _inside(os.path.join(folder, "Annotations"), f"{image_id}.xml", annotation, "annotation")
      if not os.path.isfile(annotation):
        raise report.BadAnnotation(annotation, "missing, though its image is listed",
                                   "restore the XML or remove the image from the list")
      with open(annotation, "rb") as f:
        entry.xml = f.read()
      entry.source_boxes = entry.xml.count(b"<object>")
      entry.path = _voc_image(folder, image_id, annotation)
    except report.BadAnnotation as e:
      entry.error = e
    entries.append(entry)
  return entries


# ---- the source: class names and the entries of each split -----------------------------------------

@dataclasses.dataclass
class Source:
  """class_names: C names (label k + 1 is class_names[k]); category_ids: COCO's ids of the labels
  (None for the other formats); describe: one line saying what was read and how eval was chosen."""
  class_names: List[str]
  category_ids: Optional[List[int]]
  describe: str


def read_classes(settings: Settings) -> Source:
  """The class names of the source (reads the annotations, not the images)."""
  message = missing_files_message(settings)
  if message:
    raise FileNotFoundError(f"{message}; the data set is not prepared yet, so its classes are read "
                            "from there")
  ids = None
  if settings.format == "coco":
    names, ids = coco_categories(settings.train)
    where = f"{settings.train} (images in {settings.train_images})"
  elif settings.format == "yolo":
    yaml_path = _yaml_path(settings.train)
    names, _ = yolo_names(read_yaml(yaml_path), yaml_path)
    where = yaml_path
  else:
    names = list(settings.class_names) or voc_class_names(
        settings.train, _voc_ids(settings.train, settings.train_split))
    where = settings.train
  if settings.class_names and list(settings.class_names) != list(names):
    raise ValueError(f"config.data.custom.class_names={list(settings.class_names)} but "
                     f"{where} has {names}; leave class_names empty to take them from the data")
  if len(set(names)) != len(names):
    raise ValueError(f"{where}: class names repeat ({names}); each class needs its own name")
  return Source(names, ids, f"{FORMAT_NAMES[settings.format]} {where} ({settings.format_reason})")


def _yaml_path(path: str) -> str:
  if os.path.isdir(path):
    for name in ("data.yaml", "data.yml"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
  return path


def split_entries(settings: Settings, source: Source) -> Tuple[Dict[str, List[Entry]], str]:
  """({"train": entries, "validation": entries}, how the validation split was chosen)."""
  if settings.format == "coco":
    train = _coco_entries(settings.train, settings.train_images, source.category_ids)
    evaluation = None
    if settings.eval:
      names, ids = coco_categories(settings.eval)
      if (names, ids) != (source.class_names, source.category_ids):
        raise ValueError(f"{settings.eval} has other categories than {settings.train}: "
                         f"{list(zip(ids, names))} against "
                         f"{list(zip(source.category_ids, source.class_names))}; export both "
                         "with the same categories")
      evaluation = _coco_entries(settings.eval, settings.eval_images, source.category_ids)
  elif settings.format == "yolo":
    yaml_path = _yaml_path(settings.train)
    data = read_yaml(yaml_path)
    _, label_of = yolo_names(data, yaml_path)
    root = _yolo_root(data, yaml_path)
    if "train" not in data:
      raise report.BadAnnotation(yaml_path, "it has no `train` entry", "add `train: images/train`")
    entries_of = lambda key: [_yolo_entry(p, root, label_of, yaml_path)
                              for p in _yolo_images(root, data[key], yaml_path, key)]
    train = entries_of("train")
    evaluation = None
    if settings.eval:
      eval_yaml = _yaml_path(settings.eval)
      eval_data = read_yaml(eval_yaml)
      eval_root = _yolo_root(eval_data, eval_yaml)
      key = "val" if "val" in eval_data else "train"
      evaluation = [_yolo_entry(p, eval_root, label_of, eval_yaml)
                    for p in _yolo_images(eval_root, eval_data[key], eval_yaml, key)]
    elif data.get("val"):
      evaluation = entries_of("val")
  else:
    train = _voc_entries(settings.train, _voc_ids(settings.train, settings.train_split))
    evaluation = None
    if settings.eval or settings.eval_split:
      folder = settings.eval or settings.train
      evaluation = _voc_entries(folder, _voc_ids(folder, settings.eval_split))
  if evaluation is not None:
    how = (f"eval: {settings.eval or settings.train}" +
           (f" (split {settings.eval_split})" if settings.format == "voc" and settings.eval_split
            else "") + (" (data.yaml's val)" if settings.format == "yolo" and not settings.eval
                        else ""))
    return {"train": train, "validation": evaluation}, how
  train, held_out = holdout(train, settings.holdout_fraction, settings.holdout_seed)
  how = (f"eval: {len(held_out)} of the {len(train) + len(held_out)} training images held out "
         f"({settings.holdout_fraction:.0%}, seed {settings.holdout_seed}: the same every run; "
         "set config.data.custom.eval to use your own)")
  return {"train": train, "validation": held_out}, how


def holdout(entries: List[Entry], fraction: float, seed: int) -> Tuple[List[Entry], List[Entry]]:
  """(kept, held out): round(fraction * n) entries (at least 1 of 2 or more), chosen by `seed`.

  Entries without an image (orphan annotations) stay with the training split's report.
  """
  images = [k for k, e in enumerate(entries) if e.is_image]
  count = min(max(1, round(fraction * len(images))), len(images) - 1) if len(images) > 1 else 0
  chosen = set(np.random.default_rng(seed).permutation(len(images))[:count].tolist())
  held = {images[k] for k in chosen}
  return ([e for k, e in enumerate(entries) if k not in held],
          [e for k, e in enumerate(entries) if k in held])


# ---- the TFDS builder --------------------------------------------------------------------------------

class CustomConfig(tfds.core.BuilderConfig):
  """One custom data set: its settings and the class names read from it."""

  def __init__(self, *, settings: Settings, class_names: Sequence[str],
               category_ids: Optional[Sequence[int]], **kwargs):
    super().__init__(name=settings.config_name(), version=tfds.core.Version(VERSION), **kwargs)
    self.settings = settings
    self.class_names = list(class_names)
    self.category_ids = list(category_ids) if category_ids is not None else None


class CustomDetection(tfds.core.GeneratorBasedBuilder):
  """A detection data set from a user's COCO JSON, YOLO or VOC files."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = []

  def _info(self):
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.detection_features(
            config.class_names,
            extra_object_features={"is_crowd": np.bool_, "area": np.float32},
            extra_features={"image/id": np.int64}),
        metadata=tfds.core.MetadataDict(
            class_names=config.class_names, category_ids=config.category_ids,
            format=config.settings.format, settings=dataclasses.asdict(config.settings)),
        disable_shuffling=True,  # record i of a split is image i of the source, in its order
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are named by the settings
    config = self.builder_config
    source = Source(config.class_names, config.category_ids, "")
    splits, how = split_entries(config.settings, source)
    report.for_builder(self).note(how)
    return report.with_progress({split: self._generate_examples(split, entries)
                                 for split, entries in splits.items()})

  def _generate_examples(self, split, entries):
    prepare_report = report.for_builder(self)
    class_names = self.builder_config.class_names
    with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
      for start in range(0, len(entries), _DECODE_CHUNK):
        chunk = entries[start:start + _DECODE_CHUNK]
        for entry, result in zip(chunk, pool.map(
            lambda e: _example(e, class_names), chunk)):
          prepare_report.tally(split, "images_in_files", int(entry.is_image))
          prepare_report.tally(split, "boxes_in_files", entry.source_boxes)
          if isinstance(result, report.BadAnnotation):
            prepare_report.bad(split, result)
            prepare_report.tally(split, "images_skipped", int(entry.is_image))
            prepare_report.tally(split, "boxes_skipped", entry.source_boxes)
            continue
          example, repairs = result
          for what, n in repairs.items():
            prepare_report.count(split, what, entry.file, n)
          prepare_report.tally(split, "images_stored", 1)
          prepare_report.tally(split, "boxes_stored", len(example["objects"]["label"]))
          yield entry.key, example


def _example(entry: Entry, class_names: Sequence[str]):
  """(TFDS example, {counter: n}) of one entry, or the BadAnnotation that refuses it."""
  if entry.error is not None:
    return entry.error
  try:
    _need_file(entry.path, entry.file, "the image")
    with open(entry.path, "rb") as f:
      checked = image_files.checked_image(f.read(), entry.path)
    size = (checked.width_px, checked.height_px)
    repairs = {"boxes_clipped": 0, "boxes_degenerate_dropped": 0}
    if entry.xml is not None:
      flags = []
      objects = voc.parse_annotation(entry.xml, entry.file, lambda what, n: flags.append((what, n)),
                                     class_names=class_names, fold_case=False,   # names as written
                                     image_size_px=size)
      for k, obj in enumerate(objects):
        clipped, inverted = flags[2 * k][1], flags[2 * k + 1][1]
        ymin, xmin, ymax, xmax = obj["bbox"]
        if inverted or ((ymax <= ymin or xmax <= xmin) and not clipped):
          raise report.BadAnnotation(entry.file, f"object {k + 1} ({obj['label']}) has width or "
                                     "height <= 0", "correct or remove the box")
      boxes = np.array([[o["bbox"][1], o["bbox"][0], o["bbox"][3], o["bbox"][2]] for o in objects],
                       np.float64).reshape(-1, 4)
      labels = np.array([class_names.index(o["label"]) for o in objects], np.int64)
      difficult = np.array([o["is_difficult"] for o in objects], bool)
      crowd, area = np.zeros(len(objects), bool), np.full(len(objects), -1.0, np.float32)
      repairs["boxes_clipped"] = sum(n for what, n in flags if what == "boxes_clipped")
    else:
      if entry.boxes_norm is not None:
        raw = entry.boxes_norm
      else:
        if entry.declared_size_px is not None and tuple(entry.declared_size_px) != size:
          raise report.BadAnnotation(
              entry.file, f"the annotations say the image is {entry.declared_size_px[0]:g} x "
              f"{entry.declared_size_px[1]:g} px but it is {size[0]} x {size[1]} px (as viewers "
              "show it, EXIF orientation applied)", "export the annotations of this image again")
        raw = entry.boxes_px / np.array([size[0], size[1], size[0], size[1]], np.float64)
      boxes = np.clip(raw, 0.0, 1.0)
      repairs["boxes_clipped"] = int(np.sum(np.any(boxes != raw, axis=1)))
      labels, crowd, area = entry.labels, entry.crowd, entry.area
      difficult = np.zeros(len(labels), bool)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])   # wholly outside: nothing left
    repairs["boxes_degenerate_dropped"] = int(np.sum(~keep))
  except report.BadAnnotation as e:
    return e
  boxes = boxes[keep]
  objects = {"bbox": [tfds.features.BBox(*b) for b in boxes[:, [1, 0, 3, 2]].astype(np.float32)],
             "label": labels[keep].tolist(), "is_difficult": difficult[keep].tolist(),
             "is_crowd": crowd[keep].tolist(), "area": area[keep].tolist()}
  example = {"image": checked.encoded, "image/filename": os.path.relpath(entry.path, entry.root),
             "image/id": int(entry.image_id), "objects": objects}
  return example, repairs


# ---- prepared data -----------------------------------------------------------------------------------

def prepared_metadata(data_root: str, config_name: str) -> Optional[Dict[str, Any]]:
  """The metadata of a prepared custom data set (class names, category ids), or None."""
  path = os.path.join(data_root, BUILDER_NAME, config_name, VERSION, METADATA_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def builder_config(settings: Settings, data_root: str) -> Tuple[CustomConfig, str]:
  """(the BuilderConfig, one line saying what is read) for `settings`.

  Class names come from the prepared data when it exists (the source files may be elsewhere), else
  from the source's annotations.
  """
  name = settings.config_name()
  meta = prepared_metadata(data_root, name)
  if meta is not None:
    describe = f"{FORMAT_NAMES[settings.format]} {settings.train} (prepared as {name})"
    return CustomConfig(settings=settings, class_names=meta["class_names"],
                        category_ids=meta.get("category_ids")), describe
  source = read_classes(settings)
  return CustomConfig(settings=settings, class_names=source.class_names,
                      category_ids=source.category_ids), source.describe


def missing_files_message(settings: Settings) -> Optional[str]:
  """None when the annotation source exists (checked again in full while preparing)."""
  for key in ("train", "eval", "train_images", "eval_images"):
    path = getattr(settings, key)
    if path and not os.path.exists(path):
      return f"config.data.custom.{key}={path}: no such file or folder"
  return None
