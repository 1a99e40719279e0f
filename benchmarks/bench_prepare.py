"""`--mode=prepare` speed on a user's own files: images/s for COCO JSON, YOLO and VOC sources.

Writes N VOC-sized JPEGs (500x375, benchmarks/bench_input.py's photograph-like images, 2-4 boxes each)
once, as a COCO JSON export, an ultralytics folder, a VOC folder and the official VOCdevkit/VOC2007
layout, then times the whole prepare of each (annotation parsing, one decode of every image, the
array_record writing) in fresh data folders. The native VOC builder (`voc/2007`) on the same images is
the baseline measured in the same run.

  python -m benchmarks.bench_prepare                    # 1000 images, every format
  python -m benchmarks.bench_prepare --num_images=200 --formats=coco
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.bench_core import cpu_model
from benchmarks.bench_input import natural_looking_jpegs
from configs import common
from mdssd_jax.data import prepare
from mdssd_jax.data import voc

WIDTH, HEIGHT = 500, 375


def _write_sources(root, jpegs, boxes, labels):
  """The same images and boxes in the four layouts; returns {format: config overrides}."""
  names = list(voc.VOC_LABELS)
  for sub in ("images", "yolo/images/train", "yolo/labels/train", "voc/Annotations", "voc/JPEGImages",
              "devkit/VOCdevkit/VOC2007/Annotations", "devkit/VOCdevkit/VOC2007/JPEGImages",
              "devkit/VOCdevkit/VOC2007/ImageSets/Main"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  coco_images, coco_annotations, ids = [], [], []
  for i, (jpeg, image_boxes, image_labels) in enumerate(zip(jpegs, boxes, labels)):
    stem = f"{i:06d}"
    ids.append(stem)
    px = np.round(np.asarray(image_boxes) * [WIDTH, HEIGHT, WIDTH, HEIGHT]).astype(int)
    for path in (f"images/{stem}.jpg", f"yolo/images/train/{stem}.jpg", f"voc/JPEGImages/{stem}.jpg",
                 f"devkit/VOCdevkit/VOC2007/JPEGImages/{stem}.jpg"):
      with open(os.path.join(root, path), "wb") as f:
        f.write(jpeg)
    objects = "".join(
        f"<object><name>{names[l - 1]}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
        f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for (x0, y0, x1, y1), l in zip(px, image_labels))
    xml = (f"<annotation><filename>{stem}.jpg</filename><size><width>{WIDTH}</width><height>"
           f"{HEIGHT}</height><depth>3</depth></size>{objects}</annotation>")
    for path in (f"voc/Annotations/{stem}.xml", f"devkit/VOCdevkit/VOC2007/Annotations/{stem}.xml"):
      with open(os.path.join(root, path), "w") as f:
        f.write(xml)
    with open(os.path.join(root, f"yolo/labels/train/{stem}.txt"), "w") as f:
      for (x0, y0, x1, y1), l in zip(px, image_labels):
        f.write(f"{l - 1} {(x0 + x1) / 2 / WIDTH:.6f} {(y0 + y1) / 2 / HEIGHT:.6f} "
                f"{(x1 - x0) / WIDTH:.6f} {(y1 - y0) / HEIGHT:.6f}\n")
    coco_images.append({"id": i + 1, "file_name": f"{stem}.jpg", "width": WIDTH, "height": HEIGHT})
    for (x0, y0, x1, y1), l in zip(px, image_labels):
      coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": i + 1,
                               "category_id": int(l), "bbox": [int(x0), int(y0), int(x1 - x0),
                                                               int(y1 - y0)], "iscrowd": 0})
  with open(os.path.join(root, "train.json"), "w") as f:
    json.dump({"images": coco_images, "annotations": coco_annotations,
               "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}, f)
  with open(os.path.join(root, "yolo/data.yaml"), "w") as f:
    f.write(f"path: {root}/yolo\ntrain: images/train\nnames: {json.dumps(names)}\n")
  for listing in ("train.txt", "val.txt", "test.txt"):   # voc/2007 prepares all three splits
    with open(os.path.join(root, "devkit/VOCdevkit/VOC2007/ImageSets/Main", listing), "w") as f:
      f.write("\n".join(ids if listing == "train.txt" else ids[:1]) + "\n")
  return {
      "coco": {"train": os.path.join(root, "train.json"), "train_images": os.path.join(root, "images")},
      "yolo": {"train": os.path.join(root, "yolo/data.yaml")},
      "voc": {"train": os.path.join(root, "voc")},
  }


def _config(data_dir, fmt, source):
  c = common.base_config()
  if fmt == "voc/2007 (native builder)":
    c.data.name = "voc/2007"
    c.data.manual_dir = source
  else:
    common.custom(c)
    for key, value in source.items():
      c.data.custom[key] = value
  c.data.data_dir = data_dir
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--formats", default="voc/2007,coco,yolo,voc")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="bench_prepare_")
  try:
    jpegs, boxes, labels = natural_looking_jpegs(args.num_images, np.random.default_rng(0))
    sources = _write_sources(root, jpegs, boxes, labels)
    sources["voc/2007 (native builder)"] = os.path.join(root, "devkit")
    order = [("voc/2007 (native builder)" if f == "voc/2007" else f)
             for f in args.formats.split(",")]
    seconds = {f: [] for f in order}
    for repeat in range(args.repeats):   # interleaved: drift of a shared machine hits every format
      for fmt in order:
        data_dir = os.path.join(root, f"tfds_{repeat}_{fmt.split()[0].replace('/', '_')}")
        start = time.perf_counter()
        prepare.prepare(_config(data_dir, fmt, sources[fmt]))
        seconds[fmt].append(time.perf_counter() - start)
        shutil.rmtree(data_dir)
    size_kb = np.mean([len(j) for j in jpegs]) / 1024
    print(f"\n{args.num_images} JPEGs of {WIDTH}x{HEIGHT} ({size_kb:.0f} KB on average), "
          f"{os.cpu_count()} CPUs, {cpu_model()}; best of "
          f"{args.repeats}\n")
    baseline = min(seconds.get("voc/2007 (native builder)", [float("nan")]))
    print("| source | prepare s | images/s | time / native VOC builder |")
    print("|---|---|---|---|")
    for fmt in order:
      best = min(seconds[fmt])
      print(f"| {fmt} | {best:.2f} | {args.num_images / best:.0f} | {best / baseline:.2f} |")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
