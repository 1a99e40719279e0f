"""Tests of the ImageNet VGG16 import: files written here in each source's layout, a NumPy trunk.

The weights are random but VGG16-shaped. fc6/fc7 carry random values only where the decimation
(docs/pretrained_weights.md) must read, and a decoy value elsewhere, so the reference trunk below uses
the random blocks directly and never decimates. The .pth files come from a small zip/pickle writer
of this file (opcode by opcode, no torch), in PyTorch's zip and legacy layouts.
"""

import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from mdssd_jax.models import pretrained
from mdssd_jax.models import vgg

FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)   # conv indices in VGG16 `features`
CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
         (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
NAMES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
         "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
DECOY = 7.0
IMAGE_PX = 116   # pool3 rounds 29 up to 15; conv6 (dilation 6) sees a 7x7 map, so all taps count


# ---- weights and files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights():
  """Torch-layout VGG16 weights: convs (OIHW), the full fc6/fc7, and the reduced conv6/conv7."""
  rng = np.random.default_rng(0)
  he = lambda shape, fan_in: (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  w = {}
  for name, (cin, cout) in zip(NAMES, CONVS):
    w[name] = (he((cout, cin, 3, 3), 9 * cin), (0.1 * rng.standard_normal(cout)).astype(np.float32))
  conv6 = he((1024, 512, 3, 3), 9 * 512)
  conv6_b = (0.1 * rng.standard_normal(1024)).astype(np.float32)
  conv7 = he((1024, 1024, 1, 1), 1024)
  conv7_b = (0.1 * rng.standard_normal(1024)).astype(np.float32)
  fc6 = np.full((4096, 512, 7, 7), DECOY, np.float32)
  fc6[0::4, :, 0::3, 0::3] = conv6            # rows 0, 4, ..; taps 0, 3, 6
  fc6_b = np.full(4096, DECOY, np.float32)
  fc6_b[0::4] = conv6_b
  fc7 = np.full((4096, 4096), DECOY, np.float32)
  fc7[0::4, 0::4] = conv7[:, :, 0, 0]
  fc7_b = np.full(4096, DECOY, np.float32)
  fc7_b[0::4] = conv7_b
  head = (0.01 * rng.standard_normal((1000, 4096))).astype(np.float32)
  w.update(conv6=(conv6, conv6_b), conv7=(conv7, conv7_b), fc6=(fc6, fc6_b), fc7=(fc7, fc7_b),
           head=(head, np.zeros(1000, np.float32)))
  return w


def timm_state(w):
  state = {}
  for name, index in zip(NAMES, FEATURES):
    state[f"features.{index}.weight"], state[f"features.{index}.bias"] = w[name]
  state["pre_logits.fc1.weight"], state["pre_logits.fc1.bias"] = w["fc6"]
  state["pre_logits.fc2.weight"] = w["fc7"][0].reshape(4096, 4096, 1, 1)
  state["pre_logits.fc2.bias"] = w["fc7"][1]
  state["head.fc.weight"], state["head.fc.bias"] = w["head"]
  return state


def torchvision_state(w):
  state = {k: v for k, v in timm_state(w).items() if k.startswith("features.")}
  state["classifier.0.weight"] = w["fc6"][0].reshape(4096, 512 * 7 * 7)
  state["classifier.0.bias"] = w["fc6"][1]
  state["classifier.3.weight"], state["classifier.3.bias"] = w["fc7"]
  state["classifier.6.weight"], state["classifier.6.bias"] = w["head"]
  return state


def ssd_pytorch_state(w):
  state = {}
  for name, index in zip(NAMES, FEATURES):
    state[f"{index}.weight"], state[f"{index}.bias"] = w[name]
  state["31.weight"], state["31.bias"] = w["conv6"]
  state["33.weight"], state["33.bias"] = w["conv7"]
  return state


def pickle_state_dict(entries, legacy):
  """A protocol-2 pickle of OrderedDict {key: tensor} as torch.save writes it, opcode by opcode.

  entries: (key, storage key, storage numel, offset, shape, stride) per tensor, FloatStorage.
  """
  out = bytearray(b"\x80\x02")                                  # PROTO 2

  def text(t):
    data = t.encode()
    out.extend(b"X" + struct.pack("<I", len(data)) + data)      # BINUNICODE

  def integer(n):
    out.extend(b"J" + struct.pack("<i", n))                     # BININT

  def global_(module, name):
    out.extend(f"c{module}\n{name}\n".encode())                 # GLOBAL

  def ints(values):
    out.extend(b"(")
    for v in values:
      integer(v)
    out.extend(b"t")                                            # MARK .. TUPLE

  global_("collections", "OrderedDict")
  out.extend(b")R")                                             # EMPTY_TUPLE REDUCE
  for key, storage_key, numel, offset, shape, stride in entries:
    text(key)
    global_("torch._utils", "_rebuild_tensor" if legacy else "_rebuild_tensor_v2")
    out.extend(b"((")                                           # args, then the persistent id
    text("storage")
    global_("torch", "FloatStorage")
    text(storage_key)
    text("cpu")
    integer(numel)
    if legacy:
      out.extend(b"N")                                          # no view metadata
    out.extend(b"tQ")                                           # TUPLE BINPERSID
    integer(offset)
    ints(shape)
    ints(stride)
    if not legacy:
      out.extend(b"\x89")                                       # requires_grad False
      global_("collections", "OrderedDict")
      out.extend(b")R")                                         # backward hooks
    out.extend(b"tRs")                                          # TUPLE REDUCE SETITEM
  out.extend(b".")
  return bytes(out)


def contiguous_strides(shape):
  return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))


