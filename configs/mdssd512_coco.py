"""MDSSD512 on COCO 2017 (paper: AP_small 13.9)."""

from configs import common


def get_config():
  c = common.base_config()
  # SSD512's COCO ladder (lufficc/SSD), extended one rung down for the 128x128 Fusion Module 1.
  common.mdssd512(c, finest=(10.24, 20.48),
                  min_sizes=(20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
                  max_sizes=(51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72))
  common.coco(c)
  return c
