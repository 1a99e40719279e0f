"""torchvision's SSD300 train step and single convolutions, for `bench_train --torch_cpu` (CPU) and
`device_check.sh` (the same step on a GPU, bf16 autocast, channels_last).

Runs under any Python that has torch and torchvision (a venv): it imports nothing of this project
and no JAX, so a benchmark-only torch install is all it needs. One JSON line per measurement on
stdout.

    python benchmarks/torch_cpu.py step --batch=4 --threads=2 --repeats=3
    python benchmarks/torch_cpu.py step --device=cuda --bf16 --channels_last --batch=32 --repeats=20
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


def median_seconds(fn, repeats, warmup=1):
  """Median wall time of fn() (which blocks), after `warmup` calls."""
  for _ in range(warmup):
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
  """torchvision ssd300_vgg16 train step (SGD, momentum 0.9), batch of random images and boxes.

  Its own transform (resize to 300, normalisation), matcher (IoU 0.5 + each box's best default
  box), hard negative mining and losses. On a GPU: --bf16 runs the forward and the loss under
  torch.autocast(bfloat16) (the backward follows autocast's dtypes; parameters and SGD stay
  float32, as in our bf16 step), --channels_last puts the model's weights in NHWC; cuDNN benchmark
  mode picks the fastest kernels during the warm-up steps.
  """
  torch = _torch(args.threads)
  import torchvision  # pylint: disable=g-import-not-at-top
  device = torch.device(args.device)
  on_gpu = device.type == "cuda"
  if on_gpu:
    torch.backends.cudnn.benchmark = True
  model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                    num_classes=VOC_CLASSES + 1).to(device)
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  host = random_arrays(args.batch, SSD300_SIZE_PX, args.max_boxes, VOC_CLASSES,
                       np.random.default_rng(0))
  # torchvision's transform resizes to 300 and normalises inside the model, like our step.
  # Images and boxes sit on the device before timing (our step, too, is timed on device arrays).
  images = [(torch.from_numpy(im).permute(2, 0, 1).float() / 255.0).to(device)
            for im in host["image"]]
  targets = []
  for boxes, labels in zip(host["boxes"], host["labels"]):
    keep = labels > 0
    targets.append(dict(boxes=torch.from_numpy(boxes[keep] * SSD300_SIZE_PX).to(device),
                        labels=torch.from_numpy(labels[keep]).long().to(device)))
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

  def run():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = sum(model(images, targets).values())
    loss.backward()
    optimizer.step()
    if on_gpu:
      torch.cuda.synchronize()
  step_s = median_seconds(run, args.repeats, warmup=args.warmup)
  version = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
  if on_gpu:
    version += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
  print(json.dumps(dict(variant="torchvision", step_s=step_s, threads=torch.get_num_threads(),
                        batch=args.batch, images_per_s=args.batch / step_s, device=str(device),
                        bf16=args.bf16, channels_last=args.channels_last, version=version)))


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
  parser.add_argument("--device", default="cpu", help="step: cpu or cuda")
  parser.add_argument("--bf16", action="store_true", help="step: bfloat16 autocast")
  parser.add_argument("--channels_last", action="store_true", help="step: NHWC weights")
  parser.add_argument("--warmup", type=int, default=1, help="step: untimed steps first")
  parser.add_argument("--layers", default="[]")
  args = parser.parse_args()
  {"step": step, "layers": layers}[args.what](args)


if __name__ == "__main__":
  main()
