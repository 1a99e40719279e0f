"""Grain input pipelines over the prepared TFDS data: resumable training batches and padded eval batches.

Training: per-process shard -> shuffle (config.seed) -> decode -> ground truth (drop crowd, maybe
difficult; clip; drop degenerate) -> [full-resolution crop] -> augment.train_transform -> pad to
config.data.max_boxes -> batch. Eval: this process's slice of the split -> decode -> eval_transform ->
pad -> fixed-size batches with `batch_mask`. Damaged images are skipped and counted, never fatal.
"""

import dataclasses
import functools
import logging
import math
import os

from absl import flags
import grain
import numpy as np

from mdssd_jax.core import images
from mdssd_jax.data import augment
from mdssd_jax.data import orphan_guard
from mdssd_jax.data import registry

# The counters each example carries (as `_stats`) and PipelineStats sums, in this order.
STAT_NAMES = ("corrupt_images", "boxes_clipped", "degenerate_dropped", "boxes_truncated")



@dataclasses.dataclass
class PipelineStats:
  """What the pipeline had to repair or skip so far (this process): log it with the metrics.

  corrupt_images: undecodable images skipped; boxes_clipped: boxes reaching outside the image,
  clipped; degenerate_dropped: boxes of zero width or height (or NaN) dropped; boxes_truncated:
  boxes beyond max_boxes cut off (training only: eval pads to the largest count instead).
  """
  examples: int = 0
  corrupt_images: int = 0
  boxes_clipped: int = 0
  degenerate_dropped: int = 0
  boxes_truncated: int = 0

  def add(self, counts, examples):
    counts = np.asarray(counts, np.int64).reshape(-1, len(STAT_NAMES)).sum(0)
    self.examples += int(examples)
    for name, value in zip(STAT_NAMES, counts):
      setattr(self, name, getattr(self, name) + int(value))

  def as_dict(self):
    return dataclasses.asdict(self)


# ---- one record ----------------------------------------------------------------------------------

def record_name(record, index):
  """How warnings name a record: its image file (image/filename), else its index in the split."""
  name = record.get("image/filename") if hasattr(record, "get") else None
  if isinstance(name, (bytes, np.bytes_)):
    name = bytes(name).decode("utf-8", "replace")
  return f"{name} (record {index})" if name else f"record {index}"


def record_area(record, count):
  """The objects' annotated areas in pixels of the original image (COCO's `area`: the segment's
  area, which COCO's small/medium/large buckets use), float32 (N,); -1 where the data set has none."""
  area = record["objects"].get("area") if hasattr(record["objects"], "get") else None
  if area is None:
    return np.full((count,), -1.0, np.float32)
  return np.asarray(area, np.float32).reshape(count)


def record_objects(record):
  """A TFDS record's objects -> (boxes_xyxy (N, 4) float32 normalised, labels (N,) int32 1..C,
  difficult (N,) bool, crowd (N,) bool). TFDS boxes are (ymin, xmin, ymax, xmax); labels 0-based."""
  objects = record["objects"]
  bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
  labels = np.asarray(objects["label"], np.int32).reshape(-1) + 1
  count = len(labels)
  flag = lambda key: np.asarray(objects.get(key, np.zeros(count, bool)), bool).reshape(count)
  return bbox[:, [1, 0, 3, 2]], labels, flag("is_difficult"), flag("is_crowd")


def clip_and_drop_degenerate(boxes_xyxy, *per_box):
  """Clips boxes (N, 4) normalised to [0, 1] and drops those of zero width or height (or NaN).

  Returns (boxes, *per_box filtered alike, num_clipped, num_degenerate).
  """
  boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
  clipped = np.clip(boxes, 0.0, 1.0)
  finite = np.isfinite(boxes).all(axis=1)
  num_clipped = int(np.sum(finite & np.any(clipped != boxes, axis=1)))
  keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  return (clipped[keep], *(np.asarray(a)[keep] for a in per_box), num_clipped, int(np.sum(~keep)))


def pad_boxes(boxes_xyxy, labels, max_boxes, difficult=None):
  """Pads (or truncates) to max_boxes slots; label 0 = padding.

  Returns ({"boxes": float32 (max_boxes, 4), "labels": int32 (max_boxes,)[, "difficult": bool
  (max_boxes,)]}, number of boxes cut off).
  """
  count = min(len(labels), max_boxes)
  out = {"boxes": np.zeros((max_boxes, 4), np.float32), "labels": np.zeros((max_boxes,), np.int32)}
  out["boxes"][:count] = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)[:count]
  out["labels"][:count] = np.asarray(labels)[:count]
  if difficult is not None:
    out["difficult"] = np.zeros((max_boxes,), bool)
    out["difficult"][:count] = np.asarray(difficult, bool)[:count]
  return out, len(labels) - count


