"""The data sets, looked up by `config.data.name`, and random access to their prepared splits.

A data set is one or more TFDS builders ("parts": voc/2007+2012 is two) in array_record format under
config.data.data_dir. Add one with `register(name, factory)`: factory(data_cfg) -> DatasetInfo.
"""

import bisect
import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import shutil
import tempfile
from typing import Callable, Mapping, Optional, Sequence

import tensorflow_datasets as tfds

from mdssd_jax.data import coco
from mdssd_jax.data import custom
from mdssd_jax.data import report
from mdssd_jax.data import synthetic
from mdssd_jax.data import tt100k
from mdssd_jax.data import voc

FILE_FORMAT = "array_record"   # Grain needs random access: tfds.data_source reads array_record only
LOCK_FILE = ".prepare.lock"    # in <data_dir>/<name>/<config>/ while a process prepares it
INCOMPLETE_PREFIX = "incomplete."   # TFDS builds in <config>/incomplete.XXXXXX_<version>/, then renames


@dataclasses.dataclass(frozen=True)
class Part:
  """One TFDS builder of a data set.

  make_builder(data_dir or None) -> tfds builder (array_record); missing_files(manual_dir) -> None when
  the official files are there, else a message naming them (None for generated data sets).
  """
  tfds_name: str
  make_builder: Callable[[Optional[str]], tfds.core.DatasetBuilder]
  missing_files: Callable[[str], Optional[str]] = lambda manual_dir: None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer and evaluators need to know about a data set, before reading it.

  class_names[k] is the name of label k + 1 (label 0 = background / padding).
  train_parts / eval_parts: indices into `parts` read for training / evaluation (voc/2007+2012
  trains on both years, evaluates on 2007 only). split_aliases: e.g. "trainval" -> "train+validation".
  label_to_category_id: COCO: our label -> the data set's category id.
  train_crop: the data set's own step before the augmentation, or None: a picklable callable
  (image uint8 (H, W, 3), boxes_xyxy (N, 4) normalised, labels (N,), rng) -> the same three (TT100K:
  square crops at full resolution, see tt100k.train_crop); train_crop_size_px and
  crop_on_object_prob say how it was set up, for messages and tests.
  auto_prepare: built on first use (generated, cheap) instead of asking for --mode=prepare.
  """
  name: str
  class_names: Sequence[str]
  parts: Sequence[Part]
  train_parts: Sequence[int] = (0,)
  eval_parts: Sequence[int] = (0,)
  split_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  label_to_category_id: Optional[Mapping[int, int]] = None
  train_crop: Optional[Callable] = None
  train_crop_size_px: int = 0
  crop_on_object_prob: float = 0.0
  auto_prepare: bool = False
  needs: str = ""              # the official files, for messages and the README
  describe: str = ""           # what is read, said first by --mode=prepare (a user's own files)
  prepare_flags: str = ""      # the prepare command's flags; "" = --config.data.manual_dir=DIR

  @property
  def num_classes(self):
    return len(self.class_names)


_BUILDERS = {}


def _cached_builder(cls, config, data_dir):
  # One instance per process, config and data_dir: building the DatasetInfo is not free, and TFDS
  # logs a warning for each instance of a custom (config-derived) BuilderConfig.
  key = (cls, getattr(config, "name", config), data_dir)
  if any(config is registered for registered in cls.BUILDER_CONFIGS):
    # By name: a builder pickles its arguments (Grain workers unpickle it), and TFDS refuses a copy
    # of a registered BuilderConfig object.
    config = config.name
  if key not in _BUILDERS:
    with _no_tfds_temp_folder():
      _BUILDERS[key] = cls(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  return _BUILDERS[key]


@contextlib.contextmanager
def _no_tfds_temp_folder():
  """Removes the empty temporary folder that constructing a builder of unprepared data leaves.

  TFDS's DatasetBuilder.__init__ then calls DatasetInfo.initialize_from_bucket, which makes
  `<tmp>/tmpXXXXXXXXtfds` (tempfile.mkdtemp) for files of its GCS bucket, finds none for this
  project's data sets and never removes it: one such folder per prepare. Only new, empty folders
  of that name are removed.
  """
  folder = tempfile.gettempdir()
  listing = lambda: {n for n in os.listdir(folder) if n.startswith("tmp") and n.endswith("tfds")}
  try:
    before = listing()
  except OSError:
    before = None
  try:
    yield
  finally:
    if before is not None:
      for name in listing() - before:
        try:
          os.rmdir(os.path.join(folder, name))   # only an empty folder
        except OSError:
          pass


def _builder(cls, config=None):
  def make(data_dir):
    return _cached_builder(cls, config, data_dir or None)
  return make


def _synthetic(data_cfg):
  spec = synthetic.spec_from_config(data_cfg.synthetic)
  part = Part(f"synthetic_small_objects/{spec.config_name()}",
              _builder(synthetic.SyntheticSmallObjects, synthetic.builder_config(spec)))
  return DatasetInfo(name="synthetic_small_objects", class_names=spec.class_names, parts=(part,),
                     auto_prepare=True, needs="nothing (generated from config.data.synthetic)")


_VOC_ALIASES = {"trainval": "train+validation"}


def _voc_part(year):
  return Part(f"mdssd_voc/{year}", _builder(voc.MdssdVoc, year),
              lambda manual_dir: voc.missing_files_message(manual_dir, year))


def _voc_needs(*years):
  return " + ".join(" + ".join(voc.VOC_ARCHIVES[y]) for y in years) + " (or their VOCdevkit/ folders)"


def _voc(year):
  def factory(data_cfg):
    del data_cfg
    return DatasetInfo(name=f"voc/{year}", class_names=list(voc.VOC_LABELS), parts=(_voc_part(year),),
                       split_aliases=_VOC_ALIASES, needs=_voc_needs(year))
  return factory


def _voc_union(data_cfg):
  del data_cfg
  return DatasetInfo(name="voc/2007+2012", class_names=list(voc.VOC_LABELS),
                     parts=(_voc_part("2007"), _voc_part("2012")), train_parts=(0, 1), eval_parts=(0,),
                     split_aliases=_VOC_ALIASES, needs=_voc_needs("2007", "2012"))


def _coco(data_cfg):
  del data_cfg
  part = Part("mdssd_coco/2017", _builder(coco.MdssdCoco, "2017"), coco.missing_files_message)
  return DatasetInfo(name="coco/2017", class_names=list(coco.COCO_CLASS_NAMES), parts=(part,),
                     label_to_category_id=coco.label_to_category_id(),
                     needs="annotations/instances_{train,val}2017.json + train2017/ + val2017/")


def _tt100k(data_cfg):
  cfg = data_cfg.tt100k
  builder_config = tt100k.builder_config(tuple(cfg.classes))
  part = Part(f"tt100k/{builder_config.name}", _builder(tt100k.Tt100k, builder_config),
              tt100k.missing_files_message)
  return DatasetInfo(name="tt100k", class_names=list(builder_config.classes), parts=(part,),
                     train_crop=tt100k.make_train_crop(cfg.train_crop_size_px, cfg.crop_on_object_prob),
                     train_crop_size_px=int(cfg.train_crop_size_px),
                     crop_on_object_prob=float(cfg.crop_on_object_prob),
                     needs="annotations.json + train/ + test/ (TT100K's data/ folder)")


def data_dir_root(data_dir):
  """The folder TFDS prepares into: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _custom(data_cfg):
  settings = custom.settings_from_config(data_cfg.custom)
  builder_config, describe = custom.builder_config(settings, data_dir_root(data_cfg.data_dir))
  part = Part(f"{custom.BUILDER_NAME}/{builder_config.name}",
              _builder(custom.CustomDetection, builder_config),
              lambda manual_dir: custom.missing_files_message(settings))
  category_ids = builder_config.category_ids
  return DatasetInfo(
      name="custom", class_names=list(builder_config.class_names), parts=(part,),
      label_to_category_id=({label: cid for label, cid in enumerate(category_ids, start=1)}
                            if category_ids is not None else None),
      needs=f"the files named by config.data.custom (train={settings.train})",
      describe=f"custom data: {describe}",
      prepare_flags=f"--config.data.custom.train={settings.train} (and the same "
                    "config.data.custom settings as this run)")


