"""SSD300 on your own files: COCO JSON, an ultralytics data.yaml or a VOC folder (docs/your_data.md).

The baseline beside configs/mdssd300_custom.py, with torchvision's default boxes for SSD300 (COCO's
sizes, 21 to 315 px: smaller than VOC's 30 to 315, which suits small objects), so that
`--config.model.init_from=ssd300_vgg16_coco-b556d3b4.pth` starts every layer, box heads included, from
torchvision's COCO-trained SSD300, and its class heads too when every class is a COCO class.
"""

from configs import common


def get_config():
  c = common.base_config()
  common.ssd300(c)
  common.ssd300_anchors(c, min_sizes=(21, 45, 99, 153, 207, 261),
                        max_sizes=(45, 99, 153, 207, 261, 315))
  common.custom(c)
  return c
