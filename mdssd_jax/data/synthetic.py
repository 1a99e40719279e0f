"""A generated small-object detection data set: the project's default, needs nothing downloaded.

Each image is drawn from its own seed (data seed, split, index), so generation is reproducible and
order-free. Class = shape; colour, size, position, clutter and distractors are random.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import zlib

import cv2
import numpy as np
import tensorflow_datasets as tfds

from mdssd_jax.data import features
from mdssd_jax.data import orphan_guard
from mdssd_jax.data import report

# Shapes that carry a class label, in label order (label 1 = the first). They differ in outline,
# not in colour, so a detector must see the shape: at a few pixels that needs resolution.
CLASS_SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond")
# Unlabelled distractor shapes: the detector must learn to leave them alone.
DISTRACTOR_SHAPES = ("star", "bar")

# The context setting (SyntheticSpec.context, docs/study.md "The context study"): a tiny object's
# class is its shape AND the kind of the image's one scene marker, a large texture patch in a corner
# far from every tiny object; objects from TINY_LIMIT_PX up keep a class told by their own shape.
CONTEXT_TINY_SHAPES = ("circle", "square", "triangle")
CONTEXT_LOCAL_SHAPES = ("plus", "ring", "diamond")
SCENE_KINDS = ("stripes", "checks")
# Receptive fields at the input (VGG16, 3x3 convs, 2x2 pools): conv3_3 40 px, conv4_3 92 px. The
# finest head of the shallow models (MDSSD's Fusion Block without its deep branch: two 3x3 convs on
# conv3_3, then the 3x3 head, all at stride 4; ssd_fine: the head alone) sees 64 px (56 px), so half
# a window of 46 px (conv4_3's) or more around a tiny object never reaches the marker.
CONTEXT_MARGIN_PX = 48.0
TINY_LIMIT_PX = 16.0

# Bump when the drawing code changes: the version is part of the prepared data's path.
_VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Everything that shapes the generated data (all of it goes into the prepared data's name).

  Sizes are in pixels of the square image; `max_overlap` is the largest fraction of an object's box
  that a later (drawn on top) object's box may cover, so every box stays mostly visible.
  """
  image_size_px: int = 300
  num_train: int = 2000
  num_test: int = 200
  seed: int = 1234
  num_classes: int = 6
  min_object_px: float = 8.0
  max_object_px: float = 48.0
  max_objects: int = 12
  max_distractors: int = 4
  max_overlap: float = 0.3
  aspect_jitter: float = 1.25        # object width/height drawn from [1/a, a]
  min_contrast: float = 100.0        # RGB distance between an object and its local background
  noise_std: float = 6.0             # Gaussian pixel noise over the whole image
  max_lines: int = 6                 # random clutter lines
  max_blobs: int = 4                 # soft background blobs
  jpeg_quality: int = 95
  # True: each class keeps one hue (jittered), so a class is told by shape AND colour: a CPU-sized
  # detector learns that in minutes (the demo). False: shape alone, a harder task.
  colour_by_class: bool = False
  # True: the context setting (CONTEXT_* above): 3 tiny shapes x 2 scene kinds + 3 local shapes = 9
  # classes; num_classes is not read. Objects below TINY_LIMIT_PX are tiny, the rest local.
  context: bool = False
  context_margin_px: float = CONTEXT_MARGIN_PX   # least gap between a tiny object and the marker
  marker_min_px: float = 40.0        # the scene marker's side, uniform between these
  marker_max_px: float = 56.0

  def __post_init__(self):
    # Config values arrive as ints or floats alike: fix the types so equal specs hash alike.
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, type(field.default)(getattr(self, field.name)))
    if not 1 <= self.num_classes <= len(CLASS_SHAPES):
      raise ValueError(f"synthetic.num_classes={self.num_classes}: must be 1..{len(CLASS_SHAPES)} "
                       f"(one class per shape: {', '.join(CLASS_SHAPES)})")
    if not 1 <= self.min_object_px <= self.max_object_px < self.image_size_px:
      raise ValueError(f"synthetic object sizes must satisfy 1 <= min_object_px ({self.min_object_px})"
                       f" <= max_object_px ({self.max_object_px}) < image_size_px ({self.image_size_px})")
    if self.num_train < 1 or self.num_test < 1:
      raise ValueError("synthetic.num_train and synthetic.num_test must be >= 1")
    if self.context and not (self.min_object_px < TINY_LIMIT_PX <= self.max_object_px
                             and self.marker_max_px + self.context_margin_px + TINY_LIMIT_PX
                             < self.image_size_px):
      raise ValueError(f"synthetic.context needs min_object_px < {TINY_LIMIT_PX:g} <= max_object_px "
                       "and room for tiny objects beyond the marker: marker_max_px + "
                       "context_margin_px + 16 < image_size_px (the demo's: 8, 40; 56 + 48 + 16 < 192)")

  @property
  def class_names(self):
    if self.context:
      return [f"{shape}@{scene}" for scene in SCENE_KINDS for shape in CONTEXT_TINY_SHAPES] + list(
          CONTEXT_LOCAL_SHAPES)
    return list(CLASS_SHAPES[:self.num_classes])

  def config_name(self):
    """A readable name plus a hash of every field, so a changed spec never reuses stale data."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
    return (f"px{self.image_size_px}_n{self.num_train}-{self.num_test}_c{len(self.class_names)}"
            f"{'_context' if self.context else ''}_s{self.seed}_{digest.hexdigest()[:10]}")


def spec_from_config(synthetic_cfg):
  """SyntheticSpec from `config.data.synthetic`; keys the config lacks keep the spec's defaults."""
  fields = {f.name for f in dataclasses.fields(SyntheticSpec)}
  values = {k: v for k, v in dict(synthetic_cfg).items() if k in fields}
  unknown = set(dict(synthetic_cfg)) - fields
  if unknown:
    raise ValueError(f"unknown config.data.synthetic keys {sorted(unknown)}; known: {sorted(fields)}")
  return SyntheticSpec(**values)


