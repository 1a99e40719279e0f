"""A weights file runs no code: every pickle of a .pth goes through one restricted unpickler.

Malicious files of both PyTorch formats carry a payload (a callable that creates a sentinel file)
in each pickle position: the legacy format's magic-number, protocol, sys-info, main and
storage-keys pickles, and the zip format's data.pkl. Loading must refuse each one, name the file,
and leave no sentinel. Each payload is first shown to be live (plain `pickle.loads` does create its
sentinel), so the tests can fail. Legitimate files of both formats are written here by an
independent writer (the standard `pickle.Pickler` with a persistent_id hook, as torch.save does,
against stand-in `torch` modules) and must still load.
"""

import collections
import copyreg
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from mdssd_jax.models import pretrained

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_POSITIONS = ("magic", "protocol", "sys_info", "main", "keys")


# ---- an independent torch.save writer ------------------------------------------------------------

@pytest.fixture
def fake_torch(monkeypatch):
  """Stand-in `torch` / `torch._utils` modules so the standard pickler writes torch's global names."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  class FloatStorage:
    pass

  FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
  torch.FloatStorage = FloatStorage

  def _rebuild_tensor(*args):
    return args

  def _rebuild_tensor_v2(*args):
    return args

  for fn in (_rebuild_tensor, _rebuild_tensor_v2):
    fn.__module__, fn.__qualname__ = "torch._utils", fn.__name__
    setattr(utils, fn.__name__, fn)
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return torch


class _Storage:
  def __init__(self, key, values):
    self.key, self.values = key, np.ascontiguousarray(values, "<f4").reshape(-1)


class _Tensor:
  """Pickles as torch's tensors do: a rebuild function over a (persistent) storage."""

  def __init__(self, storage, offset, shape, stride, legacy):
    self.storage, self.offset, self.shape, self.stride, self.legacy = (storage, offset, shape,
                                                                        stride, legacy)

  def __reduce__(self):
    utils = sys.modules["torch._utils"]
    if self.legacy:
      return utils._rebuild_tensor, (self.storage, self.offset, self.shape, self.stride)
    return utils._rebuild_tensor_v2, (self.storage, self.offset, self.shape, self.stride, False,
                                      collections.OrderedDict())


class _TorchPickler(pickle.Pickler):

  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      pid = ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", obj.values.size)
      return pid + (None,) if self.legacy else pid
    return None


def _state(legacy):
  """OrderedDict of two tensors, one a transposed (strided) view; and the arrays they stand for."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  storages = {"0": _Storage("0", a), "1": _Storage("1", b)}
  state = collections.OrderedDict(
      [("a.weight", _Tensor(storages["0"], 0, (2, 3), (3, 1), legacy)),
       ("b.weight", _Tensor(storages["1"], 0, (4, 3), (1, 4), legacy))])   # b transposed
  return state, storages, {"a.weight": a, "b.weight": b.T}


def _pickle(obj, legacy=True):
  buffer = io.BytesIO()
  _TorchPickler(buffer, legacy).dump(obj)
  return buffer.getvalue()


def _legacy_pickles(legacy_state, storages):
  """The five pickles of the pre-1.6 format, in file order, then the raw storages."""
  pickles = dict(
      magic=pickle.dumps(LEGACY_MAGIC, protocol=2), protocol=pickle.dumps(1001, protocol=2),
      sys_info=pickle.dumps(dict(protocol_version=1001, little_endian=True,
                                 type_sizes=dict(short=2, int=4, long=4)), protocol=2),
      main=_pickle(legacy_state), keys=pickle.dumps(list(storages), protocol=2))
  raw = b"".join(struct.pack("<q", s.values.size) + s.values.tobytes() for s in storages.values())
  return pickles, raw


def _write_legacy(path, pickles, raw):
  with open(path, "wb") as f:
    for name in LEGACY_POSITIONS:
      f.write(pickles[name])
    f.write(raw)


def _write_zip(path, data_pkl, storages):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/byteorder", "little")
    for storage in storages.values():
      zf.writestr(f"archive/data/{storage.key}", storage.values.tobytes())
    zf.writestr("archive/version", "3\n")


def test_legitimate_files_of_both_formats_load(fake_torch, tmp_path):
  del fake_torch
  state, storages, want = _state(legacy=True)
  _write_legacy(tmp_path / "legacy.pth", *_legacy_pickles(state, storages))
  state, storages, _ = _state(legacy=False)
  _write_zip(tmp_path / "zip.pth", _pickle(state, legacy=False), storages)
  for name in ("legacy.pth", "zip.pth"):
    got = pretrained.read_state_dict(str(tmp_path / name))
    assert sorted(got) == sorted(want), name
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"{name} {key}")


# ---- malicious files -----------------------------------------------------------------------------

class _System:
  """Unpickles as os.system(command): the classic payload (GLOBAL + REDUCE)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


_EXT_CODE = 0x6E   # a copyreg extension code, registered only inside the test that uses it


def _payload(kind, sentinel):
  """Pickle bytes that create `sentinel` when unpickled by a plain unpickler."""
  command = f"touch {sentinel}"
  if kind == "reduce":            # protocol 2: GLOBAL 'posix system', REDUCE
    return pickle.dumps(_System(command), protocol=2)
  if kind == "stack_global":      # protocol 4: STACK_GLOBAL
    return pickle.dumps(_System(command), protocol=4)
  if kind == "inst":              # INST (protocol 0 opcode) calls what it names with the marked args
    return b"\x80\x02(S'" + command.encode() + b"'\nios\nsystem\n."
  if kind == "ext":               # EXT1: a name taken from copyreg's extension registry
    return pickle.dumps(_System(command), protocol=2)
  raise ValueError(kind)


