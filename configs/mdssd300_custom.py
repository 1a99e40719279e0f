"""MDSSD300 on your own files: COCO JSON, an ultralytics data.yaml or a VOC folder (docs/your_data.md).

    python main.py --config=configs/mdssd300_custom.py --mode=prepare \
        --config.data.custom.train=/data/signs/annotations/train.json
    python main.py --config=configs/mdssd300_custom.py --workdir=/ckpt/signs \
        --config.data.custom.train=/data/signs/annotations/train.json \
        --config.model.init_from=/weights/vgg16_reducedfc.pth

Classes, their count and the metric follow the data (COCO metrics for a COCO JSON source, VOC mAP for
the others). `config.model.init_from` takes ImageNet VGG16 weights, torchvision's
`ssd300_vgg16_coco-b556d3b4.pth` (MDSSD300 takes its trunk and extras) or a checkpoint of this
project (what fits is loaded, the class heads start fresh when the classes differ).
"""

from configs import common


def get_config():
  c = common.base_config()
  common.mdssd300(c)
  common.custom(c)
  return c