def example_seed(spec, split, index):
  """The seed of one image: a function of (data seed, split, index) only."""
  split_id = zlib.crc32(split.encode())
  return np.random.SeedSequence([spec.seed, split_id, index])


# ---- drawing -------------------------------------------------------------------------------------

def _shape_polygons(shape, x0, y0, w, h, rng):
  """Polygons (list of (K, 2) float arrays, px) whose union is the shape inside box (x0, y0, w, h).

  Returns (filled, holes): holes are cut out of the filled polygons (the ring's inside).
  """
  x1, y1, cx, cy = x0 + w, y0 + h, x0 + w / 2, y0 + h / 2
  if shape == "square":
    return [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])], []
  if shape == "triangle":
    return [np.array([[cx, y0], [x1, y1], [x0, y1]])], []
  if shape == "diamond":
    return [np.array([[cx, y0], [x1, cy], [cx, y1], [x0, cy]])], []
  if shape == "plus":
    tx, ty = w / 3, h / 3  # arm thickness: a third of the size, so the arms survive at 8 px
    return [np.array([[x0, cy - ty / 2], [x1, cy - ty / 2], [x1, cy + ty / 2], [x0, cy + ty / 2]]),
            np.array([[cx - tx / 2, y0], [cx + tx / 2, y0], [cx + tx / 2, y1], [cx - tx / 2, y1]])], []
  theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
  if shape == "circle":
    return [np.stack([cx + w / 2 * np.cos(theta), cy + h / 2 * np.sin(theta)], -1)], []
  if shape == "ring":
    inner = 0.55  # inner radius / outer radius: the hole is clearly visible, the band too
    return ([np.stack([cx + w / 2 * np.cos(theta), cy + h / 2 * np.sin(theta)], -1)],
            [np.stack([cx + inner * w / 2 * np.cos(theta), cy + inner * h / 2 * np.sin(theta)], -1)])
  if shape == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
    return [np.stack([cx + w / 2 * radius * np.cos(angles), cy + h / 2 * radius * np.sin(angles)], -1)], []
  if shape == "bar":
    # A thin rotated rectangle: long and narrow, unlike every class shape.
    length, width, angle = max(w, h), max(w, h) / rng.uniform(4.0, 8.0), rng.uniform(0, np.pi)
    d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    n = np.array([-np.sin(angle), np.cos(angle)]) * width / 2
    c = np.array([cx, cy])
    return [np.stack([c - d - n, c + d - n, c + d + n, c - d + n])], []
  raise ValueError(f"unknown shape {shape!r}")


