"""MDSSD300 on VOC07+12 -> VOC07 test (paper: 78.6 mAP)."""

from configs import common


def get_config():
  c = common.base_config()
  common.mdssd300(c)
  common.voc(c)
  return c
