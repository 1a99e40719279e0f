"""The Grain pipelines on a tiny prepared synthetic set: batch format, resume, sharding, eval padding,
and the repairs (corrupt images, boxes outside the image, empty images)."""

import os
import signal
import subprocess
import sys
import time

import cv2
import grain
from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from mdssd_jax.core import images
from mdssd_jax.data import pipeline
from mdssd_jax.data import prepare
from mdssd_jax.data import registry
from tests import helpers

tfds.disable_progress_bar()

NUM_TRAIN, NUM_TEST = 16, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  prepare.prepare(_config(path))
  return path


def _config(data_dir, **train):
  c = common.base_config()
  c.seed = 3
  c.data.name = "synthetic_small_objects"
  c.data.data_dir = data_dir
  c.data.synthetic.update(num_train=NUM_TRAIN, num_test=NUM_TEST, image_size_px=96, min_object_px=6,
                          max_object_px=24, max_objects=6)
  c.data.max_boxes = 8
  c.data.num_workers = 0
  c.model.input_size_px = 64
  c.model.num_classes = 6
  c.train.global_batch_size = 4
  c.eval.batch_size = 3
  for key, value in train.items():
    c.train[key] = value
  return c


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for a, b in zip(expected, actual):
    assert sorted(a) == sorted(b) == ["boxes", "image", "labels"]
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batch_format(data_dir):
  c = _config(data_dir)
  batch = next(pipeline.make_train_iterator(c))
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
  assert batch["boxes"].shape == (4, 8, 4) and batch["boxes"].dtype == np.float32
  assert batch["labels"].shape == (4, 8) and batch["labels"].dtype == np.int32
  real = batch["labels"] > 0
  assert real.any() and np.all(batch["labels"] <= 6)
  boxes = batch["boxes"][real]
  assert np.all((boxes >= 0) & (boxes <= 1))
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  assert np.all(batch["boxes"][~real] == 0)
  # Labels are packed first, then padding.
  assert np.all(np.diff(real.astype(int), axis=1) <= 0)


def test_batch_size_must_divide_by_processes(data_dir):
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=3)


def test_resume_in_a_fresh_pipeline(data_dir, tmp_path):
  c = _config(data_dir)
  iterator = pipeline.make_train_iterator(c)
  _take(iterator, 3)
  state = iterator.get_state()
  assert isinstance(state, bytes)
  # Also through Grain's Orbax handler, as the trainer's checkpoint stores it.
  directory = epath.Path(tmp_path)
  grain.checkpoint.CheckpointHandler().save(directory, item=iterator)
  uninterrupted = _take(iterator, 3)   # crosses an epoch boundary (16 records, 4 per batch)

  restored = pipeline.make_train_iterator(c)
  restored.set_state(state)
  _assert_same_batches(uninterrupted, _take(restored, 3))
  from_checkpoint = grain.checkpoint.CheckpointHandler().restore(
      directory, item=pipeline.make_train_iterator(c))
  _assert_same_batches(uninterrupted, _take(from_checkpoint, 3))

  # The seed decides order and augmentation.
  other = pipeline.make_train_iterator(_config(data_dir))
  other_seed = _config(data_dir)
  other_seed.seed = 4
  assert not np.array_equal(next(other)["image"],
                            next(pipeline.make_train_iterator(other_seed))["image"])


def test_resume_with_worker_processes(data_dir):
  c = _config(data_dir)
  c.data.num_workers = 1
  iterator = pipeline.make_train_iterator(c)
  _take(iterator, 2)
  state = iterator.get_state()
  uninterrupted = _take(iterator, 2)
  restored = pipeline.make_train_iterator(c)
  restored.set_state(state)
  _assert_same_batches(uninterrupted, _take(restored, 2))


