"""ImageNet VGG16 weights into the SSD trunk: timm / torchvision / ssd.pytorch files, no torch.

fc6/fc7 become the dilated conv6 and the 1x1 conv7 by decimation (REFERENCE.md section 3). Each
source's pixel convention travels with its weights. PyTorch `.pth` files (zip and legacy formats)
are read with a restricted unpickler that builds NumPy arrays and refuses any other object.
"""

import collections
import io
import pickle
import zipfile
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from mdssd_jax.models import vgg

SOURCES = ("timm", "torchvision", "ssd_pytorch")

# Pixel conventions the weights were trained with (REFERENCE.md section 3; pixels.normalize).
IMAGENET_RGB = dict(channel_order="RGB", input_range=1.0, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225))
CAFFE_BGR = dict(channel_order="BGR", input_range=255.0, mean=(104.0, 117.0, 123.0),
                 std=(1.0, 1.0, 1.0))
PIXEL_CONVENTIONS = dict(timm=IMAGENET_RGB, torchvision=IMAGENET_RGB, ssd_pytorch=CAFFE_BGR)

# Index of each VGG16 conv in torchvision's / timm's `features` Sequential and in ssd.pytorch's
# `vgg` ModuleList (conv, ReLU pairs and pools: 0, 2, 5, 7, 10, ...); fc6/fc7 are 31/33 there.
_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SSD_PYTORCH_FC = ("31", "33")

# DeepLab's decimation of the ImageNet classifier (REFERENCE.md section 3).
DECIMATE_CHANNELS = 4       # keep every 4th fc6 output, fc7 input and output
FC6_TAPS = (0, 3, 6)        # of the 7x7 fc6 kernel: a 3x3 kernel that, dilated by 3x2, spans it


def _fc_keys(source):
  """(fc6 weight key, fc7 weight key) of a source; biases share the prefix."""
  return dict(timm=("pre_logits.fc1", "pre_logits.fc2"),
              torchvision=("classifier.0", "classifier.3"),
              ssd_pytorch=_SSD_PYTORCH_FC)[source]


def _conv_prefix(source, index):
  return f"{index}" if source == "ssd_pytorch" else f"features.{index}"


def detect_source(keys) -> str:
  """Which source wrote a state dict, from its key names."""
  keys = set(keys)
  for source in SOURCES:
    fc6, fc7 = _fc_keys(source)
    if {f"{fc6}.weight", f"{fc7}.weight", f"{_conv_prefix(source, 0)}.weight"} <= keys:
      return source
  raise ValueError(
      "cannot tell which VGG16 weights these are: expected timm (features.N, pre_logits.fc1/fc2), "
      "torchvision (features.N, classifier.0/3) or ssd.pytorch (0 .. 28, 31, 33) key names; found "
      f"{sorted(keys)[:12]}{' ...' if len(keys) > 12 else ''}. Name the source with "
      "config.model.init_source if the keys are right.")


# ---- reading files ----------------------------------------------------------------------------

