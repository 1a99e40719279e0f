"""MDSSD512 on VOC07+12 -> VOC07 test."""

from configs import common


def get_config():
  c = common.base_config()
  common.mdssd512(c)
  common.voc(c)
  return c
