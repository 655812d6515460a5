"""Read torch checkpoints (`torch.save` files) into numpy arrays without torch.

Both of torch's layouts are supported: the zip archive (torch >= 1.6: `<root>/data.pkl` plus one
file per storage under `<root>/data/`) and the legacy stream (pickled magic number, protocol,
system info, the object, the storage keys, then each storage as an 8-byte element count and raw
bytes). Like `torch.load(weights_only=True)`, unpickling only resolves an allow-list of globals
(containers and tensor rebuilders), so a checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    pass


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _LazyTensor:
    """A tensor view recorded while unpickling; materialised once all storages are read."""

    def __init__(self, storage_key, dtype, offset, size, stride):
        self.storage_key, self.dtype = storage_key, dtype
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)

    def materialise(self, storages: dict) -> np.ndarray:
        flat = storages[self.storage_key].view(self.dtype)
        if not self.size:
            return flat[self.offset].copy()
        itemsize = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride]
        )
        return np.array(view)


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype):
        self.key, self.dtype = key, dtype


def _rebuild_tensor(storage: _StorageRef, offset, size, stride, *_):
    return _LazyTensor(storage.key, storage.dtype, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _type, args, _state):
    return func(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): object,
    ("torch", "Tensor"): object,
    ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storage_key_of):
        super().__init__(file, encoding="latin1")
        self._storage_key_of = storage_key_of

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"checkpoint references {module}.{name}, which a weights-only load does not allow"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type {storage_type!r}")
        self._storage_key_of(key, storage_type.dtype, pid)
        return _StorageRef(key, storage_type.dtype)


def _materialise(obj: Any, storages: dict) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialise(storages)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, storages) for v in obj)
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{path} is a zip file without data.pkl; not a torch checkpoint")
        root = pkl[: -len("data.pkl")]
        keys: dict[str, np.dtype] = {}
        obj = _Unpickler(io.BytesIO(archive.read(pkl)), lambda k, d, _: keys.setdefault(k, d)).load()
        if root + "byteorder" in archive.namelist() and archive.read(root + "byteorder") != b"little":
            raise CheckpointError(f"{path} was saved on a big-endian machine; not supported")
        storages = {key: np.frombuffer(archive.read(f"{root}data/{key}"), np.uint8) for key in keys}
        return _materialise(obj, storages)


def _load_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path} is not a torch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path} was saved on a big-endian machine; not supported")
        dtypes: dict[str, np.dtype] = {}
        obj = _Unpickler(f, lambda k, d, _: dtypes.setdefault(k, d)).load()
        storage_keys = pickle.load(f)
        storages = {}
        for key in storage_keys:
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * dtypes[key].itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise CheckpointError(f"{path} is truncated (storage {key})")
            storages[key] = np.frombuffer(raw, np.uint8)
    return _materialise(obj, storages)


def load_torch_checkpoint(path: str | Path) -> Any:
    """The object saved by torch.save at `path`, with tensors as numpy arrays."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read torch checkpoint {path}: {e}") from e