def write_torch_zip(path, state, prefix="archive"):
  """torch.save's zip layout: <prefix>/data.pkl and one raw little-endian file per storage."""
  entries = [(k, str(i), v.size, 0, v.shape, contiguous_strides(v.shape))
             for i, (k, v) in enumerate(state.items())]
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", pickle_state_dict(entries, legacy=False))
    zf.writestr(f"{prefix}/byteorder", "little")
    for i, value in enumerate(state.values()):
      with zf.open(f"{prefix}/data/{i}", "w") as f:
        f.write(np.ascontiguousarray(value, "<f4").reshape(-1).data)
    zf.writestr(f"{prefix}/version", "3\n")


def write_torch_legacy(path, entries, storages):
  """torch.save's pre-1.6 layout: magic, protocol, sys info, pickle, keys, (numel, bytes) each."""
  with open(path, "wb") as f:
    f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    f.write(pickle.dumps(1001, protocol=2))
    f.write(pickle.dumps(dict(protocol_version=1001, little_endian=True,
                              type_sizes=dict(short=2, int=4, long=4)), protocol=2))
    f.write(pickle_state_dict(entries, legacy=True))
    f.write(pickle.dumps(list(storages), protocol=2))
    for value in storages.values():
      f.write(struct.pack("<q", value.size))
      f.write(np.ascontiguousarray(value, "<f4").tobytes())


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory):
  d = tmp_path_factory.mktemp("vgg")
  paths = dict(timm=str(d / "vgg16.tv_in1k.safetensors"), torchvision=str(d / "vgg16.pth"),
               ssd_zip=str(d / "vgg16_reducedfc_zip.pth"),
               ssd_legacy=str(d / "vgg16_reducedfc.pth"))
  save_file(timm_state(weights), paths["timm"])
  write_torch_zip(paths["torchvision"], torchvision_state(weights), prefix="vgg16-397923af")
  write_torch_zip(paths["ssd_zip"], ssd_pytorch_state(weights))
  # Legacy file with the storage tricks torch uses: two biases sharing one storage at offsets, and
  # fc7 stored transposed (a strided view).
  state = ssd_pytorch_state(weights)
  entries, storages = [], {}
  for i, (key, value) in enumerate(state.items()):
    if key in ("0.bias", "2.bias"):
      continue
    if key == "33.weight":
      storages["t"] = value[:, :, 0, 0].T.reshape(-1)
      entries.append((key, "t", value.size, 0, value.shape, (1, 1024, 1, 1)))
      continue
    storages[str(i)] = value.reshape(-1)
    entries.append((key, str(i), value.size, 0, value.shape, contiguous_strides(value.shape)))
  storages["biases"] = np.concatenate([state["0.bias"], state["2.bias"]])
  entries += [("0.bias", "biases", 128, 0, (64,), (1,)), ("2.bias", "biases", 128, 64, (64,), (1,))]
  write_torch_legacy(paths["ssd_legacy"], entries, storages)
  return paths


