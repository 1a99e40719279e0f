"""MDSSD512 on Tsinghua-Tencent 100K traffic signs, 45 classes (paper: 77.6 mAP).

Images are 2048x2048 with signs of a few to a few dozen pixels: training takes 512x512 crops at the
image's own resolution and evaluation tiles the full image, so a sign keeps its real pixel size.
"""

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
  # Crops already keep signs at full resolution: no zoom-out, and IoU crops inside the tile only.
  c.augment.expand_prob = 0.0
  c.eval.metric = "tt100k"
  c.eval.use_07_metric = False
  c.eval.score_threshold = 0.01
  c.eval.tiled.enabled = True
  c.eval.tiled.overlap_px = 64
  c.train.global_batch_size = 32
  c.train.num_steps = 60_000
  c.train.lr_decay_steps = (40_000, 50_000)
  c.eval.every_steps = 10_000
  return c