_REGISTRY = {
    "synthetic_small_objects": _synthetic,
    "voc/2007": _voc("2007"),
    "voc/2012": _voc("2012"),
    "voc/2007+2012": _voc_union,
    "coco/2017": _coco,
    "tt100k": _tt100k,
    "custom": _custom,
}


def register(name, factory):
  """Adds a data set: factory(data_cfg) -> DatasetInfo."""
  if name in _REGISTRY:
    raise ValueError(f"data set {name!r} is already registered")
  _REGISTRY[name] = factory


def known_datasets():
  return sorted(_REGISTRY)


def get_dataset(data_cfg):
  """DatasetInfo of config.data.name; raises ValueError listing the known names for an unknown one."""
  if data_cfg.name not in _REGISTRY:
    raise ValueError(f"unknown data set {data_cfg.name!r}; known: {', '.join(known_datasets())} "
                     "(set --config.data.name=...)")
  return _REGISTRY[data_cfg.name](data_cfg)


# ---- preparation state and random access ----------------------------------------------------------

def default_manual_dir(data_dir):
  """TFDS's default place for manually downloaded files: <data_dir>/downloads/manual."""
  return os.path.join(data_dir_root(data_dir), "downloads", "manual")


def _fresh_builder(part, data_dir, builder):
  """A new builder instance in place of a cached one whose info predates the data on disk."""
  for key, cached in list(_BUILDERS.items()):
    if cached is builder:
      del _BUILDERS[key]
  return part.make_builder(data_dir)