def _coverage_mask(polygons, holes, x_lo, y_lo, width_px, height_px, supersample=4):
  """Anti-aliased coverage in [0, 1] of the (width_px, height_px) patch at (x_lo, y_lo)."""
  big = np.zeros((height_px * supersample, width_px * supersample), np.uint8)
  to_big = lambda p: np.round((p - [x_lo, y_lo]) * supersample).astype(np.int32)
  # One polygon per call: a single fillPoly call fills overlaps by the even-odd rule (the plus'
  # centre would stay empty).
  for p in polygons:
    cv2.fillPoly(big, [to_big(p)], 255)
  for p in holes:
    cv2.fillPoly(big, [to_big(p)], 0)
  small = cv2.resize(big, (width_px, height_px), interpolation=cv2.INTER_AREA)
  return small.astype(np.float32) / 255.0


def _paint(canvas, shape, box, colour, rng, opacity=1.0):
  """Alpha-blends `shape` filling box (x0, y0, w, h) px into canvas (float32 (H, W, 3)) in place."""
  x0, y0, w, h = box
  height, width = canvas.shape[:2]
  x_lo, y_lo = int(np.floor(x0)), int(np.floor(y0))
  x_hi, y_hi = int(np.ceil(x0 + w)), int(np.ceil(y0 + h))
  if shape == "bar":  # a rotated bar may leave its nominal box: give it room
    pad = int(np.ceil(max(w, h) / 2))
    x_lo, y_lo, x_hi, y_hi = x_lo - pad, y_lo - pad, x_hi + pad, y_hi + pad
  polygons, holes = _shape_polygons(shape, x0, y0, w, h, rng)
  alpha = _coverage_mask(polygons, holes, x_lo, y_lo, x_hi - x_lo, y_hi - y_lo)
  cx0, cy0, cx1, cy1 = max(x_lo, 0), max(y_lo, 0), min(x_hi, width), min(y_hi, height)
  if cx1 <= cx0 or cy1 <= cy0:
    return
  a = alpha[cy0 - y_lo:cy1 - y_lo, cx0 - x_lo:cx1 - x_lo, None] * np.float32(opacity)
  region = canvas[cy0:cy1, cx0:cx1]
  region[...] = region * (1 - a) + np.asarray(colour, np.float32) * a  # float32 throughout


