"""MDSSD300 on COCO 2017 (paper: AP_small 10.8)."""

from configs import common


def get_config():
  c = common.base_config()
  # SSD300's COCO ladder (21..315), extended one rung down for the 75x75 Fusion Module 1.
  common.mdssd300(c, finest=(12, 21), min_sizes=(21, 45, 99, 153, 207, 261),
                  max_sizes=(45, 99, 153, 207, 261, 315))
  common.coco(c)
  return c
