"""A smoke-test MDSSD: 96 px input, 1/16 width, a few dozen generated images. Runs in seconds.

The tests, the quick-start notebook's tiny setting and `benchmarks/` use it; it keeps the whole
architecture (VGG16 trunk, three Fusion Blocks with 8x deconvolution, six heads) at a toy size.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.mdssd300(c)
  c.model.input_size_px = 96
  c.model.width_multiplier = 1 / 16
  c.model.batch_norm = True
  c.model.allow_random_trunk = True   # a smoke test: trains from scratch
  # At 96 px: conv3_3 24, conv4_3 12, conv7 6; stride-2 extras give conv8_2 3, conv9_2 2, conv10_2 1,
  # so each Fusion Block still spans 8x (3 -> 24, 2 -> 12, 1 -> 6).
  c.model.extras = (("conv8", 256, 512, 3, 2, 1), ("conv9", 128, 256, 3, 2, 1),
                    ("conv10", 128, 256, 3, 2, 1))
  c.model.head_sources = ("fusion1", "fusion2", "fusion3", "conv8_2", "conv9_2", "conv10_2")
  c.anchors.feature_sizes = (24, 12, 6, 3, 2, 1)
  c.anchors.steps = (4, 8, 16, 32, 48, 96)
  c.anchors.min_sizes = (6, 12, 24, 40, 56, 72)
  c.anchors.max_sizes = (12, 24, 40, 56, 72, 96)
  c.anchors.aspect_ratios = ((2,), (2,), (2, 3), (2, 3), (2,), (2,))
  c.data.name = "synthetic_small_objects"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.max_boxes = 16
  c.data.num_workers = 0
  c.data.synthetic.num_train = 32
  c.data.synthetic.num_test = 8
  c.data.synthetic.image_size_px = 96
  c.model.num_classes = c.data.synthetic.num_classes
  c.evals.voc = common.voc_eval(use_07_metric=False, every_steps=0, num_pictures=2)
  c.eval.batch_size = 4
  c.train.optimizer = "adamw"
  c.train.base_lr = 1e-3
  c.train.weight_decay = 1e-4
  c.train.global_batch_size = 4
  c.train.reference_batch_size = 4
  c.train.num_steps = 4
  c.train.warmup_steps = 2
  c.train.lr_decay_steps = (1000,)
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  return c
