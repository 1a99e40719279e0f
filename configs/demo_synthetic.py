"""The CPU demo: a narrow MDSSD300 trained from scratch on the generated small-object data set.

`python main.py --config=configs/demo_synthetic.py --workdir=/tmp/demo` trains it on a laptop CPU in
minutes; nothing is downloaded.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.mdssd300(c)
  c.model.width_multiplier = 0.25
  c.model.batch_norm = True
  c.data.name = "synthetic_small_objects"
  c.model.num_classes = c.data.synthetic.num_classes
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.max_boxes = 32
  c.eval.metric = "voc"
  c.eval.use_07_metric = False
  c.train.optimizer = "adamw"
  c.train.base_lr = 1e-3
  c.train.weight_decay = 1e-4
  c.train.global_batch_size = 16
  c.train.reference_batch_size = 16
  c.train.num_steps = 2000
  c.train.warmup_steps = 100
  c.train.lr_decay_steps = (1500, 1800)
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  c.eval.every_steps = 1000
  c.eval.batch_size = 16
  return c