def trunk_params(width=1.0, batch_norm=False):
  """Detector-like params (shapes only): the trunk plus an unrelated layer that must stay as is."""
  trunk = vgg.VGG16Trunk(width, batch_norm)
  x = np.zeros((1, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(lambda: trunk.init(jax.random.key(0), x, train=False))["params"]
  return {"vgg": shapes, "conv4_3_norm": {"scale": np.full(512, 20.0, np.float32)}}


@pytest.fixture(scope="module")
def timm_loaded(files):
  return pretrained.load_vgg16(files["timm"], trunk_params())


# ---- an independent NumPy trunk (NCHW, OIHW, as PyTorch computes it) ---------------------------

def ref_conv(x, w, b, pad, dilation=1):
  """x (C, H, W), w (O, C, kh, kw): stride-1 cross-correlation with zero padding."""
  _, h, wd = x.shape
  kh, kw = w.shape[2:]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
  ho, wo = h + 2 * pad - dilation * (kh - 1), wd + 2 * pad - dilation * (kw - 1)
  out = np.zeros((w.shape[0], ho, wo), np.float64)
  for i in range(kh):
    for j in range(kw):
      window = xp[:, i * dilation:i * dilation + ho, j * dilation:j * dilation + wo]
      out += np.tensordot(w[:, :, i, j], window, axes=(1, 0))
  return out + b[:, None, None]


def ref_pool2(x, ceil):
  c, h, w = x.shape
  if ceil:
    x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2)), constant_values=-np.inf)
  h2, w2 = x.shape[1] // 2, x.shape[2] // 2
  return x[:, :2 * h2, :2 * w2].reshape(c, h2, 2, w2, 2).max(axis=(2, 4))


