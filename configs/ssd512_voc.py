"""SSD512 baseline on VOC07+12 -> VOC07 test (Caffe SSD512*: 79.8)."""

from configs import common


def get_config():
  c = common.base_config()
  common.ssd512(c)
  common.voc(c)
  return c
