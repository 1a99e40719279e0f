"""PASCAL VOC 2007 / 2012 as a TFDS builder that reads the official files offline.

Why our own builder rather than TFDS's `voc`: TFDS's builder wants every file of its URL list, with
its registered sha256, in manual_dir, including `VOC2012test.tar`, which only the evaluation server
hands out (and which has no annotations), and it cannot read an already extracted `VOCdevkit/`. This
one reads the official tar files or the extracted VOCdevkit folders, with TFDS voc's features and splits.
"""

import os
import tarfile
import xml.etree.ElementTree as ElementTree
from xml.parsers import expat
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from mdssd_jax.data import features
from mdssd_jax.data import image_files
from mdssd_jax.data import report

VOC_LABELS = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
              "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
              "train", "tvmonitor")
VOC_POSES = ("frontal", "rear", "left", "right", "unspecified")

# The official archives of each year (the names the VOC site gives them) and the splits they hold.
VOC_ARCHIVES = {
    "2007": {"VOCtrainval_06-Nov-2007.tar": ("train", "validation"),
             "VOCtest_06-Nov-2007.tar": ("test",)},
    "2012": {"VOCtrainval_11-May-2012.tar": ("train", "validation")},
}
# Split -> the ImageSets/Main list that names its images.
_SPLIT_LISTS = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}


class OfficialFiles:
  """Reads members of an official data set layout from folders, .tar and .zip files alike.

  `roots` are searched in order; a member is a relative path such as
  "VOCdevkit/VOC2007/Annotations/000005.xml". Archives are indexed once (names only).
  """

  def __init__(self, roots):
    self._folders, self._archives = [], []
    for root in roots:
      if os.path.isdir(root):
        self._folders.append(root)
      elif os.path.isfile(root):
        self._archives.append(_Archive(root))

  def find(self, member):
    """Where `member` is (a folder path or an archive), or None."""
    for folder in self._folders:
      if os.path.isfile(os.path.join(folder, member)):
        return folder
    for archive in self._archives:
      if archive.has(member):
        return archive
    return None

  def read(self, member):
    where = self.find(member)
    if where is None:
      raise FileNotFoundError(f"{member} is in none of {self.describe()}")
    if isinstance(where, str):
      with open(os.path.join(where, member), "rb") as f:
        return f.read()
    return where.read(member)

  def describe(self):
    return ", ".join(self._folders + [a.path for a in self._archives]) or "(nothing found)"

  def describe_member(self, member):
    """Where a member is, for messages: a path, "ARCHIVE:member", or the member if it is nowhere."""
    where = self.find(member)
    if where is None:
      return member
    if isinstance(where, str):
      return os.path.join(where, member)
    return f"{where.path}:{member}"

  def close(self):
    for archive in self._archives:
      archive.close()


class _Archive:
  """A .tar or .zip file, opened lazily, with its member names indexed."""

  def __init__(self, path):
    self.path = path
    self._handle = None
    self._names = None

  def _open(self):
    if self._handle is None:
      if zipfile.is_zipfile(self.path):
        self._handle = zipfile.ZipFile(self.path)
        self._names = {n.rstrip("/"): n for n in self._handle.namelist()}
      else:
        self._handle = tarfile.open(self.path)
        self._names = {m.name.removeprefix("./"): m for m in self._handle.getmembers() if m.isfile()}
    return self._handle

  def has(self, member):
    self._open()
    return member in self._names

  def read(self, member):
    handle = self._open()
    if isinstance(handle, zipfile.ZipFile):
      return handle.read(self._names[member])
    with handle.extractfile(self._names[member]) as f:
      return f.read()

  def close(self):
    if self._handle is not None:
      self._handle.close()
      self._handle = None


def _roots(manual_dir, year):
  """Where a year's files may be: the archives, and extracted folders (with or without VOCdevkit/)."""
  return [os.path.join(manual_dir, name) for name in VOC_ARCHIVES[year]] + [manual_dir]


def _member(year, *parts):
  return "/".join(("VOCdevkit", f"VOC{year}") + parts)


def missing_files_message(manual_dir, year):
  """None when manual_dir holds what voc/<year> needs; else what to put where."""
  files = OfficialFiles(_roots(manual_dir, year))
  try:
    missing = [split for split, listing in _SPLIT_LISTS.items()
               if split in _year_splits(year)
               and files.find(_member(year, "ImageSets", "Main", listing)) is None]
  finally:
    files.close()
  if not missing:
    return None
  archives = "\n".join(f"    {os.path.join(manual_dir, name)}   (splits: {', '.join(splits)})"
                       for name, splits in VOC_ARCHIVES[year].items())
  return (f"voc/{year}: the {', '.join(missing)} split(s) are missing in {manual_dir}. Put the official "
          f"files there, unchanged:\n{archives}\nor their extracted folder "
          f"{os.path.join(manual_dir, 'VOCdevkit', f'VOC{year}')}/ (Annotations/, JPEGImages/, "
          "ImageSets/Main/). Set --config.data.manual_dir to that folder.")