def _background(spec, rng):
  """Smooth random colour gradient + soft blobs + thin lines: float32 (S, S, 3)."""
  size = spec.image_size_px
  grid = rng.uniform(0, 255, size=(3, 3, 3)).astype(np.float32)
  canvas = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
  for _ in range(rng.integers(0, spec.max_blobs + 1)):
    # Blobs are larger than the largest object and blurred below, so they never pass for a circle.
    w, h = rng.uniform(1.0, 3.0, size=2) * spec.max_object_px
    x0, y0 = rng.uniform(-w / 2, size - w / 2), rng.uniform(-h / 2, size - h / 2)
    colour = rng.uniform(0, 255, 3)
    _paint(canvas, "circle", (x0, y0, w, h), colour, rng, opacity=rng.uniform(0.3, 0.7))
  canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=spec.min_object_px / 2)
  for _ in range(rng.integers(0, spec.max_lines + 1)):
    p, q = rng.uniform(0, size, size=(2, 2))
    colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
    cv2.line(canvas, tuple(int(v) for v in p), tuple(int(v) for v in q), colour,
             thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
  return np.clip(canvas, 0, 255)


def _contrasting_colour(local_mean, rng, min_contrast, tries=32):
  """A random colour at RGB distance >= min_contrast from local_mean (the complement if none found)."""
  for _ in range(tries):
    colour = rng.uniform(0, 255, 3)
    if np.linalg.norm(colour - local_mean) >= min_contrast:
      return colour
  return 255.0 - local_mean


# Hues of the classes when colour_by_class (OpenCV's 0..180 hue scale), far apart on the wheel.
_CLASS_HUES = (0, 60, 120, 30, 90, 150)


def _class_colour(label, rng):
  """The class's hue, full saturation, random brightness: float RGB (3,)."""
  hsv = np.uint8([[[_CLASS_HUES[label], 255, rng.integers(170, 256)]]])
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _random_box(spec, rng):
  """(x0, y0, w, h) px: log-uniform size (many small objects), mild aspect jitter, inside the image."""
  size = np.exp(rng.uniform(np.log(spec.min_object_px), np.log(spec.max_object_px)))
  aspect = np.exp(rng.uniform(-np.log(spec.aspect_jitter), np.log(spec.aspect_jitter)))
  w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
  w, h = min(w, spec.max_object_px), min(h, spec.max_object_px)
  x0 = rng.uniform(0, spec.image_size_px - w)
  y0 = rng.uniform(0, spec.image_size_px - h)
  return np.array([x0, y0, w, h])


def _overlap_fraction(a, b):
  """Intersection of boxes (x0, y0, w, h) over the smaller box's area."""
  ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
  return ix * iy / min(a[2] * a[3], b[2] * b[3])


def render(spec, split, index, draw_objects=True):
  """Draws one image.

  Returns:
    image: uint8 (S, S, 3) RGB (before JPEG encoding).
    boxes_xyxy_px: float32 (N, 4) tight boxes of the drawn class shapes, in pixels.
    labels: int32 (N,) 0-based class index (TFDS ClassLabel convention).
  With draw_objects=False the same image without the class shapes (for tests: what the objects cover).
  """
  if spec.context:
    return render_context(spec, split, index, draw_objects)
  rng = np.random.default_rng(example_seed(spec, split, index))
  canvas = _background(spec, rng)
  for _ in range(rng.integers(0, spec.max_distractors + 1)):
    box = _random_box(spec, rng)
    local = canvas[int(box[1]):int(box[1] + box[3]) + 1, int(box[0]):int(box[0] + box[2]) + 1]
    colour = _contrasting_colour(local.reshape(-1, 3).mean(0), rng, spec.min_contrast)
    _paint(canvas, DISTRACTOR_SHAPES[rng.integers(len(DISTRACTOR_SHAPES))], box, colour, rng)
  plain = canvas.copy()  # the image without its class shapes
  boxes, labels = [], []
  for _ in range(rng.integers(0, spec.max_objects + 1)):
    box = _random_box(spec, rng)
    label = int(rng.integers(spec.num_classes))
    if any(_overlap_fraction(box, other) > spec.max_overlap for other in boxes):
      continue  # too much occlusion: skip rather than retry, so the count stays a free parameter
    local = canvas[int(box[1]):int(box[1] + box[3]) + 1, int(box[0]):int(box[0] + box[2]) + 1]
    if spec.colour_by_class:
      colour = _class_colour(label, rng)
    else:
      colour = _contrasting_colour(local.reshape(-1, 3).mean(0), rng, spec.min_contrast)
    _paint(canvas, CLASS_SHAPES[label], box, colour, rng)
    boxes.append(box)
    labels.append(label)
  noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(spec.noise_std)
  image = np.clip(np.rint((canvas if draw_objects else plain) + noise), 0, 255).astype(np.uint8)
  boxes = np.array(boxes, np.float32).reshape(-1, 4)
  boxes_xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
  return image, boxes_xyxy, np.array(labels, np.int32)


def _marker_box(spec, rng):
  """(x0, y0, w, h) px of the scene marker: a square in a random corner, a few px from the edges."""
  side = rng.uniform(spec.marker_min_px, spec.marker_max_px)
  inset = rng.uniform(0, 8, size=2)
  corner = rng.integers(4)
  x0 = inset[0] if corner % 2 == 0 else spec.image_size_px - side - inset[0]
  y0 = inset[1] if corner < 2 else spec.image_size_px - side - inset[1]
  return np.array([x0, y0, side, side])


def _paint_marker(canvas, box, scene, colours, period_px):
  """Paints the marker texture of `scene` (stripes or checks, two colours) into box, in place."""
  x0, y0, w, h = (int(round(v)) for v in box)
  yy, xx = np.mgrid[0:h, 0:w]
  if SCENE_KINDS[scene] == "stripes":
    first = (yy // period_px) % 2 == 0
  else:
    first = ((yy // period_px) + (xx // period_px)) % 2 == 0
  canvas[y0:y0 + h, x0:x0 + w] = np.where(first[..., None], colours[0], colours[1])


def _gap_px(a, b):
  """The L-infinity gap between boxes (x0, y0, w, h): 0 when they touch or overlap."""
  gap_x = max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]), 0.0)
  gap_y = max(b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3]), 0.0)
  return max(gap_x, gap_y)