@contextlib.contextmanager
def _prepare_lock(builder):
  """Holds an exclusive lock on the builder config's folder while one process prepares it.

  Yields True when locked. The kernel releases the lock when its process dies, even by kill -9, so
  an `incomplete.*` folder found while holding the lock was left by a process that is gone. Where
  locks are unavailable (object stores, some network file systems) it yields False and nothing is
  cleaned up.
  """
  folder = os.fspath(builder.data_path.parent)   # <data_dir>/<name>/<config>/
  if "://" in folder:
    yield False
    return
  try:
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    logging.warning("cannot create the prepare lock in %s (%s): preparing without it", folder, e)
    yield False
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
      logging.warning("cannot lock %s (%s): preparing without the lock", folder, e)
      yield False
      return
    yield True
  finally:
    os.close(fd)   # releases the lock


def _remove_stale_incomplete(builder):
  """Deletes the `incomplete.*` folders TFDS left in the config folder when a prepare was killed."""
  folder = os.fspath(builder.data_path.parent)
  stale = sorted(n for n in os.listdir(folder) if n.startswith(INCOMPLETE_PREFIX)
                 and os.path.isdir(os.path.join(folder, n)))
  for name in stale:
    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
  if stale:
    logging.warning("removed %d unfinished folder(s) of an interrupted prepare in %s: %s",
                    len(stale), folder, ", ".join(stale))
  return stale


@contextlib.contextmanager
def _without_tfds_display():
  """TFDS's own display while it prepares: its progress bars off (`tfds.disable_progress_bar()`,
  the builders say how far they are through report.with_progress) and its two notices, which it
  print()s to stdout unconditionally ("Downloading and preparing dataset ...", "Dataset ...
  downloaded and prepared to ..."), kept off stdout: `prepare_part` says what it prepares and where.
  They are logged at DEBUG (shown with --verbosity=2). TFDS's default, bars on, is back afterwards.
  """
  tfds.disable_progress_bar()
  notices = io.StringIO()
  try:
    with contextlib.redirect_stdout(notices):
      yield
  finally:
    tfds.enable_progress_bar()
    if notices.getvalue().strip():
      logging.debug("TFDS: %s", notices.getvalue().strip())


