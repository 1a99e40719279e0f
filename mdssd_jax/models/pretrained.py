"""ImageNet VGG16 weights into the SSD trunk: timm / torchvision / ssd.pytorch files, no torch.

fc6/fc7 become the dilated conv6 and the 1x1 conv7 by decimation (docs/pretrained_weights.md). Each
source's pixel convention travels with its weights. Every pickle of a PyTorch `.pth` file (zip and
legacy formats) is read with one restricted unpickler that builds NumPy arrays and refuses any other
object, so a weights file cannot run code.
"""

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from mdssd_jax.models import vgg

SOURCES = ("timm", "torchvision", "ssd_pytorch")

# Pixel conventions the weights were trained with (docs/pretrained_weights.md; pixels.normalize).
IMAGENET_RGB = dict(channel_order="RGB", input_range=1.0, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225))
CAFFE_BGR = dict(channel_order="BGR", input_range=255.0, mean=(104.0, 117.0, 123.0),
                 std=(1.0, 1.0, 1.0))
PIXEL_CONVENTIONS = dict(timm=IMAGENET_RGB, torchvision=IMAGENET_RGB, ssd_pytorch=CAFFE_BGR)

# Index of each VGG16 conv in torchvision's / timm's `features` Sequential and in ssd.pytorch's
# `vgg` ModuleList (conv, ReLU pairs and pools: 0, 2, 5, 7, 10, ...); fc6/fc7 are 31/33 there.
_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SSD_PYTORCH_FC = ("31", "33")

# DeepLab's decimation of the ImageNet classifier (docs/pretrained_weights.md).
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
#
# A .pth file is a pickle, and unpickling runs whatever callable the file names. Every pickle read
# here (the five of the legacy format, data.pkl of the zip format) goes through _RestrictedUnpickler,
# which resolves only the names a state dict of tensors needs (docs/pretrained_weights.md, "Which
# formats are safe"). safetensors files hold no code at all.

def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: np.ndarray} from a safetensors file or a PyTorch .pth (zip or legacy), without torch.

  Raises pickle.UnpicklingError naming the file when a .pth asks for anything but tensors, numbers,
  strings, lists and dicts (a file crafted to run code, or not a state dict); nothing it names is
  ever called. ValueError naming the file for any other damage.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(4)
  if head.startswith(b"PK"):
    state = _read_torch_zip(path)
  elif head[:1] == b"\x80":   # pickle PROTO opcode: PyTorch's legacy (pre-1.6) format
    with open(path, "rb") as f:
      state = _read_torch_legacy(f, path)
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
  """Stands for torch.<X>Storage in a pickle: only its element dtype matters. Not callable."""

  def __init__(self, name):
    dtype = _STORAGE_DTYPES[name]
    if isinstance(dtype, str):
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      dtype = getattr(ml_dtypes, dtype)
    self.dtype = np.dtype(dtype)


def _int_tuple(values, what):
  if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) for v in values):
    raise ValueError(f"a tensor's {what} is {values!r}, not a tuple of ints")
  return tuple(values)


class _TensorRef:
  """A tensor as torch._utils._rebuild_tensor(_v2) describes it: a strided view of a flat storage.

  Kept lazy because the legacy format stores the data after the pickle that refers to it.
  """

  def __init__(self, storage, storage_offset, size, stride, *unused):
    self.storage, self.offset = storage, storage_offset
    self.size, self.stride = size, stride

  def numpy(self) -> np.ndarray:
    # Attributes are checked here, not in __init__: a pickle's BUILD opcode can overwrite them.
    if not isinstance(self.storage, np.ndarray) or self.storage.ndim != 1:
      raise ValueError("a tensor whose storage is not a storage record")
    if not isinstance(self.offset, int):
      raise ValueError(f"a tensor's storage offset is {self.offset!r}, not an int")
    size, stride = _int_tuple(self.size, "shape"), _int_tuple(self.stride, "stride")
    if len(size) != len(stride) or min(size, default=0) < 0:
      raise ValueError(f"a tensor of shape {size} with strides {stride}")
    itemsize = self.storage.dtype.itemsize
    # as_strided does not check bounds: a corrupt file must not make it read foreign memory.
    last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if (min(size, default=1) > 0 and
        (self.offset < 0 or min(stride, default=0) < 0 or last >= self.storage.size)):
      raise ValueError(f"a tensor of shape {size} (stride {stride}, offset {self.offset}) "
                       f"overruns its storage of {self.storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        self.storage[self.offset:], shape=size,
        strides=tuple(s * itemsize for s in stride), writeable=False)
    # A contiguous view is used as it is: fc6 alone is 400 MB, a copy would double the peak.
    return view if view.flags.c_contiguous else np.array(view)