def render_context(spec, split, index, draw_objects=True, scene=None):
  """One image of the context setting: render()'s outputs, drawn by the same rules plus the marker.

  The scene kind (0 stripes, 1 checks) is drawn first; `scene` overrides it without changing any
  other random draw, so the two images of one index differ in the marker's pixels alone (the test of
  the generator's promise). A tiny object (longer side < TINY_LIMIT_PX) of shape s is class
  "s@<scene>"; its box keeps a gap of spec.context_margin_px or more from the marker's box (its
  position is drawn again until it does); no object touches the marker.
  """
  rng = np.random.default_rng(example_seed(spec, split, index))
  drawn_scene = int(rng.integers(len(SCENE_KINDS)))
  scene = drawn_scene if scene is None else int(scene)
  canvas = _background(spec, rng)
  marker = _marker_box(spec, rng)
  marker_colours = [_contrasting_colour(np.full(3, 127.5), rng, spec.min_contrast)]
  marker_colours.append(_contrasting_colour(marker_colours[0], rng, spec.min_contrast))
  _paint_marker(canvas, marker, scene, marker_colours, period_px=int(rng.integers(5, 9)))
  for _ in range(rng.integers(0, spec.max_distractors + 1)):
    box = _random_box(spec, rng)
    if _gap_px(box, marker) <= 0:
      continue
    local = canvas[int(box[1]):int(box[1] + box[3]) + 1, int(box[0]):int(box[0] + box[2]) + 1]
    colour = _contrasting_colour(local.reshape(-1, 3).mean(0), rng, spec.min_contrast)
    _paint(canvas, DISTRACTOR_SHAPES[rng.integers(len(DISTRACTOR_SHAPES))], box, colour, rng)
  plain = canvas.copy()
  boxes, labels = [], []
  num_tiny = len(CONTEXT_TINY_SHAPES)
  for _ in range(rng.integers(0, spec.max_objects + 1)):
    box = _random_box(spec, rng)
    tiny = max(box[2], box[3]) < TINY_LIMIT_PX
    shape_index = int(rng.integers(num_tiny))   # both families have three shapes
    margin = spec.context_margin_px if tiny else 1.0
    for _ in range(16):   # a new position (same size) until it keeps its distance from the marker
      if _gap_px(box, marker) >= margin:
        break
      box[0] = rng.uniform(0, spec.image_size_px - box[2])
      box[1] = rng.uniform(0, spec.image_size_px - box[3])
    if _gap_px(box, marker) < margin or any(
        _overlap_fraction(box, other) > spec.max_overlap for other in boxes):
      continue
    if tiny:
      label, shape = scene * num_tiny + shape_index, CONTEXT_TINY_SHAPES[shape_index]
    else:
      label, shape = len(SCENE_KINDS) * num_tiny + shape_index, CONTEXT_LOCAL_SHAPES[shape_index]
    local = canvas[int(box[1]):int(box[1] + box[3]) + 1, int(box[0]):int(box[0] + box[2]) + 1]
    colour = _contrasting_colour(local.reshape(-1, 3).mean(0), rng, spec.min_contrast)
    _paint(canvas, shape, box, colour, rng)
    boxes.append(box)
    labels.append(label)
  noise = rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(spec.noise_std)
  image = np.clip(np.rint((canvas if draw_objects else plain) + noise), 0, 255).astype(np.uint8)
  boxes = np.array(boxes, np.float32).reshape(-1, 4)
  boxes_xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
  return image, boxes_xyxy, np.array(labels, np.int32)


