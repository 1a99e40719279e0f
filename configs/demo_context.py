"""The CPU demo on the context data: a tiny object's class is told by a scene marker far from it.

    python main.py --config=configs/demo_context.py --workdir=/tmp/context

configs/demo_synthetic.py (MDSSD, 192 px, 1/8 width, batch norm, the same recipe) on
`config.data.synthetic.context = True` (mdssd_jax/data/synthetic.py, docs/study.md "The context
study"): three tiny shapes (< 16 px) whose class also depends on which of two textures (stripes or
checks) fills a large patch in a corner of the image, at least 48 px from every tiny object; plus,
ring and diamond (16-40 px) keep classes told by their own shape. 9 classes. The generated set has
its own prepared name, beside the demo's.
"""

from configs import demo_synthetic


def get_config():
  c = demo_synthetic.get_config()
  c.data.synthetic.context = True
  c.model.num_classes = 9   # 3 tiny shapes x 2 scene kinds + 3 local shapes
  return c
