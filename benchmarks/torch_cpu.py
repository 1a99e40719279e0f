"""torchvision's SSD300 train step and single convolutions on the CPU, for `bench_train --torch_cpu`.

Runs under any Python that has torch and torchvision (a venv): it imports nothing of this project
and no JAX, so a benchmark-only torch install is all it needs. One JSON line per measurement on
stdout.

    python benchmarks/torch_cpu.py step --batch=4 --threads=2 --repeats=3
    python benchmarks/torch_cpu.py layers --batch=4 --threads=2 --layers='[[300, 300, 64, 64, 3, 1, 1, 1]]'

`layers` takes a JSON list of [H, W, Cin, Cout, kernel, stride, padding, dilation] (NCHW in torch,
float32) and times the forward and the forward + backward (value and both gradients of sum(y^2)).
"""

import argparse
import json
import time

import numpy as np

SSD300_SIZE_PX = 300
VOC_CLASSES = 20


def random_arrays(batch, size_px, max_boxes, num_classes, rng):
  """A random detection batch: uint8 images (B, S, S, 3), boxes (B, M, 4) normalised xyxy, labels
  (B, M) int32 in 1..num_classes with 0 (padding) in all but the first quarter of the slots."""
  xy = rng.uniform(0, 0.8, (batch, max_boxes, 2))
  wh = rng.uniform(0.02, 0.2, (batch, max_boxes, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], -1).astype(np.float32)
  labels = rng.integers(1, num_classes + 1, (batch, max_boxes)).astype(np.int32)
  labels[:, max_boxes // 4:] = 0   # a quarter of the slots hold boxes, as in VOC-like data
  images = rng.integers(0, 256, (batch, size_px, size_px, 3), dtype=np.uint8)
  return dict(image=images, boxes=boxes, labels=labels)


def median_seconds(fn, repeats):
  """Median wall time of fn() (which blocks), after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _torch(threads):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if threads:
    torch.set_num_threads(threads)
  return torch


def step(args):
  """torchvision ssd300_vgg16 train step (SGD, momentum 0.9), batch of random images and boxes."""
  torch = _torch(args.threads)
  import torchvision  # pylint: disable=g-import-not-at-top
  model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                    num_classes=VOC_CLASSES + 1)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  host = random_arrays(args.batch, SSD300_SIZE_PX, args.max_boxes, VOC_CLASSES,
                       np.random.default_rng(0))
  # torchvision's transform resizes to 300 and normalises inside the model, like our step.
  images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in host["image"]]
  targets = []
  for boxes, labels in zip(host["boxes"], host["labels"]):
    keep = labels > 0
    targets.append(dict(boxes=torch.from_numpy(boxes[keep] * SSD300_SIZE_PX),
                        labels=torch.from_numpy(labels[keep]).long()))

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = sum(model(images, targets).values())
    loss.backward()
    optimizer.step()
  step_s = median_seconds(run, args.repeats)
  print(json.dumps(dict(variant="torchvision", step_s=step_s, threads=torch.get_num_threads(),
                        version=f"torch {torch.__version__}, torchvision {torchvision.__version__}")))


def layers(args):
  """Forward and forward + backward of one torch Conv2d per layer shape."""
  torch = _torch(args.threads)
  for h, w, cin, cout, k, stride, pad, dil in json.loads(args.layers):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cin, h, w, generator=gen, requires_grad=True)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil)

    def forward():
      with torch.no_grad():
        conv(x)

    def forward_backward():
      x.grad = None
      conv.zero_grad(set_to_none=True)
      conv(x).square().sum().backward()
    print(json.dumps(dict(layer=[h, w, cin, cout, k, stride, pad, dil],
                          fwd_s=median_seconds(forward, args.repeats),
                          fwd_bwd_s=median_seconds(forward_backward, args.repeats))), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", choices=("step", "layers"))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--threads", type=int, default=0, help="0: torch's default (all CPUs)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_boxes", type=int, default=64, help="ground-truth slots (ssd300_voc: 64)")
  parser.add_argument("--layers", default="[]")
  args = parser.parse_args()
  {"step": step, "layers": layers}[args.what](args)


if __name__ == "__main__":
  main()