def _rebuild_parameter(data, *unused):
  return data


# The only names a pickle in a weights file may resolve, and what each stands for here. Nothing
# else is importable through it: not builtins, not os, not numpy.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _TensorRef,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRef,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The one unpickler for every pickle of a weights file: only _ALLOWED_GLOBALS resolve.

  Names reach a pickle through GLOBAL, STACK_GLOBAL and INST, which call find_class, and through
  EXT1/2/4 (copyreg's extension registry), which the C unpickler serves from copyreg's cache
  without asking find_class. Hence the Python unpickler, whose get_extension can be closed (a
  state dict never uses EXT); the pickles are small, the tensors' bytes are read apart. So no other
  callable can reach REDUCE, NEWOBJ or BUILD. `load_storage(storage_type, key, numel, view)`
  returns the flat storage (np.ndarray) of a persistent id (the two file formats differ only
  there); without it, a persistent id is refused as well. `what` names the pickle in messages.
  """

  def __init__(self, file, path, what, load_storage=None):
    super().__init__(file)
    self._path, self._what, self._load_storage = path, what, load_storage

  def _load_build(self):
    # BUILD sets attributes from the state on top of the stack. torch uses it on state dicts
    # (OrderedDict._metadata); on a class or function it would rewrite our own code's objects.
    target = self.stack[-2] if len(self.stack) >= 2 else None
    if not isinstance(target, (collections.OrderedDict, dict, _TensorRef)):
      raise pickle.UnpicklingError(
          f"{self._path}: refusing to set attributes of {type(target).__name__} objects in the "
          f"{self._what} of this weights file (nothing was run); a state dict never does.")
    pickle._Unpickler.load_build(self)  # pylint: disable=protected-access

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access
  dispatch[pickle.BUILD[0]] = _load_build

  def get_extension(self, code):
    raise pickle.UnpicklingError(
        f"{self._path}: refusing extension code {code} (copyreg) in the {self._what} of this "
        "weights file (nothing was run): a state dict never uses one. Use a file from a source "
        "you trust, or its safetensors version (docs/pretrained_weights.md).")

  def find_class(self, module, name):
    found = _ALLOWED_GLOBALS.get((module, name))
    # The pickles around the state dict (magic, protocol, sys info, keys) need no names at all.
    if found is None or self._load_storage is None:
      raise pickle.UnpicklingError(
          f"{self._path}: refusing to load {module}.{name} from the {self._what} of this weights "
          "file (nothing was run). A state dict needs only tensors, numbers, strings, lists and "
          "dicts; this file asks for more, so it is not a plain state dict or it was made to run "
          "code. Use a file from a source you trust, or its safetensors version "
          "(docs/pretrained_weights.md).")
    return found

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel[, view metadata (legacy format)])
    if not (self._load_storage is not None and isinstance(pid, tuple) and len(pid) >= 5
            and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], (str, int)) and isinstance(pid[4], int) and pid[4] >= 0):
      raise pickle.UnpicklingError(
          f"{self._path}: unsupported persistent id {pid!r} in the {self._what} of this weights "
          "file (expected a tensor storage record)")
    view = pid[5] if len(pid) > 5 else None
    return self._load_storage(pid[1], str(pid[2]), pid[4], view)


def _restricted_load(file, path, what, load_storage=None):
  """One pickle from `file` through _RestrictedUnpickler; any failure names the file and the pickle."""
  try:
    return _RestrictedUnpickler(file, path, what, load_storage).load()
  except pickle.UnpicklingError:
    raise
  except Exception as e:  # truncated or corrupt pickles raise all kinds of errors
    raise ValueError(f"{path}: the {what} of this PyTorch weights file is damaged "
                     f"({type(e).__name__}: {e}); download it again") from e


def _materialise(obj, path):
  """Replaces _TensorRefs by np.ndarrays in (nested) dicts."""
  if isinstance(obj, Mapping):
    return {k: _materialise(v, path) for k, v in obj.items()}
  if isinstance(obj, _TensorRef):
    try:
      return obj.numpy()
    except ValueError as e:
      raise ValueError(f"{path}: corrupt weights file: {e}") from e
  return obj


def _read_torch_zip(path):
  """PyTorch >= 1.6 format: <dir>/data.pkl plus one raw file <dir>/data/<key> per storage."""
  with zipfile.ZipFile(path) as zf:
    names = set(zf.namelist())
    pkl_names = [n for n in names if n.endswith("data.pkl")]
    if len(pkl_names) != 1:
      raise ValueError(f"{path}: a zip but not a PyTorch checkpoint (no single data.pkl)")
    prefix = pkl_names[0][:-len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in names:
      order = "<" if zf.read(prefix + "byteorder").decode().strip() == "little" else ">"
    cache = {}

    def load_storage(storage_type, key, numel, unused_view):
      if key not in cache:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise ValueError(f"storage {member} is missing")
        raw = zf.read(member)
        cache[key] = np.frombuffer(raw, storage_type.dtype.newbyteorder(order), numel).astype(
            storage_type.dtype, copy=False)
      return cache[key]

    result = _restricted_load(io.BytesIO(zf.read(pkl_names[0])), path, "data.pkl pickle",
                              load_storage)
    return _materialise(result, path)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_torch_legacy(f, path):
  """PyTorch < 1.6 format: magic, protocol, sys info, the pickle, its storage keys, raw storages.

  Each storage follows as an int64 element count and its bytes, in the order of the keys list;
  the arrays are allocated while unpickling and filled in place afterwards.
  """
  if _restricted_load(f, path, "magic-number pickle") != _LEGACY_MAGIC:
    raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number); expected a .pth or "
                     "safetensors file")
  protocol = _restricted_load(f, path, "protocol-version pickle")
  if not isinstance(protocol, int):
    raise ValueError(f"{path}: the protocol version is {protocol!r}, not an int")
  sys_info = _restricted_load(f, path, "sys-info pickle")
  little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
  order = "<" if little else ">"
  file_bytes = os.fstat(f.fileno()).st_size
  roots = {}

  def load_storage(storage_type, key, numel, view):
    if key not in roots:
      if numel * storage_type.dtype.itemsize > file_bytes:   # no huge allocation for a bad count
        raise ValueError(f"storage {key!r} claims {numel} elements, more than the file holds")
      roots[key] = np.empty(numel, storage_type.dtype)
    if view is None:
      return roots[key]
    _, offset, view_size = view   # a storage that is a slice of another
    return roots[key][int(offset):int(offset) + int(view_size)]

  result = _restricted_load(f, path, "main (state dict) pickle", load_storage)
  keys = _restricted_load(f, path, "storage-keys pickle")
  if not isinstance(keys, list) or not all(str(k) in roots for k in keys):
    raise ValueError(f"{path}: the storage keys {keys!r} do not match the state dict's storages")
  for key in keys:
    array = roots[str(key)]
    count = int(np.frombuffer(f.read(8), order + "i8")[0])
    if not 0 <= count <= array.size:
      raise ValueError(f"{path}: storage {key!r} holds {count} elements, expected {array.size}")
    array[:count] = np.frombuffer(f.read(count * array.dtype.itemsize),
                                  array.dtype.newbyteorder(order), count)
  return _materialise(result, path)


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


def load_vgg16(path: str, params, source: str = "auto",
               state: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Detector params with the trunk (conv1_1 .. conv7) replaced by ImageNet VGG16 weights.

  Args:
    path: safetensors or .pth file: timm `vgg16.tv_in1k`, torchvision `vgg16-397923af.pth` or
      ssd.pytorch `vgg16_reducedfc.pth`.
    params: the detector's "params" tree (arrays or ShapeDtypeStructs); only params["vgg"] changes.
    source: "auto" (from the key names), "timm", "torchvision" or "ssd_pytorch".
    state: the file's state dict when the caller read it already (read_state_dict), else None.
  Returns:
    (new params (trunk leaves np.float32, others untouched), pixel convention dict of the source
    for `mdssd_jax.core.pixels.normalize`).
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

  state = read_state_dict(path) if state is None else state
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


# ---- a whole trained detector: torchvision's ssd300_vgg16 ---------------------------------------
#
# torchvision's SSD300 (`ssd300_vgg16_coco-b556d3b4.pth`) is SSD300 layer for layer: the VGG16 trunk
# up to conv4_3 in `backbone.features`, conv5_x + fc6/fc7 as convs in `backbone.extra.0`, the four
# extra stages in `backbone.extra.1..4`, conv4_3's L2Norm scale `backbone.scale_weight`, and one
# 3x3 conv per head in `head.{regression,classification}_head.module_list.{0..5}`, whose channels
# are laid out (default box, value) as ours are. Its class heads have 91 outputs per default box:
# background and COCO's category ids 1..90 (unused ids included). Its input is RGB 0..255 minus the
# mean (0.48235, 0.45882, 0.40784) x 255 (its GeneralizedRCNNTransform with std 1/255).

TORCHVISION_SSD300_PIXELS = dict(channel_order="RGB", input_range=255.0,
                                 mean=(0.48235 * 255, 0.45882 * 255, 0.40784 * 255),
                                 std=(1.0, 1.0, 1.0))
TORCHVISION_SSD300_HEADS = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
TORCHVISION_COCO_OUTPUTS = 91   # background + category ids 1..90


def torchvision_ssd300_keys() -> Dict[Tuple[str, ...], str]:
  """{our param path: torchvision key prefix} for the trunk, extras and L2Norm (heads apart)."""
  keys = {}
  for name, index in zip(vgg.trunk_layer_names()[:10], _FEATURE_INDICES[:10]):
    keys[("vgg", name, "conv")] = f"backbone.features.{index}"
  for name, index in zip(("conv5_1", "conv5_2", "conv5_3"), (1, 3, 5)):
    keys[("vgg", name, "conv")] = f"backbone.extra.0.{index}"
  keys[("vgg", "conv6", "conv")] = "backbone.extra.0.7.1"
  keys[("vgg", "conv7", "conv")] = "backbone.extra.0.7.3"
  for stage, name in enumerate(("conv8", "conv9", "conv10", "conv11"), start=1):
    keys[(f"{name}_1", "conv")] = f"backbone.extra.{stage}.0"
    keys[(f"{name}_2", "conv")] = f"backbone.extra.{stage}.2"
  return keys


def is_torchvision_ssd300(keys) -> bool:
  keys = set(keys)
  return {"backbone.features.0.weight", "head.classification_head.module_list.0.weight"} <= keys


def _get(tree, path):
  for part in path:
    if not isinstance(tree, Mapping) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _set(tree, path, value):
  """A copy of the nested dict `tree` with tree[path] = value (the untouched branches shared)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def load_torchvision_ssd300(path: str, params, head_sources: Tuple[str, ...],
                            coco_category_ids=None, state=None):
  """Detector params with every layer of torchvision's ssd300_vgg16 that fits loaded.

  Args:
    path: the .pth file (read with the restricted unpickler: no code runs).
    params: the detector's "params" tree; every leaf torchvision has at our shape is replaced.
    head_sources: config.model.head_sources; the heads map only when they are SSD300's six.
    coco_category_ids: for each of our labels 1..C, its COCO category id (1..90), when every class is
      a COCO class: the class heads then keep torchvision's background channel and those classes'.
      None: the class heads start fresh.
    state: the file's state dict when the caller read it already, else None.
  Returns:
    (new params (loaded leaves np.float32), pixel convention, names of the loaded layers, {names of
    the layers that start fresh: why}).
  """
  state = read_state_dict(path) if state is None else state
  if not is_torchvision_ssd300(state.keys()):
    raise ValueError(f"{path}: not torchvision's ssd300_vgg16 (no backbone.features.* and "
                     "head.classification_head.* keys)")
  layers = {p: (state.get(f"{k}.weight"), state.get(f"{k}.bias"))
            for p, k in torchvision_ssd300_keys().items()}
  if tuple(head_sources) == TORCHVISION_SSD300_HEADS:
    for i, source in enumerate(head_sources):
      layers[(f"{source}_loc",)] = (state[f"head.regression_head.module_list.{i}.weight"],
                                    state[f"head.regression_head.module_list.{i}.bias"])
      w = state[f"head.classification_head.module_list.{i}.weight"]
      b = state[f"head.classification_head.module_list.{i}.bias"]
      if coco_category_ids is not None:
        keep = np.asarray([0] + [int(c) for c in coco_category_ids])
        per_box = w.shape[0] // TORCHVISION_COCO_OUTPUTS
        w = w.reshape(per_box, TORCHVISION_COCO_OUTPUTS, *w.shape[1:])[:, keep].reshape(
            per_box * len(keep), *w.shape[1:])
        b = b.reshape(per_box, TORCHVISION_COCO_OUTPUTS)[:, keep].reshape(-1)
        layers[(f"{source}_conf",)] = (w, b)
  loaded, fresh = [], {}
  new_params = params
  for layer, (w, b) in layers.items():
    name = "/".join(p for p in layer if p not in ("vgg", "conv"))
    ours = _get(params, layer)
    if ours is None:
      continue   # MDSSD: no such layer (its heads read the Fusion Blocks)
    if "bias" not in ours:
      fresh[name] = "batch norm follows it here (torchvision's SSD300 has none)"
      continue
    kernel = np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0))   # OIHW -> HWIO
    if kernel.shape != tuple(ours["kernel"].shape) or b.shape != tuple(ours["bias"].shape):
      fresh[name] = (f"torchvision's {tuple(kernel.shape)} (HWIO) does not fit "
                     f"{tuple(ours['kernel'].shape)}")
      continue
    new_params = _set(new_params, layer, dict(ours, kernel=kernel, bias=np.asarray(b, np.float32)))
    loaded.append(name)
  scale = _get(params, ("conv4_3_norm", "scale"))
  if scale is not None and state["backbone.scale_weight"].shape == tuple(scale.shape):
    new_params = _set(new_params, ("conv4_3_norm", "scale"),
                      np.asarray(state["backbone.scale_weight"], np.float32))
    loaded.append("conv4_3_norm")
  for name in _leaf_layers(params):
    if name not in loaded and name not in fresh:
      fresh[name] = ("the classes are not all COCO's" if name.endswith("_conf") and
                     tuple(head_sources) == TORCHVISION_SSD300_HEADS else "not in torchvision's SSD300")
  return new_params, dict(TORCHVISION_SSD300_PIXELS), loaded, fresh


def _leaf_layers(params):
  """Layer names of a params tree as load_torchvision_ssd300 names them ("conv1_1", "conv7_conf")."""
  names = []

  def walk(prefix, node):
    if isinstance(node, Mapping) and node and not any(isinstance(v, Mapping) for v in node.values()):
      names.append("/".join(p for p in prefix if p not in ("vgg", "conv")))
      return
    for key, value in (node.items() if isinstance(node, Mapping) else ()):
      walk(prefix + (key,), value)
  walk((), params)
  return names