# ---- the TFDS builder ----------------------------------------------------------------------------

@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  spec: SyntheticSpec = dataclasses.field(default_factory=SyntheticSpec)


_DEFAULT_CONFIG = SyntheticConfig(name=SyntheticSpec().config_name(), spec=SyntheticSpec(),
                                  version=_VERSION)


def builder_config(spec):
  """The BuilderConfig for `spec` (TFDS wants the class's own object when the spec is the default)."""
  if spec == _DEFAULT_CONFIG.spec:
    return _DEFAULT_CONFIG
  return SyntheticConfig(name=spec.config_name(), spec=spec, version=_VERSION,
                         description=json.dumps(dataclasses.asdict(spec), sort_keys=True))


class SyntheticSmallObjects(tfds.core.GeneratorBasedBuilder):
  """Generated images with many small shapes (class = shape) on cluttered backgrounds."""

  VERSION = tfds.core.Version(_VERSION)
  BUILDER_CONFIGS = [_DEFAULT_CONFIG]

  def _info(self):
    spec = self.builder_config.spec
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.detection_features(spec.class_names),
        disable_shuffling=True,  # record i of a split is generated image i: reproducible ids
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    spec = self.builder_config.spec
    return report.with_progress({"train": self._generate_examples("train", spec.num_train),
                                 "test": self._generate_examples("test", spec.num_test)})

  def _generate_examples(self, split, count):
    spec = self.builder_config.spec
    for index, example in _examples(spec, split, count):
      yield index, example


# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_MIN_IMAGES = 256


def _examples(spec, split, count):
  """Yields (index, TFDS example) in index order, rendered on all CPU cores for large counts."""
  workers = min(os.cpu_count() or 1, count // _PARALLEL_MIN_IMAGES)
  if workers <= 1:
    yield from ((index, _example(spec, split, index)) for index in range(count))
    return
  # "spawn": the caller has TF / JAX threads running, which a fork would copy in a broken state.
  context = multiprocessing.get_context("spawn")
  # initializer: the workers end with this process, even when it is killed with kill -9.
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                              initializer=orphan_guard.watch_parent,
                                              initargs=(os.getpid(),)) as pool:
    examples = pool.map(_example, [spec] * count, [split] * count, range(count), chunksize=16)
    yield from enumerate(examples)


def _example(spec, split, index):
  """The TFDS example of image `index` of `split`: JPEG bytes and (ymin, xmin, ymax, xmax) boxes."""
  image, boxes_px, labels = render(spec, split, index)
  # No chroma subsampling: it would smear the colour edges of the few-pixel objects.
  ok, encoded = cv2.imencode(".jpg", image[..., ::-1],
                             [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality,
                              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
  assert ok, "OpenCV could not encode a JPEG"
  size = float(spec.image_size_px)
  return {
      "image": encoded.tobytes(),
      "image/filename": f"{split}_{index:06d}.jpg",
      "objects": {
          # BBoxFeature: (ymin, xmin, ymax, xmax) normalised; the boxes lie inside the image.
          "bbox": [tfds.features.BBox(*np.clip([b[1] / size, b[0] / size, b[3] / size, b[2] / size],
                                               0.0, 1.0)) for b in boxes_px],
          "label": labels.tolist(),
          "is_difficult": [False] * len(labels),
      },
  }