def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: np.ndarray} from a safetensors file or a PyTorch .pth (zip or legacy), without torch."""
  with open(path, "rb") as f:
    head = f.read(4)
  if head.startswith(b"PK"):
    state = _read_torch_zip(path)
  elif head[:1] == b"\x80":   # pickle PROTO opcode: PyTorch's legacy (pre-1.6) format
    with open(path, "rb") as f:
      state = _read_torch_legacy(f)
  else:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = load_file(path)
    except Exception as e:  # the file is none of the three formats
      raise ValueError(f"{path}: not a safetensors file nor a PyTorch .pth ({e})") from e
  return _unwrap(state, path)


def _unwrap(obj, path):
  """The tensor dict of a checkpoint, without the usual wrappers ({'state_dict': ..}, 'module.')."""
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if isinstance(value, np.ndarray):
      out[key[len("module."):] if key.startswith("module.") else key] = value
  return out


_STORAGE_DTYPES = dict(
    FloatStorage=np.float32, DoubleStorage=np.float64, HalfStorage=np.float16,
    LongStorage=np.int64, IntStorage=np.int32, ShortStorage=np.int16, CharStorage=np.int8,
    ByteStorage=np.uint8, BoolStorage=np.bool_, BFloat16Storage="bfloat16")


class _StorageType:
  """Stands for torch.<X>Storage in a pickle: only its element dtype matters."""

  def __init__(self, name):
    dtype = _STORAGE_DTYPES[name]
    if isinstance(dtype, str):
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      dtype = getattr(ml_dtypes, dtype)
    self.dtype = np.dtype(dtype)


class _TensorRef:
  """A tensor as torch._utils._rebuild_tensor(_v2) describes it: a strided view of a flat storage.

  Kept lazy because the legacy format stores the data after the pickle that refers to it.
  """

  def __init__(self, storage, storage_offset, size, stride, *unused):
    self.storage, self.offset = storage, int(storage_offset)
    self.size, self.stride = tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    itemsize = self.storage.dtype.itemsize
    # as_strided does not check bounds: a corrupt file must not make it read foreign memory.
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if (min(self.size, default=1) > 0 and
        (self.offset < 0 or min(self.stride, default=0) < 0 or last >= self.storage.size)):
      raise ValueError(f"corrupt weights file: a tensor of shape {self.size} (stride "
                       f"{self.stride}, offset {self.offset}) overruns its storage of "
                       f"{self.storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        self.storage[self.offset:], shape=self.size,
        strides=tuple(s * itemsize for s in self.stride), writeable=False)
    # A contiguous view is used as it is: fc6 alone is 400 MB, a copy would double the peak.
    return view if view.flags.c_contiguous else np.array(view)


def _rebuild_parameter(data, *unused):
  return data


class _TensorUnpickler(pickle.Unpickler):
  """Unpickles a PyTorch state dict into _TensorRefs; refuses every global but the few it needs.

  `load_storage(storage_type, key, numel, view)` returns the flat storage (np.ndarray) of a
  persistent id; the two file formats differ only there.
  """

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _TensorRef
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name} from a weights file: only tensors and dicts are "
        "allowed (is this a state dict of VGG16 weights?)")

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel[, view metadata (legacy format)])
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} in a weights file")
    view = pid[5] if len(pid) > 5 else None
    return self._load_storage(pid[1], str(pid[2]), int(pid[4]), view)


def _read_torch_zip(path):
  """PyTorch >= 1.6 format: <dir>/data.pkl plus one raw file <dir>/data/<key> per storage."""
  with zipfile.ZipFile(path) as zf:
    pkl_names = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl_names) != 1:
      raise ValueError(f"{path}: a zip but not a PyTorch checkpoint (no single data.pkl)")
    prefix = pkl_names[0][:-len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in zf.namelist():
      order = "<" if zf.read(prefix + "byteorder").decode().strip() == "little" else ">"
    cache = {}

    def load_storage(storage_type, key, numel, unused_view):
      if key not in cache:
        raw = zf.read(f"{prefix}data/{key}")
        cache[key] = np.frombuffer(raw, storage_type.dtype.newbyteorder(order), numel).astype(
            storage_type.dtype, copy=False)
      return cache[key]

    return _materialise(_TensorUnpickler(io.BytesIO(zf.read(pkl_names[0])), load_storage).load())


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_torch_legacy(f):
  """PyTorch < 1.6 format: magic, protocol, sys info, the pickle, its storage keys, raw storages.

  Each storage follows as an int64 element count and its bytes, in the order of the keys list;
  the arrays are allocated while unpickling and filled in place afterwards.
  """
  if pickle.load(f) != _LEGACY_MAGIC:
    raise ValueError("not a PyTorch checkpoint (bad magic number); expected a .pth or safetensors")
  pickle.load(f)                       # protocol version
  sys_info = pickle.load(f)
  little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
  order = "<" if little else ">"
  roots = {}

  def load_storage(storage_type, key, numel, view):
    if key not in roots:
      roots[key] = np.empty(numel, storage_type.dtype)
    if view is None:
      return roots[key]
    view_key, offset, view_size = view   # a storage that is a slice of another
    del view_key
    return roots[key][int(offset):int(offset) + int(view_size)]

  result = _TensorUnpickler(f, load_storage).load()
  for key in pickle.load(f):
    array = roots[str(key)]
    count = int(np.frombuffer(f.read(8), order + "i8")[0])
    array[:count] = np.frombuffer(f.read(count * array.dtype.itemsize),
                                  array.dtype.newbyteorder(order), count)
  return _materialise(result)


def _materialise(obj):
  """Replaces _TensorRefs by np.ndarrays in (nested) dicts."""
  if isinstance(obj, Mapping):
    return {k: _materialise(v) for k, v in obj.items()}
  return obj.numpy() if isinstance(obj, _TensorRef) else obj


# ---- mapping to the trunk ---------------------------------------------------------------------

def _torch_weights(state, source) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{trunk layer name: (weight OIHW, bias)} in the trunk's shapes, decimating fc6/fc7 if needed."""
  def get(key, shape):
    if key not in state:
      raise ValueError(f"the {source} weights lack {key!r}: is this a VGG16 file? "
                       f"(config.model.init_source={source!r})")
    value = np.asarray(state[key])
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"{source} weights: {key!r} has shape {tuple(value.shape)}, expected "
                       f"{tuple(shape)} (VGG16): wrong file or wrong init_source?")
    return value.astype(np.float32)

  layers = {}
  c_in = 3
  names = vgg.trunk_layer_names()
  widths = [w for stage in vgg.VGG16_STAGES for w in stage]
  for name, index, c_out in zip(names, _FEATURE_INDICES, widths):
    prefix = _conv_prefix(source, index)
    layers[name] = (get(f"{prefix}.weight", (c_out, c_in, 3, 3)), get(f"{prefix}.bias", (c_out,)))
    c_in = c_out

  fc6, fc7 = _fc_keys(source)
  n6, n7 = vgg.FC6_CHANNELS * DECIMATE_CHANNELS, vgg.FC7_CHANNELS * DECIMATE_CHANNELS
  last = vgg.VGG16_STAGES[-1][-1]
  full = 7   # ImageNet VGG16's fc6 is a 7x7 conv over the 512x7x7 pool5 map
  if source == "ssd_pytorch":   # already decimated
    layers["conv6"] = (get(f"{fc6}.weight", (vgg.FC6_CHANNELS, last, 3, 3)),
                       get(f"{fc6}.bias", (vgg.FC6_CHANNELS,)))
    layers["conv7"] = (get(f"{fc7}.weight", (vgg.FC7_CHANNELS, vgg.FC6_CHANNELS, 1, 1)),
                       get(f"{fc7}.bias", (vgg.FC7_CHANNELS,)))
    return layers
  if source == "torchvision":   # Linear layers: fc6 (4096, 512*7*7) flattened as (C, H, W)
    w6 = get(f"{fc6}.weight", (n6, last * full * full)).reshape(n6, last, full, full)
    w7 = get(f"{fc7}.weight", (n7, n6)).reshape(n7, n6, 1, 1)
  else:                         # timm: ConvMlp, already conv-shaped
    w6 = get(f"{fc6}.weight", (n6, last, full, full))
    w7 = get(f"{fc7}.weight", (n7, n6, 1, 1))
  b6, b7 = get(f"{fc6}.bias", (n6,)), get(f"{fc7}.bias", (n7,))
  taps = np.asarray(FC6_TAPS)
  d = DECIMATE_CHANNELS
  layers["conv6"] = (w6[::d][:, :, taps][:, :, :, taps], b6[::d])
  layers["conv7"] = (w7[::d, ::d], b7[::d])
  return layers