def test_train_shards_are_disjoint_and_cover_the_split(data_dir):
  c = _config(data_dir)
  epochs = {}
  for process in (0, 1):
    iterator = pipeline.make_train_iterator(c, process_index=process, process_count=2)
    indices = []
    for _ in range(2 * NUM_TRAIN // 2 // 2):   # two epochs of this process's 8 records, 2 per batch
      assert next(iterator)["image"].shape[0] == 2
      indices.extend(iterator.last_record_indices.tolist())
    first, second = indices[:NUM_TRAIN // 2], indices[NUM_TRAIN // 2:]
    assert sorted(first) == sorted(second) and len(set(first)) == NUM_TRAIN // 2
    assert first != second   # reshuffled each epoch
    epochs[process] = set(first)
  assert not epochs[0] & epochs[1]
  assert epochs[0] | epochs[1] == set(range(NUM_TRAIN))


def test_eval_batches_padding_and_sharding(data_dir):
  c = _config(data_dir)
  ids, masks = [], []
  for process in (0, 1):
    batches = pipeline.make_eval_batches(c, process_index=process, process_count=2)
    assert len(batches) == 2 and batches.num_examples == 4   # 8 images, 4 per process, batches of 3
    for batch in batches:
      assert batch["image"].shape == (3, 64, 64, 3)
      assert batch["boxes"].shape[:2] == batch["labels"].shape == batch["difficult"].shape
      assert batch["image_id"].dtype == np.int64 and batch["orig_size"].dtype == np.int32
      ids.extend(batch["image_id"].tolist())
      masks.extend(batch["batch_mask"].tolist())
      padding = ~batch["batch_mask"]
      assert np.all(batch["image_id"][padding] == -1) and np.all(batch["labels"][padding] == 0)
      np.testing.assert_array_equal(batch["orig_size"][~padding], 96)
  assert ids == [0, 1, 2, 3, -1, -1, 4, 5, 6, 7, -1, -1]
  assert masks == [i >= 0 for i in ids]

  ids = [i for batch in pipeline.make_eval_batches(c, max_images=5) for i in batch["image_id"].tolist()]
  assert ids == [0, 1, 2, 3, 4, -1]


def test_eval_ground_truth_is_complete(data_dir):
  c = _config(data_dir)
  c.data.max_boxes = 1   # smaller than the largest object count: eval pads further instead
  source = tfds.data_source(registry.get_dataset(c.data).parts[0].tfds_name, split="test",
                            data_dir=data_dir)
  largest = max(len(source[i]["objects"]["label"]) for i in range(NUM_TEST))
  assert largest > 1
  batches = pipeline.make_eval_batches(c)
  assert batches.max_boxes == largest
  for batch in batches:
    for image_id, boxes, labels in zip(batch["image_id"], batch["boxes"], batch["labels"]):
      if image_id < 0:
        continue
      objects = source[int(image_id)]["objects"]
      expected = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]
      count = len(expected)
      np.testing.assert_allclose(boxes[:count], expected, atol=1e-6)
      np.testing.assert_array_equal(labels[:count], np.asarray(objects["label"]) + 1)
      assert np.all(labels[count:] == 0)


def test_unprepared_real_data_set_says_prepare(tmp_path):
  c = common.base_config()
  c.data.name = "voc/2007"
  c.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="--mode=prepare"):
    pipeline.make_eval_batches(c)


# ---- repairs, one record at a time ------------------------------------------------------------------

def _jpeg(height=40, width=60):
  image = np.zeros((height, width, 3), np.uint8)
  image[10:20, 5:25] = (200, 30, 30)
  return cv2.imencode(".jpg", image[..., ::-1])[1].tobytes()   # OpenCV writes BGR