def _year_splits(year):
  return tuple(s for splits in VOC_ARCHIVES[year].values() for s in splits)


def _element_lines(xml_bytes):
  """{element path ("annotation/object"): [line of each such element, in document order]}.

  ElementTree keeps no line numbers; expat, which it is built on, reports them while parsing.
  """
  parser = expat.ParserCreate()
  lines, stack = {}, []

  def start(tag, unused_attrs):
    stack.append(tag)
    lines.setdefault("/".join(stack), []).append(parser.CurrentLineNumber)

  parser.StartElementHandler = start
  parser.EndElementHandler = lambda unused_tag: stack.pop()
  try:
    parser.Parse(xml_bytes, True)
  except expat.ExpatError:
    pass
  return lines


_XML_FIX = "correct the file (it must be the VOC XML of that image) or restore it from the official tar"


def parse_annotation(xml_bytes, file="<annotation>", counts=None, class_names=VOC_LABELS,
                     fold_case=True, image_size_px=None):
  """One VOC XML annotation -> list of TFDS voc `objects` dicts, boxes normalised and clipped.

  Args:
    xml_bytes: the file's contents.
    file: its name, for messages.
    counts: optional callable(counter name, n) told of each repair (report.COUNTERS): boxes that
      reach outside the image are clipped to it ("boxes_clipped"), a box with xmin > xmax or
      ymin > ymax is stored with zero width or height ("boxes_inverted"; the pipeline drops it).
    class_names: the class names an object may have (VOC's 20 by default).
    fold_case: compare names in lower case (the VOC devkit's files are); a data set of one's own
      keeps its names as written.
    image_size_px: (width, height) of the decoded image, or None. Given, boxes are normalised by it
      and <size> may be missing or zero; a <size> that disagrees with it is refused.
  Raises:
    report.BadAnnotation naming the file, the line (where known) and the fix: XML that does not
    parse or declares a DTD (entities could expand without bound), a missing or non-positive
    <size>, a box without four numbers, an unknown class name.
  """
  if b"<!DOCTYPE" in xml_bytes or b"<!ENTITY" in xml_bytes:
    # Annotation files are data from anywhere: no DTD, so no entity expansion ("billion laughs").
    raise report.BadAnnotation(file, "the XML declares a DTD or entities, which are refused",
                               "remove the <!DOCTYPE ...> / <!ENTITY ...> declarations")
  try:
    root = ElementTree.fromstring(xml_bytes)
  except ElementTree.ParseError as e:
    raise report.BadAnnotation(file, f"the XML does not parse ({e.msg if hasattr(e, 'msg') else e})",
                               _XML_FIX, line=e.position[0]) from e
  lines = _element_lines(xml_bytes)
  line_of = lambda path, k=0: (lines.get(path) or [None] * (k + 1))[k]

  def number(element, key, where, k=0):
    node = element.find(key) if element is not None else None
    text = node.text.strip() if node is not None and node.text else ""
    try:
      value = float(text)
    except ValueError:
      value = float("nan")
    if not np.isfinite(value):
      raise report.BadAnnotation(
          file, f"<{key}> of {where} is {text!r}, not a number", _XML_FIX,
          line=line_of(f"{root.tag}/{where}/{key}", k) or line_of(f"{root.tag}/{where}", k))
    return value

  size = root.find("size")
  if image_size_px is not None:
    declared = [number(size, key, "size") if size is not None and size.find(key) is not None
                and (size.find(key).text or "").strip() else 0.0 for key in ("width", "height")]
    width, height = (float(v) for v in image_size_px)
    if all(declared) and (declared[0], declared[1]) != (width, height):
      raise report.BadAnnotation(
          file, f"<size> says {declared[0]:g} x {declared[1]:g} px but the image is {width:g} x "
          f"{height:g} px (as viewers show it, EXIF orientation applied)",
          "write the image's real width and height into <size> (or remove <size>)",
          line=line_of(f"{root.tag}/size"))
  else:
    width, height = number(size, "width", "size"), number(size, "height", "size")
  if width <= 0 or height <= 0:
    raise report.BadAnnotation(
        file, f"the image size is {width:g} x {height:g} px (<size>); boxes cannot be normalised",
        "write the JPEG's real width and height into <size>",
        line=line_of(f"{root.tag}/size/{'width' if width <= 0 else 'height'}"))
  objects = []
  for k, obj in enumerate(root.findall("object")):
    obj_line = line_of(f"{root.tag}/object", k)
    name = obj.find("name")
    label = name.text.strip() if name is not None and name.text else ""
    label = label.lower() if fold_case else label
    if label not in class_names:
      which = ("the 20 VOC classes" if tuple(class_names) == VOC_LABELS
               else f"the {len(class_names)} classes")
      raise report.BadAnnotation(
          file, f"object {k + 1} has the class {label!r}, which is not one of {which}",
          f"use one of {', '.join(class_names)}",
          line=line_of(f"{root.tag}/object/name", k) or obj_line)
    box = obj.find("bndbox")
    xmin, ymin, xmax, ymax = (number(box, key, "object/bndbox", k)
                              for key in ("xmin", "ymin", "xmax", "ymax"))
    flag = lambda key: obj.find(key) is not None and (obj.find(key).text or "").strip() == "1"
    pose = obj.find("pose")
    pose = pose.text.strip().lower() if pose is not None and pose.text else "unspecified"
    # TFDS voc's convention: pixel coordinate / image size (no +1), clipped so BBoxFeature accepts it.
    raw = np.array([ymin / height, xmin / width, ymax / height, xmax / width])
    ymin_n, xmin_n, ymax_n, xmax_n = np.clip(raw, 0.0, 1.0)
    if counts is not None:
      counts("boxes_clipped", int(np.any((raw < 0) | (raw > 1))))
      counts("boxes_inverted", int(xmin > xmax or ymin > ymax))
    objects.append({
        "label": label,
        "pose": pose if pose in VOC_POSES else "unspecified",
        "bbox": tfds.features.BBox(ymin_n, xmin_n, max(ymax_n, ymin_n), max(xmax_n, xmin_n)),
        "is_truncated": flag("truncated"),
        "is_difficult": flag("difficult"),
    })
  return objects