@pytest.fixture(params=("reduce", "stack_global", "inst", "ext"))
def payload_kind(request):
  if request.param == "ext":
    copyreg.add_extension(os.system.__module__, "system", _EXT_CODE)
    yield "ext"
    copyreg.remove_extension(os.system.__module__, "system", _EXT_CODE)
  else:
    yield request.param


def _assert_live(kind, tmp_path):
  """The payload does run under plain pickle: without the restriction the tests would fail."""
  control = tmp_path / f"control_{kind}"
  pickle.loads(_payload(kind, control))
  assert control.exists(), "the payload should run under plain pickle.loads"


@pytest.mark.parametrize("position", LEGACY_POSITIONS)
def test_legacy_payload_in_every_pickle_runs_nothing(fake_torch, tmp_path, payload_kind, position):
  del fake_torch
  _assert_live(payload_kind, tmp_path)
  sentinel = tmp_path / "SENTINEL"
  state, storages, _ = _state(legacy=True)
  pickles, raw = _legacy_pickles(state, storages)
  if position == "main":   # hidden among the tensors of a real state dict
    evil = collections.OrderedDict(state, extra=_System(f"touch {sentinel}"))
    pickles["main"] = (_pickle(evil) if payload_kind == "reduce"
                       else _payload(payload_kind, sentinel))
  else:
    pickles[position] = _payload(payload_kind, sentinel)
  path = tmp_path / f"evil_{position}.pth"
  _write_legacy(path, pickles, raw)
  with pytest.raises(pickle.UnpicklingError) as info:
    pretrained.read_state_dict(str(path))
  assert not sentinel.exists(), f"the payload in the {position} pickle ran"
  message = str(info.value)
  assert str(path) in message and "nothing was run" in message
  assert ("system" in message) != (payload_kind == "ext")   # EXT names a code, not a function


def test_zip_payload_in_data_pkl_runs_nothing(fake_torch, tmp_path, payload_kind):
  del fake_torch
  _assert_live(payload_kind, tmp_path)
  sentinel = tmp_path / "SENTINEL"
  state, storages, _ = _state(legacy=False)
  for variant in ("whole", "inside"):
    if variant == "whole":
      data_pkl = _payload(payload_kind, sentinel)
    else:
      data_pkl = _pickle(collections.OrderedDict(state, extra=_System(f"touch {sentinel}")),
                         legacy=False)
    path = tmp_path / f"evil_{variant}.pth"
    _write_zip(path, data_pkl, storages)
    with pytest.raises(pickle.UnpicklingError) as info:
      pretrained.load_vgg16(str(path), {"vgg": {"conv1_1": {"conv": {
          "kernel": np.zeros((3, 3, 3, 64)), "bias": np.zeros(64)}}}})
    assert not sentinel.exists(), f"the payload in data.pkl ({variant}) ran"
    assert str(path) in str(info.value) and "data.pkl" in str(info.value)


def test_legacy_pickles_around_the_state_dict_resolve_no_names(fake_torch, tmp_path):
  """Even a harmless allowed name is refused outside the state-dict pickle: nothing needs one."""
  del fake_torch
  state, storages, _ = _state(legacy=True)
  pickles, raw = _legacy_pickles(state, storages)
  pickles["sys_info"] = pickle.dumps(collections.OrderedDict(little_endian=True), protocol=2)
  path = tmp_path / "odd.pth"
  _write_legacy(path, pickles, raw)
  with pytest.raises(pickle.UnpicklingError, match="sys-info pickle"):
    pretrained.read_state_dict(str(path))


def test_damaged_legacy_file_names_the_file(fake_torch, tmp_path):
  del fake_torch
  state, storages, _ = _state(legacy=True)
  pickles, raw = _legacy_pickles(state, storages)
  path = tmp_path / "cut.pth"
  with open(path, "wb") as f:
    f.write(b"".join(pickles[n] for n in LEGACY_POSITIONS[:3]) + pickles["main"][:40])
  with pytest.raises(ValueError) as info:
    pretrained.read_state_dict(str(path))
  assert str(path) in str(info.value) and "damaged" in str(info.value)


def test_build_cannot_rewrite_the_readers_own_classes(fake_torch, tmp_path):
  """BUILD on an allowed class (here torch._utils._rebuild_tensor_v2, the reader's stand-in class)
  would set attributes of the reader's code: refused, and the class is unchanged."""
  del fake_torch
  state, storages, _ = _state(legacy=False)
  # GLOBAL torch._utils _rebuild_tensor_v2; EMPTY_DICT; SHORT_BINUNICODE 'numpy'; NONE; SETITEM;
  # NONE ... : state (None, {"numpy": None}) as (dict state, slot state) -> BUILD -> STOP.
  data_pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}\x8c\x05numpyNs\x86b.")
  path = tmp_path / "build.pth"
  _write_zip(path, data_pkl, storages)
  before = pretrained._TensorRef.numpy
  with pytest.raises(pickle.UnpicklingError, match="refusing to set attributes"):
    pretrained.read_state_dict(str(path))
  assert pretrained._TensorRef.numpy is before


def test_state_dict_metadata_set_by_build_still_loads(fake_torch, tmp_path):
  """torch's state dicts carry `_metadata`, which pickle restores with BUILD on the OrderedDict."""
  del fake_torch
  state, storages, want = _state(legacy=False)
  state._metadata = collections.OrderedDict([("", {"version": 1})])
  path = tmp_path / "meta.pth"
  _write_zip(path, _pickle(state, legacy=False), storages)
  got = pretrained.read_state_dict(str(path))
  np.testing.assert_array_equal(got["b.weight"], want["b.weight"])
