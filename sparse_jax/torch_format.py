"""PyTorch `torch.save` state-dict files read and written with numpy only (no torch).

A `.pt` file is a zip archive `<name>/data.pkl` + `<name>/data/<key>` (one raw storage per
key) + small records (`byteorder`, `version`, ...). The pickle references each storage by a
persistent id `('storage', torch.<Dtype>Storage, key, location, numel)` and rebuilds tensors
with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

Unpickling runs whatever callables a file names, so `read_state_dict` uses a restricted
unpickler: only the globals a plain state dict needs (the tensor rebuild functions, the
storage types, `collections.OrderedDict`) resolve, each to a harmless numpy stand-in;
anything else is refused with `UnsafePickleError` before it is called. `write_state_dict`
emits the same opcodes torch writes (pickle protocol 2), by hand, since the torch globals
cannot be pickled without torch installed.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sparse_jax.fileio import atomic_write

# torch storage type name -> numpy dtype (little-endian; a "big" byteorder record flips it).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("float32"), "DoubleStorage": np.dtype("float64"),
    "HalfStorage": np.dtype("float16"), "BFloat16Storage": np.dtype(jnp.bfloat16),
    "LongStorage": np.dtype("int64"), "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"), "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"), "BoolStorage": np.dtype("bool"),
}
_DTYPE_STORAGES = {v: k for k, v in STORAGE_DTYPES.items()}
_ALIGN = 64  # torch aligns storage records to 64 bytes (its `.storage_alignment` record)


class UnsafePickleError(ValueError):
  """The pickle names a global that a plain state dict does not need."""


class _Storage:
  """A stand-in for a torch storage: its dtype, resolved to bytes on first use."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd bookkeeping, meaningless here
  flat = storage  # persistent_load already returned the storage's 1-D numpy array
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
    raise ValueError(f"bad tensor layout: size {size}, stride {stride}, offset {storage_offset}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= flat.size:  # as_strided does no bounds checks: a lying file must not read past
    raise ValueError(f"tensor of size {size}, stride {stride} at offset {storage_offset} "
                     f"reads past its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(
      flat[storage_offset:], size, tuple(st * flat.itemsize for st in stride), writeable=False)
  return np.array(view)  # a contiguous copy


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals; storages come from the zip archive."""

  def __init__(self, data: bytes, read_record, where: str, big_endian: bool):
    super().__init__(io.BytesIO(data))
    self._read_record, self._where, self._big_endian = read_record, where, big_endian
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) not in _ALLOWED:
      raise UnsafePickleError(
          f"{self._where}: refusing to unpickle the global {module}.{name}: a plain state dict "
          f"only needs {', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED))}")
    return _ALLOWED[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _Storage)):
      raise UnsafePickleError(f"{self._where}: unexpected persistent id {pid!r}")
    _, storage, key, _location, numel = pid
    if key not in self._storages:
      dtype = storage.dtype.newbyteorder(">") if self._big_endian else storage.dtype
      raw = self._read_record(f"data/{key}")
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f"{self._where}: storage {key} holds {len(raw)} bytes, expected "
                         f"{numel} x {dtype.itemsize}")
      self._storages[key] = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
    return self._storages[key]


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip format) into {name: numpy array}.

  Raises:
    UnsafePickleError: the pickle names a global outside the state-dict allowlist.
    ValueError: not a zip-format torch file, or a malformed tensor/storage.
  """
  path = Path(path)
  try:
    zf = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a torch zip checkpoint ({e}); files saved with "
                     "_use_new_zipfile_serialization=False are not supported") from None
  with zf:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise ValueError(f"{path}: expected one <name>/data.pkl record, found {pkls}")
    prefix = pkls[0][:-len("data.pkl")]
    names = set(zf.namelist())

    def read_record(name: str) -> bytes:
      if prefix + name not in names:
        raise ValueError(f"{path}: missing record {prefix + name}")
      return zf.read(prefix + name)

    byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names \
        else "little"
    unpickler = _StateDictUnpickler(read_record("data.pkl"), read_record, str(path),
                                    big_endian=byteorder == "big")
    try:
      obj = unpickler.load()
    except (UnsafePickleError, ValueError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A truncated or malformed pickle raises many types; name the file once.
      raise ValueError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
    raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
  return dict(obj)


# Writing ---------------------------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(n: int) -> bytes:
  return pickle.dumps(int(n), protocol=2)[2:-1]  # BININT*/LONG1 opcodes: ints are not memoised


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _pickle(entries: list[tuple[str, str, str, tuple[int, ...]]]) -> bytes:
  """Protocol-2 pickle of OrderedDict(name -> tensor(storage key, shape)), as torch writes."""
  empty_ordered_dict = _global("collections", "OrderedDict") + b")R"
  out = [b"\x80\x02", empty_ordered_dict, b"("]
  for name, key, storage_type, shape in entries:
    numel = int(np.prod(shape, dtype=np.int64))
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
    pid = _tuple([_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"),
                  _int(numel)]) + b"Q"  # BINPERSID
    args = _tuple([pid, _int(0), _tuple([_int(s) for s in shape]),
                   _tuple([_int(s) for s in strides]), b"\x89", empty_ordered_dict])
    out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
  out += [b"u", b"."]  # SETITEMS, STOP
  return b"".join(out)


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
  """Stores data uncompressed, padding the local header so the bytes start 64-aligned."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode()) + 4  # fixed header, file name, our extra field's header
  pad = -(zf.fp.tell() + header) % _ALIGN
  info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding field, as torch
  zf.writestr(info, data)


def write_state_dict(path: str | os.PathLike, state: dict[str, np.ndarray],
                     shared: dict[str, str] | None = None) -> Path:
  """Writes {name: array} as torch.save would (zip format), atomically.

  Args:
    path: the .pt file; its stem names the archive folder, as torch does.
    state: arrays, written little-endian, C-contiguous.
    shared: {name: other name} for entries that share the other's storage (tied weights); the
      arrays must be equal.
  """
  path, shared = Path(path), shared or {}
  prefix = path.stem + "/"
  keys: dict[str, str] = {}
  entries, storages = [], []
  for name, arr in state.items():
    arr = np.asarray(arr)
    if arr.dtype not in _DTYPE_STORAGES:
      raise ValueError(f"{name}: dtype {arr.dtype} has no torch storage type")
    if name in shared:
      keys[name] = keys[shared[name]]
    else:
      keys[name] = str(len(storages))
      storages.append(np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes())
    entries.append((name, keys[name], _DTYPE_STORAGES[arr.dtype], arr.shape))

  def write(tmp: Path):
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
      _write_aligned(zf, prefix + "data.pkl", _pickle(entries))
      _write_aligned(zf, prefix + ".format_version", b"1")
      _write_aligned(zf, prefix + ".storage_alignment", str(_ALIGN).encode())
      _write_aligned(zf, prefix + "byteorder", b"little")
      for key, data in enumerate(storages):
        _write_aligned(zf, prefix + f"data/{key}", data)
      _write_aligned(zf, prefix + "version", b"3\n")
  return atomic_write(path, write)