def ref_pool5(x):
  _, h, w = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  return np.max([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def ref_trunk(w, image_chw):
  relu = lambda v: np.maximum(v, 0)
  x, maps = image_chw.astype(np.float64), {}
  for name in NAMES:
    stage, index = name[4], name[6]
    if index == "1" and stage != "1":
      x = ref_pool2(x, ceil=(stage == "4"))   # the pool before conv4_1 is pool3
    x = relu(ref_conv(x, *w[name], pad=1))
    maps[name] = x
  x = ref_pool5(x)
  x = relu(ref_conv(x, *w["conv6"], pad=6, dilation=6))
  maps["conv7"] = relu(ref_conv(x, *w["conv7"], pad=0))
  return maps


# ---- tests -------------------------------------------------------------------------------------

def test_timm_safetensors_trunk_matches_numpy(weights, timm_loaded):
  params, pixel = timm_loaded
  assert pixel == dict(channel_order="RGB", input_range=1.0, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225))
  assert params["conv4_3_norm"]["scale"][0] == 20.0
  image = np.random.default_rng(1).standard_normal((1, IMAGE_PX, IMAGE_PX, 3)).astype(np.float32)
  trunk = vgg.VGG16Trunk()
  apply = jax.jit(lambda p, x: trunk.apply({"params": p}, x, train=False))
  got = apply(params["vgg"], image)
  want = ref_trunk(weights, image[0].transpose(2, 0, 1))
  for name, size in (("conv3_3", 29), ("conv4_3", 15), ("conv5_3", 7), ("conv7", 7)):
    g = np.asarray(got[name])[0].transpose(2, 0, 1)
    assert g.shape[1:] == (size, size)
    np.testing.assert_allclose(g, want[name], rtol=1e-3, atol=1e-4 * np.abs(want[name]).max(),
                               err_msg=name)


def test_loaded_kernels_are_hwio(weights, timm_loaded):
  params, _ = timm_loaded
  np.testing.assert_array_equal(params["vgg"]["conv1_1"]["conv"]["kernel"],
                                weights["conv1_1"][0].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["vgg"]["conv6"]["conv"]["kernel"],
                                weights["conv6"][0].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["vgg"]["conv7"]["conv"]["bias"], weights["conv7"][1])


@pytest.mark.parametrize("file,source", [("torchvision", "torchvision"), ("ssd_zip", "ssd_pytorch"),
                                         ("ssd_legacy", "ssd_pytorch")])
def test_pth_sources_give_the_same_trunk(files, timm_loaded, file, source):
  for name in ("auto", source):
    params, pixel = pretrained.load_vgg16(files[file], trunk_params(), source=name)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, timm_loaded[0])
    if source == "ssd_pytorch":
      assert pixel == dict(channel_order="BGR", input_range=255.0, mean=(104.0, 117.0, 123.0),
                           std=(1.0, 1.0, 1.0))
    else:
      assert pixel == timm_loaded[1]


def test_detect_source_from_keys(weights):
  assert pretrained.detect_source(timm_state(weights)) == "timm"
  assert pretrained.detect_source(torchvision_state(weights)) == "torchvision"
  assert pretrained.detect_source(ssd_pytorch_state(weights)) == "ssd_pytorch"
  with pytest.raises(ValueError, match="cannot tell"):
    pretrained.detect_source(["backbone.conv1.weight"])


def test_wrong_shape_names_key_and_both_shapes(weights, tmp_path):
  state = ssd_pytorch_state(weights)
  state["31.weight"] = np.zeros((1024, 512, 7, 7), np.float32)
  path = str(tmp_path / "bad.pth")
  write_torch_zip(path, state)
  with pytest.raises(ValueError) as info:
    pretrained.load_vgg16(path, trunk_params())
  message = str(info.value)
  assert "'31.weight'" in message and "(1024, 512, 7, 7)" in message
  assert "(1024, 512, 3, 3)" in message


def test_wrong_source_names_the_missing_key(files):
  with pytest.raises(ValueError, match="classifier.0.weight"):
    pretrained.load_vgg16(files["timm"], trunk_params(), source="torchvision")


def test_incompatible_models_are_named(files):
  with pytest.raises(ValueError, match="width_multiplier"):
    pretrained.load_vgg16(files["ssd_zip"], trunk_params(width=0.5))
  with pytest.raises(ValueError, match="batch_norm"):
    pretrained.load_vgg16(files["ssd_zip"], trunk_params(batch_norm=True))


def test_pickles_with_other_globals_are_refused(tmp_path):
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
  with pytest.raises(pickle.UnpicklingError, match="os.system"):
    pretrained.load_vgg16(path, trunk_params())


def test_not_a_weights_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("hello")
  with pytest.raises(ValueError, match="not a safetensors file"):
    pretrained.read_state_dict(str(path))


def test_init_from_config(files):
  import ml_collections   # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(init_from="", init_source="auto",
                                       pixel=dict(pretrained.IMAGENET_RGB)))
  params = trunk_params()
  same, pixel = pretrained.init_from_config(cfg, params)
  assert same is params and pixel == pretrained.IMAGENET_RGB
  cfg.init_from = files["ssd_legacy"]
  _, pixel = pretrained.init_from_config(cfg, params)
  assert pixel["channel_order"] == "BGR"