def test_decode_image_refuses_damaged_bytes():
  good = _jpeg()
  image = images.decode_image(good)
  assert image.shape == (40, 60, 3) and abs(int(image[15, 10, 0]) - 200) < 10   # RGB order
  assert images.decode_image(good[:len(good) // 2]) is None    # truncated
  assert images.decode_image(b"not an image at all") is None
  assert images.decode_image(b"") is None


def test_clip_and_drop_degenerate_counts():
  boxes = np.array([[0.1, 0.1, 0.5, 0.5],      # fine
                    [-0.2, 0.3, 0.4, 1.3],     # reaches outside: clipped
                    [0.3, 0.3, 0.3, 0.6],      # zero width: dropped
                    [1.2, 0.1, 1.5, 0.4],      # entirely outside: zero width once clipped
                    [np.nan, 0.1, 0.2, 0.2]])  # broken
  labels = np.array([1, 2, 3, 4, 5])
  out, out_labels, num_clipped, num_degenerate = pipeline.clip_and_drop_degenerate(boxes, labels)
  # Reference: plain loops over the boxes.
  expected, expected_labels, clipped, degenerate = [], [], 0, 0
  for box, label in zip(boxes, labels):
    if not all(np.isfinite(box)):
      degenerate += 1
      continue
    c = [min(max(v, 0.0), 1.0) for v in box]
    clipped += c != list(box)
    if c[2] > c[0] and c[3] > c[1]:
      expected.append(c)
      expected_labels.append(label)
    else:
      degenerate += 1
  np.testing.assert_allclose(out, expected)
  np.testing.assert_array_equal(out_labels, expected_labels)
  assert (num_clipped, num_degenerate) == (clipped, degenerate) == (2, 3)


def test_corrupt_record_skipped_and_empty_record_valid(data_dir):
  c = _config(data_dir)
  decode = pipeline._DecodeTrain("test", keep_difficult=False)
  no_objects = {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64),
                "is_difficult": np.zeros((0,), bool)}
  assert "_corrupt" in decode.map({"index": 7, "record": {"image": b"\xff\xd8junk", "objects": no_objects}})
  assert not pipeline._NotCorrupt().filter({"_corrupt": True})
  # The skip is counted on the next example; an image without boxes is a valid, all-padding example.
  empty = decode.map({"index": 8, "record": {"image": _jpeg(), "objects": no_objects}})
  assert pipeline._NotCorrupt().filter(empty)
  np.testing.assert_array_equal(empty["_stats"], [1, 0, 0, 0])
  augment_and_pad = pipeline._AugmentAndPad(c.augment.to_dict(), 64, 8, None, (0, 0, 0))
  out = augment_and_pad.random_map(empty, np.random.default_rng(0))
  assert out["image"].shape == (64, 64, 3)
  assert np.all(out["labels"] == 0) and np.all(out["boxes"] == 0)
  # Difficult boxes go when keep_difficult is False; more boxes than slots are truncated and counted.
  many = {"bbox": np.tile([[0.1, 0.1, 0.9, 0.9]], (10, 1)).astype(np.float32),
          "label": np.zeros((10,), np.int64), "is_difficult": np.arange(10) < 1}
  decoded = decode.map({"index": 9, "record": {"image": _jpeg(), "objects": many}})
  assert len(decoded["labels"]) == 9
  c.augment.crop_min_ious = (None,)
  c.augment.expand_prob = 0.0
  out = pipeline._AugmentAndPad(c.augment.to_dict(), 64, 8, None, (0, 0, 0)).random_map(
      decoded, np.random.default_rng(0))
  assert np.all(out["labels"] == 1) and out["_stats"][3] == 1


def test_pipeline_stats_add():
  stats = pipeline.PipelineStats()
  stats.add(np.array([[1, 2, 3, 4], [0, 1, 0, 1]]), examples=2)
  assert stats.as_dict() == {"examples": 2, "corrupt_images": 1, "boxes_clipped": 3,
                             "degenerate_dropped": 3, "boxes_truncated": 5}


_PARENT = """
import sys, time
from configs import common
from mdssd_jax.data import pipeline
c = common.base_config()
c.seed = 3
c.data.name = "synthetic_small_objects"
c.data.data_dir = {data_dir!r}
c.data.synthetic.update(num_train={num_train}, num_test={num_test}, image_size_px=96, min_object_px=6,
                        max_object_px=24, max_objects=6)
c.data.max_boxes = 8
c.data.num_workers = 2
c.model.input_size_px = 64
c.train.global_batch_size = 4
c.eval.batch_size = 3
train = pipeline.make_train_iterator(c)
next(train)
evaluation = iter(pipeline.make_eval_batches(c))
next(evaluation)
print("READY", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grain_workers_end_when_the_trainer_is_killed(data_dir):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = _PARENT.format(root=root, data_dir=data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST)
  parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root)
  try:
    assert parent.stdout.readline().strip() == "READY"
    workers = [p for p in helpers.child_pids(parent.pid) if helpers.running(p)]
    with open(f"/proc/{workers[0]}/cmdline") as f:
      assert "multiprocessing" in f.read()
    assert len(workers) >= 4   # 2 training + 2 evaluation workers (+ multiprocessing's tracker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
  finally:
    if parent.poll() is None:
      parent.kill()
  deadline = time.time() + 10
  while time.time() < deadline and any(helpers.running(p) for p in workers):
    time.sleep(0.1)
  left = [p for p in workers if helpers.running(p)]
  for pid in left:   # do not leave them behind if the test fails
    os.kill(pid, signal.SIGKILL)
  assert not left, f"worker processes {left} outlived the killed trainer"


def test_eval_area_is_minus_one_without_annotated_areas(data_dir):
  batch = next(iter(pipeline.make_eval_batches(_config(data_dir))))
  assert batch["area"].dtype == np.float32 and batch["area"].shape == batch["labels"].shape
  np.testing.assert_array_equal(batch["area"], -1.0)


def test_skip_warnings_name_the_file(caplog):
  decode = pipeline._DecodeTrain("test", keep_difficult=True)
  record = {"image": b"\xff\xd8junk", "image/filename": b"JPEGImages/000042.jpg",
            "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64)}}
  with caplog.at_level("WARNING"):
    decode.map({"index": 5, "record": record})
  assert "JPEGImages/000042.jpg (record 5)" in caplog.text


@pytest.mark.parametrize("size", [0, -4])
def test_non_positive_batch_sizes_name_the_config_key(data_dir, size):
  with pytest.raises(ValueError, match=f"config.train.global_batch_size={size}: a batch needs"):
    pipeline.make_train_iterator(_config(data_dir, global_batch_size=size))
  c = _config(data_dir)
  c.eval.batch_size = size
  with pytest.raises(ValueError, match=f"config.eval.batch_size={size}: a batch needs"):
    pipeline.make_eval_batches(c)
