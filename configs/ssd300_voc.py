"""SSD300 baseline on VOC07+12 -> VOC07 test (Caffe SSD300*: 77.2, ssd.pytorch 77.43)."""

from configs import common


def get_config():
  c = common.base_config()
  common.ssd300(c)
  common.voc(c)
  return c
