"""Input pipeline cost of ONE worker: JPEG decode + Caffe SSD augmentation + box padding, per image.

Generates VOC-sized JPEGs (500x375, smoothed noise + shapes, ~3 boxes each) in memory, then prints
the cost of each stage in CPU ms per image (averaged with the config's probabilities, and when the
stage is always applied) and the throughput of the whole per-example work at each output size, for
several cv2.setNumThreads settings. Single process, no Grain: a host with W busy workers on W free
cores does about W times the images/s. CPU time (time.process_time, all threads of the process) is
reported beside wall time because on a shared machine the wall clock also counts other jobs.

  python -m benchmarks.bench_input                      # 300 and 512, default config
  python -m benchmarks.bench_input --num_images=64 --repeats=3 --sizes=300
  python -m benchmarks.bench_input --tt100k --num_images=24   # 2048x2048 JPEGs, 512 px crops

--tt100k measures what one worker of configs/mdssd512_tt100k.py does per image: decode a 2048x2048
JPEG (TT100K's size), take the full-resolution 512 px crop around a sign (tt100k.train_crop) and run
that config's augmentation to 512 px; config.data.num_workers of that config comes from it.
"""

import argparse
import os
import platform
import time

import cv2
import numpy as np

from configs.common import base_config  # noqa: E402
from mdssd_jax.core import images
from mdssd_jax.data import augment  # noqa: E402
from mdssd_jax.data import pipeline  # noqa: E402
from mdssd_jax.data import tt100k  # noqa: E402

CAFFE_INTERPOLATIONS = ("linear", "area", "nearest", "cubic", "lanczos4")