class VocConfig(tfds.core.BuilderConfig):

  def __init__(self, *, year, **kwargs):
    super().__init__(name=year, version=tfds.core.Version("1.0.0"), **kwargs)
    self.year = year


class MdssdVoc(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC from the official tar files or VOCdevkit folders in manual_dir (no download)."""

  BUILDER_CONFIGS = [VocConfig(year="2007"), VocConfig(year="2012")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (2007) or "
      "VOCtrainval_11-May-2012.tar (2012), or the extracted VOCdevkit/ folder, in manual_dir.")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.detection_features(
            VOC_LABELS,
            extra_object_features={"pose": tfds.features.ClassLabel(names=VOC_POSES),
                                   "is_truncated": np.bool_},
            extra_features={name: tfds.features.Sequence(tfds.features.ClassLabel(names=VOC_LABELS))
                            for name in ("labels", "labels_no_difficult")}),
        homepage=f"http://host.robots.ox.ac.uk/pascal/VOC/voc{self.builder_config.year}/",
        disable_shuffling=True,  # record i = line i of the ImageSets list
    )

  def _split_generators(self, dl_manager):
    # The private attribute: the public `manual_dir` raises its own, less specific error first.
    manual_dir = os.fspath(getattr(dl_manager, "_manual_dir", None) or "")
    year = self.builder_config.year
    message = missing_files_message(manual_dir, year)
    if message:
      raise FileNotFoundError(message)
    return report.with_progress({split: self._generate_examples(manual_dir, split)
                                 for split in _year_splits(year)})

  def _generate_examples(self, manual_dir, split):
    year = self.builder_config.year
    prepare_report = report.for_builder(self)
    files = OfficialFiles(_roots(manual_dir, year))
    try:
      listing = files.read(_member(year, "ImageSets", "Main", _SPLIT_LISTS[split])).decode()
      for image_id in (line.strip() for line in listing.splitlines()):
        if not image_id:
          continue
        annotation = _member(year, "Annotations", f"{image_id}.xml")
        jpeg = _member(year, "JPEGImages", f"{image_id}.jpg")
        name = files.describe_member(annotation)
        counts = lambda what, n, name=name: prepare_report.count(split, what, name, n)
        try:
          for member in (annotation, jpeg):
            if files.find(member) is None:
              raise report.BadAnnotation(
                  member, f"missing from {files.describe()}, though ImageSets/Main/"
                  f"{_SPLIT_LISTS[split]} lists {image_id}", "restore it from the official tar")
          objects = parse_annotation(files.read(annotation), name, counts)
          # Decoded once here, so that training never meets an image it cannot decode.
          checked = image_files.checked_image(files.read(jpeg), files.describe_member(jpeg))
        except report.BadAnnotation as e:
          prepare_report.bad(split, e)
          continue
        yield image_id, {
            "image": checked.encoded,
            "image/filename": f"{image_id}.jpg",
            "objects": objects,
            "labels": sorted({o["label"] for o in objects}),
            "labels_no_difficult": sorted({o["label"] for o in objects if not o["is_difficult"]}),
        }
    finally:
      files.close()