def _trunk_params(params):
  if "vgg" not in params:
    raise ValueError(f"load_vgg16 needs the detector's params (with a 'vgg' subtree); got keys "
                     f"{sorted(params)[:8]}")
  return params["vgg"]


def load_vgg16(path: str, params, source: str = "auto") -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Detector params with the trunk (conv1_1 .. conv7) replaced by ImageNet VGG16 weights.

  Args:
    path: safetensors or .pth file: timm `vgg16.tv_in1k`, torchvision `vgg16-397923af.pth` or
      ssd.pytorch `vgg16_reducedfc.pth`.
    params: the detector's "params" tree (arrays or ShapeDtypeStructs); only params["vgg"] changes.
    source: "auto" (from the key names), "timm", "torchvision" or "ssd_pytorch".
  Returns:
    (new params (trunk leaves np.float32, others untouched), pixel convention dict of the source
    for `mdssd_jax.pixels.normalize`).
  Raises:
    ValueError naming the key and both shapes on a wrong file; naming width_multiplier or
    batch_norm when the model cannot take VGG16 weights.
  """
  trunk = _trunk_params(params)
  first = trunk.get("conv1_1", {})
  if "bn" in first or "bias" not in first.get("conv", {}):
    raise ValueError("config.model.batch_norm=True is incompatible with ImageNet VGG16 weights "
                     "(they have no batch norm): set batch_norm=False or init_from=''")
  conv1 = first["conv"]["kernel"].shape
  if conv1[-1] != vgg.VGG16_STAGES[0][0]:
    raise ValueError(f"config.model.width_multiplier != 1.0 is incompatible with VGG16 weights: "
                     f"the model's conv1_1 has {conv1[-1]} channels, VGG16's "
                     f"{vgg.VGG16_STAGES[0][0]}: set width_multiplier=1.0 or init_from=''")

  state = read_state_dict(path)
  if source == "auto":
    source = detect_source(state.keys())
  if source not in SOURCES:
    raise ValueError(f"unknown init_source {source!r}; use 'auto' or one of {SOURCES}")
  layers = _torch_weights(state, source)

  new_trunk = dict(trunk)
  for name, (w, b) in layers.items():
    kernel = np.ascontiguousarray(w.transpose(2, 3, 1, 0))   # OIHW -> HWIO
    expected = tuple(trunk[name]["conv"]["kernel"].shape)
    if kernel.shape != expected:
      raise ValueError(f"{source} weights for {name}: kernel {kernel.shape} (HWIO) does not fit "
                       f"the model's {expected}")
    new_trunk[name] = dict(trunk[name], conv=dict(kernel=kernel, bias=b))
  new_params = dict(params)
  new_params["vgg"] = new_trunk
  return new_params, dict(PIXEL_CONVENTIONS[source])


def init_from_config(model_cfg, params):
  """(params, pixel convention) for `config.model`: VGG16 weights if init_from names a file.

  Without a file the params are returned as they are with config.model.pixel.
  """
  if not model_cfg.init_from:
    return params, dict(model_cfg.pixel)
  return load_vgg16(model_cfg.init_from, params, model_cfg.init_source)