class _IndexedSource:
  """A data source whose records carry their index in the split (for warnings and tests)."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return {"index": int(index), "record": self._source[int(index)]}

  def __repr__(self):
    return f"_IndexedSource({self._source!r})"


# ---- training -------------------------------------------------------------------------------------

class _DecodeTrain(grain.transforms.Map):
  """Decodes one record into (image, training boxes, labels), or a `_corrupt` marker for the filter.

  A skipped image is counted on the next example this worker emits: workers are separate processes,
  and the batch is the only way back to the main process's PipelineStats.
  """

  def __init__(self, dataset_name, keep_difficult):
    self._dataset_name = dataset_name
    self._keep_difficult = bool(keep_difficult)
    self._pending_corrupt = 0
    self._parent_pid = os.getpid()   # the process that builds the pipeline

  def map(self, element):
    # In a Grain worker process: end with the trainer, even when it is killed with kill -9.
    orphan_guard.watch_parent(self._parent_pid)
    index, record = element["index"], element["record"]
    image = images.decode_image(record["image"])
    if image is None:
      logging.warning("%s: the image %s cannot be decoded (damaged or truncated file); skipped",
                      self._dataset_name, record_name(record, index))
      self._pending_corrupt += 1
      return {"_corrupt": True}
    boxes, labels, difficult, crowd = record_objects(record)
    keep = ~crowd & (self._keep_difficult | ~difficult)  # crowd regions are never training targets
    boxes, labels, num_clipped, num_degenerate = clip_and_drop_degenerate(boxes[keep], labels[keep])
    stats = np.array([self._pending_corrupt, num_clipped, num_degenerate, 0], np.int64)
    self._pending_corrupt = 0
    return {"image": image, "boxes": boxes, "labels": labels, "_index": np.int64(index),
            "_stats": stats}


class _NotCorrupt(grain.transforms.Filter):

  def filter(self, element):
    return "_corrupt" not in element


class _AugmentAndPad(grain.transforms.RandomMap):
  """[The data set's own crop] -> augment.train_transform -> pad; `rng` is Grain's per-record
  generator. train_crop: registry.DatasetInfo.train_crop (None for most data sets)."""

  def __init__(self, aug_cfg, size_px, max_boxes, train_crop, fill_rgb):
    self._aug_cfg = aug_cfg
    self._size_px = int(size_px)
    self._max_boxes = int(max_boxes)
    self._train_crop = train_crop
    self._fill_rgb = tuple(fill_rgb)

  def random_map(self, element, rng):
    image, boxes, labels = element["image"], element["boxes"], element["labels"]
    if self._train_crop is not None:
      image, boxes, labels = self._train_crop(image, boxes, labels, rng)
    image, boxes, labels = augment.train_transform(image, boxes, labels, rng, self._aug_cfg,
                                                   self._size_px, fill_rgb=self._fill_rgb)
    boxes, labels, _, num_degenerate = clip_and_drop_degenerate(boxes, labels)
    padded, num_truncated = pad_boxes(boxes, labels, self._max_boxes)
    stats = element["_stats"] + np.array([0, 0, num_degenerate, num_truncated], np.int64)
    return dict(padded, image=image, _index=element["_index"], _stats=stats)


class TrainIterator:
  """Infinite iterator of this process's training batches {image, boxes, labels} (host numpy).

  get_state() -> bytes and set_state(bytes) save / restore the position: a fresh pipeline of the same
  config restored from a state yields exactly the batches the uninterrupted one would have. It has
  the interface of Grain's DataLoaderIterator, so `grain.checkpoint.CheckpointSave(iterator)` /
  `CheckpointRestore(iterator)` store it as an item of an Orbax checkpoint.
  `stats` (PipelineStats) counts what was skipped or repaired; `last_record_indices` holds the split
  indices of the last batch's examples.
  """

  def __init__(self, loader):
    self._loader = loader
    self._iterator = iter(loader)
    self.stats = PipelineStats()
    self.last_record_indices = np.zeros((0,), np.int64)

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._iterator))
    self.last_record_indices = np.asarray(batch.pop("_index"))
    stats = batch.pop("_stats")
    self.stats.add(stats, examples=len(self.last_record_indices))
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)

  def start_prefetch(self):
    self._iterator.start_prefetch()

  def checkpoint_save_args(self):
    """The Orbax item that saves this iterator's position (state/checkpointing.py)."""
    return grain.checkpoint.CheckpointSave(self)

  def checkpoint_restore_args(self):
    """The Orbax item that restores this iterator's position in place."""
    return grain.checkpoint.CheckpointRestore(self)


def _allow_grain_workers():
  """Grain's worker processes read absl flags: outside an absl app (notebooks, tests) use defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _local_batch_size(global_batch_size, process_count, what):
  if int(global_batch_size) < 1:
    raise ValueError(f"{what}={global_batch_size}: a batch needs at least one image; set a positive "
                     f"multiple of the {process_count} process(es)")
  if global_batch_size % process_count:
    raise ValueError(f"{what}={global_batch_size} is not divisible by the {process_count} processes; "
                     f"choose a multiple of {process_count}")
  return global_batch_size // process_count


def make_train_iterator(config, process_index=0, process_count=1):
  """TrainIterator of per-process batches of config.train.global_batch_size // process_count.

  Order and augmentation follow config.seed (and config.data.num_workers: Grain batches within each
  worker); process i of n reads its own shard of the split, reshuffled every epoch, forever.
  Batches: image uint8 (B, S, S, 3) RGB, boxes float32 (B, max_boxes, 4) xyxy normalised (zeros =
  padding), labels int32 (B, max_boxes) 1..C (0 = padding).
  """
  data_cfg = config.data
  info = registry.get_dataset(data_cfg)
  batch_size = _local_batch_size(config.train.global_batch_size, process_count,
                                 "config.train.global_batch_size")
  source = registry.open_split(info, data_cfg.data_dir, data_cfg.train_split)
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                      drop_remainder=False)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                                        num_epochs=None, seed=int(config.seed))
  operations = [
      _DecodeTrain(info.name, data_cfg.keep_difficult),
      _NotCorrupt(),
      _AugmentAndPad(augment.resolve_flip_labels(config.augment.to_dict(), info.class_names),
                     config.model.input_size_px, data_cfg.max_boxes, info.train_crop,
                     augment.fill_rgb_from_pixel_convention(config.model.pixel)),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=True),
  ]
  if data_cfg.num_workers > 0:
    _allow_grain_workers()
  loader = grain.DataLoader(data_source=_IndexedSource(source), sampler=sampler, operations=operations,
                            worker_count=int(data_cfg.num_workers),
                            worker_buffer_size=max(1, int(data_cfg.prefetch_batches)),
                            shard_options=shard)
  return TrainIterator(loader)


# ---- evaluation -----------------------------------------------------------------------------------

_MAX_OBJECTS_CACHE = {}


def _max_objects(source, count, cache_key):
  """The largest number of objects of an image among the first `count` records (cached)."""
  key = (cache_key, count)
  if key not in _MAX_OBJECTS_CACHE:
    _MAX_OBJECTS_CACHE[key] = max((len(source[i]["objects"]["label"]) for i in range(count)),
                                  default=0)
  return _MAX_OBJECTS_CACHE[key]


class _EvalExample(grain.transforms.Map):
  """Split position -> one padded eval example (position -1 or a damaged image: a masked blank)."""

  def __init__(self, source, dataset_name, size_px, max_boxes, with_original_images):
    self._source = source
    self._dataset_name = dataset_name
    self._size_px = int(size_px)
    self._max_boxes = int(max_boxes)
    self._with_original_images = with_original_images

  def _blank(self, corrupt):
    padded, _ = pad_boxes(np.zeros((0, 4)), np.zeros((0,), np.int32), self._max_boxes,
                          np.zeros((0,), bool))
    out = dict(padded, image=np.zeros((self._size_px, self._size_px, 3), np.uint8),
               area=np.full((self._max_boxes,), -1.0, np.float32),
               image_id=np.int64(-1), orig_size=np.zeros((2,), np.int32), batch_mask=np.bool_(False),
               _stats=np.array([int(corrupt), 0, 0, 0], np.int64))
    if self._with_original_images:
      out["original_image"] = None
    return out

  def map(self, position):
    position = int(position)
    if position < 0:
      return self._blank(corrupt=False)
    record = self._source[position]
    image = images.decode_image(record["image"])
    if image is None:
      logging.warning("%s: the eval image %s cannot be decoded (damaged or truncated file); left "
                      "out of the evaluation (batch_mask False)", self._dataset_name,
                      record_name(record, position))
      return self._blank(corrupt=True)
    boxes, labels, difficult, crowd = record_objects(record)
    area = record_area(record, len(labels))
    boxes, labels, difficult, area, num_clipped, num_degenerate = clip_and_drop_degenerate(
        boxes, labels, difficult | crowd, area)  # crowd regions are ignored like difficult boxes
    padded, num_truncated = pad_boxes(boxes, labels, self._max_boxes, difficult)
    assert num_truncated == 0, "eval max_boxes is the split's largest object count"
    padded["area"] = np.full((self._max_boxes,), -1.0, np.float32)
    padded["area"][:len(area)] = area
    out = dict(padded, image=images.eval_transform(image, self._size_px),
               image_id=np.int64(position), orig_size=np.array(image.shape[:2], np.int32),
               batch_mask=np.bool_(True), _stats=np.array([0, num_clipped, num_degenerate, 0], np.int64))
    if self._with_original_images:
      out["original_image"] = image
    return out


def _stack_eval(examples):
  """Stacks a list of eval examples; original images (any size) stay a list."""
  batch = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    batch[key] = values if key == "original_image" else np.stack(values)
  return batch


class EvalBatches:
  """This process's eval batches, deterministic and of fixed shapes; iterate as often as needed.

  Every process yields `num_batches` batches (the same number, so that collective ops line up);
  process i's examples are the i-th contiguous slice of the split (the first max_images
  records when that is > 0); the slices together cover it exactly once. A batch holds:
    image uint8 (B, S, S, 3), the whole image warped to S x S;
    boxes float32 (B, M, 4) xyxy normalised to the original image; labels int32 (B, M) (0 = padding);
    difficult bool (B, M) (VOC difficult or COCO crowd: ignored by the evaluators);
    area float32 (B, M) the annotated object area in pixels of the original image (COCO's `area`,
      which its small/medium/large buckets use); -1 where the data set has none (use the box area)
      and for padding;
    image_id int64 (B,) index in the split, -1 for padding; orig_size int32 (B, 2) (height, width);
    batch_mask bool (B,) False for padding (and for an image that cannot be decoded);
    original_image: list of B uint8 (H, W, 3) arrays (None for padding), with with_original_images.
  M = max(config.data.max_boxes, the split's largest object count): no ground truth is dropped.
  """

  def __init__(self, config, split=None, process_index=0, process_count=1,
               with_original_images=False, max_images=0):
    data_cfg = config.data
    self.info = registry.get_dataset(data_cfg)
    self.split = split or data_cfg.eval_split
    self.batch_size = int(config.eval.batch_size)
    if self.batch_size < 1:
      raise ValueError(f"config.eval.batch_size={self.batch_size}: a batch needs at least one image; "
                       "set a positive number")
    self._num_workers = int(data_cfg.num_workers)
    self._size_px = int(config.model.input_size_px)
    self._with_original_images = with_original_images
    self._source = registry.open_split(self.info, data_cfg.data_dir, self.split, for_eval=True)
    total = len(self._source)
    if max_images > 0:
      total = min(total, int(max_images))
    self.num_split_examples = total
    per_process = math.ceil(total / process_count)
    self._start = min(process_index * per_process, total)
    self._stop = min(self._start + per_process, total)
    self.num_batches = math.ceil(per_process / self.batch_size)
    cache_key = (str(data_cfg.data_dir), self.info.parts[self.info.eval_parts[0]].tfds_name, self.split)
    self.max_boxes = max(int(data_cfg.max_boxes), _max_objects(self._source, total, cache_key))
    self.stats = PipelineStats()

  @property
  def num_examples(self):
    """Real (unpadded) examples of this process."""
    return self._stop - self._start

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    positions = list(range(self._start, self._stop))
    positions += [-1] * (self.num_batches * self.batch_size - len(positions))
    dataset = grain.MapDataset.source(positions).map(
        _EvalExample(self._source, self.info.name, self._size_px, self.max_boxes,
                     self._with_original_images))
    dataset = dataset.batch(self.batch_size, drop_remainder=False, batch_fn=_stack_eval)
    if self._num_workers > 0:
      _allow_grain_workers()
      dataset = dataset.to_iter_dataset().mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._num_workers),
          # The workers end with this process, even when it is killed with kill -9.
          worker_init_fn=functools.partial(orphan_guard.worker_init_fn, os.getpid()))
    for batch in dataset:
      stats = batch.pop("_stats")
      self.stats.add(stats, examples=int(np.sum(batch["batch_mask"])))
      yield batch


def make_eval_batches(config, split=None, process_index=0, process_count=1,
                      with_original_images=False, max_images=0):
  """EvalBatches of config.eval.batch_size over `split` (default config.data.eval_split), of its
  first `max_images` records (0 = all; an evaluator's config.evals.<name>.max_images)."""
  return EvalBatches(config, split, process_index, process_count, with_original_images, max_images)