def prepare_part(part, data_dir, manual_dir, bad_annotations="error"):
  """Builds one part in array_record format (a no-op when it is prepared); returns the builder.

  One process prepares a part at a time (a lock in its folder); leftovers of a killed prepare are
  removed first. What the builder repaired or skipped goes to report.REPORT_FILE in the prepared
  folder; `bad_annotations` ("error" | "skip") is config.data.bad_annotations.
  """
  report.check_policy(bad_annotations)
  builder = part.make_builder(data_dir)
  if builder.is_prepared():
    return builder
  message = part.missing_files(manual_dir)
  if message:
    raise FileNotFoundError(message)
  with _prepare_lock(builder) as locked:
    if builder.is_prepared():   # another process prepared it while this one waited for the lock
      return _fresh_builder(part, data_dir, builder)
    if locked:
      _remove_stale_incomplete(builder)
    logging.info("preparing %s in %s", part.tfds_name, builder.data_dir)
    builder.prepare_report = report.PrepareReport(bad_annotations)
    try:
      with _without_tfds_display():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
    except Exception:
      # Without the lock, another process may have prepared the same data concurrently.
      if not builder.is_prepared():
        raise
      return _fresh_builder(part, data_dir, builder)
    examples = {name: split.num_examples for name, split in builder.info.splits.items()}
    report.write(builder.data_path, builder.prepare_report.as_dict(part.tfds_name, examples))
  return part.make_builder(data_dir)


def prepared_builders(info, data_dir, part_indices, config_path_hint="CONFIG"):
  """The builders of `part_indices`, prepared; auto-prepares generated data, else raises."""
  builders = []
  for i in part_indices:
    part = info.parts[i]
    builder = part.make_builder(data_dir)
    if not builder.is_prepared():
      if not info.auto_prepare:
        flags = info.prepare_flags or "--config.data.manual_dir=DIR"
        raise FileNotFoundError(
            f"data set {info.name!r} ({part.tfds_name}) is not prepared in "
            f"{builder.data_dir_root}. Run once:\n  python main.py --config={config_path_hint} "
            f"--mode=prepare {flags}" + ("" if info.prepare_flags else
                                         f"\nwith DIR holding {info.needs}."))
      logging.info("%s is not prepared yet: generating it in %s (no files needed)", info.name,
                   builder.data_dir_root)
      builder = prepare_part(part, data_dir, "")
    fmt = builder.info.file_format
    if fmt is not None and getattr(fmt, "value", fmt) != FILE_FORMAT:
      raise ValueError(f"{builder.data_path} holds {getattr(fmt, 'value', fmt)} files; Grain needs "
                       f"{FILE_FORMAT}: delete that folder and rerun --mode=prepare")
    builders.append(builder)
  return builders


class ConcatSource:
  """Random access over several data sources one after the other (len, [i])."""

  def __init__(self, sources):
    self._sources = list(sources)
    self._starts = [0]
    for s in self._sources:
      self._starts.append(self._starts[-1] + len(s))

  def __len__(self):
    return self._starts[-1]

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._starts, index) - 1
    return self._sources[k][index - self._starts[k]]

  def __repr__(self):
    return f"ConcatSource({self._sources!r})"


def open_split(info, data_dir, split, for_eval=False):
  """Random access to `split` (aliases and "a+b" resolved) over the train or eval parts.

  A split may be sliced with TFDS's syntax, "train[:3800]", "train[3800:]", "train[:95%]"
  (tfds.core.ReadInstruction): e.g. a validation split held out of the training data.

  Records are TFDS examples with the image left encoded (bytes): the pipeline decodes it itself so
  that a damaged image can be skipped instead of raising inside the data source.
  """
  builders = prepared_builders(info, data_dir, info.eval_parts if for_eval else info.train_parts)
  names = info.split_aliases.get(split, split).split("+")
  sources = []
  for builder in builders:
    for name in names:
      if name.split("[", 1)[0] not in builder.info.splits:
        raise ValueError(f"data set {info.name!r} ({builder.name}/{builder.builder_config.name}) has no "
                         f"split {name!r}; it has {', '.join(sorted(builder.info.splits))}"
                         + (f" (and the aliases {dict(info.split_aliases)})" if info.split_aliases else ""))
      sources.append(builder.as_data_source(split=name,
                                            decoders={"image": tfds.decode.SkipDecoding()}))
  return sources[0] if len(sources) == 1 else ConcatSource(sources)