def natural_looking_jpegs(num_images, rng, width=500, height=375, quality=90):
  """(list of JPEG bytes, list of (N, 4) normalised boxes, list of (N,) labels)."""
  jpegs, boxes, labels = [], [], []
  for _ in range(num_images):
    # Low-frequency colour noise (like sky, walls, grass) plus a little fine grain, so the JPEG
    # compresses like a photograph rather than like flat colour or white noise.
    coarse = rng.uniform(0, 255, (height // 25, width // 25, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    image_boxes = []
    for _ in range(int(rng.integers(2, 5))):
      box_w, box_h = rng.integers(40, 250), rng.integers(40, 250)
      x1, y1 = rng.integers(0, width - box_w), rng.integers(0, height - box_h)
      colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
      if rng.random() < 0.5:
        cv2.rectangle(image, (int(x1), int(y1)), (int(x1 + box_w), int(y1 + box_h)), colour, -1)
      else:
        cv2.ellipse(image, (int(x1 + box_w // 2), int(y1 + box_h // 2)), (int(box_w // 2), int(box_h // 2)),
                    0, 0, 360, colour, -1)
      image_boxes.append([x1 / width, y1 / height, (x1 + box_w) / width, (y1 + box_h) / height])
    bgr = np.clip(image, 0, 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    jpegs.append(buffer.tobytes())
    boxes.append(np.array(image_boxes))
    labels.append(rng.integers(1, 21, len(image_boxes)))
  return jpegs, boxes, labels


def decode(jpeg):
  bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def pad_boxes(boxes, labels, max_boxes):
  """The batch format: (max_boxes, 4) float32 and (max_boxes,) int32, label 0 = padding."""
  padded_boxes = np.zeros((max_boxes, 4), np.float32)
  padded_labels = np.zeros((max_boxes,), np.int32)
  count = min(len(boxes), max_boxes)
  padded_boxes[:count] = boxes[:count]
  padded_labels[:count] = labels[:count]
  return padded_boxes, padded_labels


def stage_costs(jpegs, boxes, labels, cfg, size_px, max_boxes, seed, always):
  """ms per image of each stage; `always` applies every stage (probabilities 1, an any-crop)."""
  rng = np.random.default_rng(seed)
  names = ("decode", "photometric", "expand", "crop", "flip", "resize", "drop+pad boxes")
  total = dict.fromkeys(names, 0.0)
  clock = time.process_time
  photometric_prob = 1.0 if always else cfg["photometric_prob"]
  interpolations = tuple(cfg["resize_interpolations"])
  for jpeg, image_boxes, image_labels in zip(jpegs, boxes, labels):
    t0 = clock()
    image = decode(jpeg)
    t1 = clock()
    image = augment.photometric_distort(
        image, rng, prob=photometric_prob, brightness_delta=cfg["brightness_delta"],
        contrast_range=cfg["contrast_range"], saturation_range=cfg["saturation_range"],
        hue_delta_deg=cfg["hue_delta_deg"], channel_swap_prob=cfg["channel_swap_prob"],
        hue_overflow=cfg["hue_overflow"])
    t2 = clock()
    if always or rng.random() < cfg["expand_prob"]:
      image, image_boxes = augment.expand(image, image_boxes, rng, max_ratio=cfg["expand_max_ratio"])
    t3 = clock()
    image, image_boxes, image_labels, _ = augment.random_crop(
        image, image_boxes, image_labels, rng,
        min_ious=(-1.0,) if always else cfg["crop_min_ious"], scale_range=cfg["crop_scale_range"],
        aspect_range=cfg["crop_aspect_range"], max_trials=cfg["crop_max_trials"],
        sampler=cfg["crop_sampler"])
    t4 = clock()
    if always or rng.random() < cfg["flip_prob"]:
      image, image_boxes = augment.horizontal_flip(image, image_boxes)
    t5 = clock()
    image = images.resize(image, size_px, interpolations[int(rng.integers(len(interpolations)))])
    t6 = clock()
    image_boxes, image_labels = augment.drop_small_boxes(image_boxes, image_labels, size_px)
    pad_boxes(image_boxes, image_labels, max_boxes)
    t7 = clock()
    for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
      total[name] += dt
  return {name: 1e3 * value / len(jpegs) for name, value in total.items()}


def throughput(jpegs, boxes, labels, cfg, size_px, max_boxes, seed, repeats):
  """(images/s on the wall clock, CPU ms per image): best of `repeats` passes of decode +
  train_transform + padding, the work of one worker."""
  best_wall, best_cpu = np.inf, np.inf
  for repeat in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    for index, (jpeg, image_boxes, image_labels) in enumerate(zip(jpegs, boxes, labels)):
      rng = np.random.default_rng([seed, repeat, index])
      image, out_boxes, out_labels = augment.train_transform(decode(jpeg), image_boxes, image_labels,
                                                             rng, cfg, size_px)
      pad_boxes(out_boxes, out_labels, max_boxes)
    best_wall = min(best_wall, time.perf_counter() - wall)
    best_cpu = min(best_cpu, time.process_time() - cpu)
  return len(jpegs) / best_wall, 1e3 * best_cpu / len(jpegs)


def tt100k_like_jpegs(num_images, rng, size_px=2048, quality=90):
  """2048x2048 street-like JPEGs with 4-10 small signs (10-60 px) each: (jpegs, boxes, labels)."""
  jpegs, boxes, labels = [], [], []
  for _ in range(num_images):
    coarse = rng.uniform(0, 255, (size_px // 64, size_px // 64, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size_px, size_px), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    image_boxes = []
    for _ in range(int(rng.integers(4, 11))):
      side = int(rng.integers(10, 61))
      x1, y1 = rng.integers(0, size_px - side, size=2)
      colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
      cv2.circle(image, (int(x1 + side // 2), int(y1 + side // 2)), side // 2, colour, -1)
      image_boxes.append([x1 / size_px, y1 / size_px, (x1 + side) / size_px, (y1 + side) / size_px])
    ok, buffer = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8),
                              [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    jpegs.append(buffer.tobytes())
    boxes.append(np.array(image_boxes, np.float32))
    labels.append(rng.integers(1, 46, len(image_boxes)))
  return jpegs, boxes, labels


def tt100k_worker(jpegs, boxes, labels, repeats, seed=0):
  """Best-of-`repeats` CPU ms per image of each stage and the whole, and images/s on the wall clock,
  of one worker of configs/mdssd512_tt100k.py (the pipeline's own decode, crop and augmentation)."""
  from configs import mdssd512_tt100k  # pylint: disable=g-import-not-at-top
  config = mdssd512_tt100k.get_config()
  cfg = augment.resolve_flip_labels(config.augment.to_dict(), tt100k.TT100K_45_CLASSES)
  crop = tt100k.make_train_crop(config.data.tt100k.train_crop_size_px,
                                config.data.tt100k.crop_on_object_prob)
  size_px, max_boxes = config.model.input_size_px, config.data.max_boxes
  names = ("decode 2048 px JPEG", "full-resolution crop", "augment to 512 + pad")
  best = dict.fromkeys(names, np.inf)
  best_wall = np.inf
  for repeat in range(repeats):
    total = dict.fromkeys(names, 0.0)
    wall = time.perf_counter()
    for index, (jpeg, image_boxes, image_labels) in enumerate(zip(jpegs, boxes, labels)):
      rng = np.random.default_rng([seed, repeat, index])
      t0 = time.process_time()
      image = images.decode_image(jpeg)
      t1 = time.process_time()
      image, out_boxes, out_labels = crop(image, image_boxes, image_labels, rng)
      t2 = time.process_time()
      image, out_boxes, out_labels = augment.train_transform(image, out_boxes, out_labels, rng, cfg,
                                                             size_px)
      pipeline.pad_boxes(out_boxes, out_labels, max_boxes)
      t3 = time.process_time()
      for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2)):
        total[name] += dt
    best_wall = min(best_wall, time.perf_counter() - wall)
    for name in names:
      best[name] = min(best[name], 1e3 * total[name] / len(jpegs))
  return best, len(jpegs) / best_wall


def main_tt100k(args):
  jpegs, boxes, labels = tt100k_like_jpegs(args.num_images, np.random.default_rng(args.seed))
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, load average "
        f"{os.getloadavg()[0]:.1f}, OpenCV {cv2.__version__}; {len(jpegs)} JPEGs 2048x2048, mean "
        f"{np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB; best of {args.repeats} passes\n")
  print("| cv2 threads | stage | CPU ms/image |")
  print("|---|---|---:|")
  default_threads = cv2.getNumThreads()
  rows = []
  for threads in (1, default_threads):
    cv2.setNumThreads(threads)
    stages, wall_rate = tt100k_worker(jpegs, boxes, labels, args.repeats, args.seed)
    for name, ms in stages.items():
      print(f"| {threads} | {name} | {ms:.1f} |")
    cpu_ms = sum(stages.values())
    print(f"| {threads} | **whole example** | **{cpu_ms:.1f}** |")
    rows.append((threads, cpu_ms, wall_rate))
  cv2.setNumThreads(default_threads)
  print("\n| cv2 threads | CPU ms/image | images/s per busy core | images/s wall (this machine) |")
  print("|---|---:|---:|---:|")
  for threads, cpu_ms, wall_rate in rows:
    print(f"| {threads} | {cpu_ms:.1f} | {1e3 / cpu_ms:.1f} | {wall_rate:.1f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3, help="passes per figure; the best is reported")
  parser.add_argument("--sizes", type=str, default="300,512")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tt100k", action="store_true",
                      help="2048x2048 JPEGs with TT100K's full-resolution crops (one worker)")
  args = parser.parse_args()
  if args.tt100k:
    main_tt100k(args)
    return
  sizes = [int(s) for s in args.sizes.split(",")]

  config = base_config()
  cfg = config.augment.to_dict()
  cfg.setdefault("resize_interpolations", augment.DEFAULT_INTERPOLATIONS)
  max_boxes = config.data.max_boxes
  jpegs, boxes, labels = natural_looking_jpegs(args.num_images, np.random.default_rng(args.seed))
  default_threads = cv2.getNumThreads()
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, load average "
        f"{os.getloadavg()[0]:.1f}, OpenCV {cv2.__version__} (default cv2 threads {default_threads}), "
        f"numpy {np.__version__}")
  print(f"# {len(jpegs)} JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB, "
        f"{np.mean([len(b) for b in boxes]):.1f} boxes each; best of {args.repeats} passes\n")

  for size_px in sizes:
    cv2.setNumThreads(1)
    print(f"## output {size_px}x{size_px}\n")
    print("| stage (cv2.setNumThreads(1)) | CPU ms/image, config probabilities | CPU ms/image, always applied |")
    print("|---|---:|---:|")
    runs = [[stage_costs(jpegs, boxes, labels, cfg, size_px, max_boxes, args.seed + r, always)
             for r in range(args.repeats)] for always in (False, True)]
    mean_cost, always_cost = ({name: min(run[name] for run in rs) for name in rs[0]} for rs in runs)
    for name in mean_cost:
      print(f"| {name} | {mean_cost[name]:.2f} | {always_cost[name]:.2f} |")
    print(f"| **sum** | {sum(mean_cost.values()):.2f} | {sum(always_cost.values()):.2f} |\n")

    print("| cv2 threads | resize interpolations | images/s (wall) | CPU ms/image | images/s per busy core |")
    print("|---|---|---:|---:|---:|")
    settings = [(threads, cfg) for threads in (default_threads, 0, 1)]
    settings.append((1, dict(cfg, resize_interpolations=CAFFE_INTERPOLATIONS)))
    for threads, run_cfg in settings:
      cv2.setNumThreads(threads)
      rate, cpu_ms = throughput(jpegs, boxes, labels, run_cfg, size_px, max_boxes, args.seed, args.repeats)
      label = f"{threads} (default)" if threads == default_threads else str(threads)
      interpolations = ",".join(run_cfg["resize_interpolations"])
      print(f"| {label} | {interpolations} | {rate:.0f} | {cpu_ms:.2f} | {1e3 / cpu_ms:.0f} |")
    print()
  cv2.setNumThreads(default_threads)

if __name__ == "__main__":
  main()
