"""MDSSD512 on Tsinghua-Tencent 100K traffic signs, 45 classes (paper: 77.6 mAP).

Images are 2048x2048 with signs of a few to a few dozen pixels: training takes 512x512 crops at the
image's own resolution and evaluation tiles the full image, so a sign keeps its real pixel size.
"""

import ml_collections

from configs import common


def get_config():
  c = common.base_config()
  # Default boxes one octave below the VOC ladder: most TT100K signs are under 32 px.
  common.mdssd512(c, finest=(10.24, 20.48),
                  min_sizes=(20.48, 40.96, 81.92, 153.6, 230.4, 307.2, 384.0),
                  max_sizes=(40.96, 81.92, 153.6, 230.4, 307.2, 384.0, 460.8))
  c.model.num_classes = 45
  c.data.name = "tt100k"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.max_boxes = 64
  c.data.tt100k.train_crop_size_px = 512
  # One worker spends 18-19 CPU ms per example (16 of them decoding the 2048 px JPEG; the crop and
  # the augmentation to 512 px ~3 ms): ~50 images/s per busy core (`python -m benchmarks.bench_input
  # --tt100k`, 600 KiB JPEGs, x86_64). 8 workers give ~400 images/s, 12 batches of 32 per second, more
  # than one GPU's MDSSD512 step is expected to take (not measured yet). Use at most the host's free
  # cores; raise it if steps/s stays the same when the batch shrinks (input-bound).
  c.data.num_workers = 8
  # Crops already keep signs at full resolution: no zoom-out, and IoU crops inside the tile only.
  c.augment.expand_prob = 0.0
  # Horizontal flip (docs/augmentation.md): "no left turn" and "no right turn" are each other's
  # mirror image, so a flip swaps their labels. A mirrored sign with digits or text (speed, minimum
  # speed, height and weight limits, end of limit, the "yield" sign's character) is no real sign;
  # neither are mirrored "keep right" (it becomes "keep left") and "merge" (the other side), whose
  # mirrors are signs outside the 45, nor the mixed "other" classes: a crop holding any of these is
  # never flipped; crops of symmetric or symbol-only signs still are.
  c.augment.flip_swap_labels = (("p19", "p23"),)
  c.augment.flip_never_labels = (
      "il100", "il60", "il80", "ph4", "ph4.5", "ph5", "pl100", "pl120", "pl20", "pl30", "pl40",
      "pl5", "pl50", "pl60", "pl70", "pl80", "pm20", "pm30", "pm55", "pr40", "pg",
      "i5", "w59", "io", "po", "wo")
  c.evals = ml_collections.ConfigDict(dict(tt100k=common.tt100k_eval(every_steps=10_000)))
  c.eval.best_metric = "tt100k/mAP"
  c.eval.score_threshold = 0.01
  c.eval.tiled.enabled = True
  c.eval.tiled.overlap_px = 64
  c.train.global_batch_size = 32
  c.train.num_steps = 60_000
  c.train.lr_decay_steps = (40_000, 50_000)
  c.eval.pre_nms_top_k = 400            # Caffe's DetectionOutput: top 400 per class before NMS
  common.caffe_sgd_recipe(c)
  return c
