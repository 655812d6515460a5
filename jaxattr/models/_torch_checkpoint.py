"""Read torch checkpoints (`torch.save` files) into numpy arrays without torch, running no code.

Both of torch's layouts are read: the zip archive (torch >= 1.6: `<root>/data.pkl` plus one
member per storage under `<root>/data/`) and the legacy stream (`_use_new_zipfile_serialization=False`:
five pickles -- magic number, protocol, system info, the object, the storage keys -- then each
storage as an 8-byte element count and raw bytes). torch's pre-1.0 tar archives and plain pickles
are refused.

A checkpoint is hostile data until proven otherwise:

* Every pickle (all five of the legacy stream included) is first parsed opcode by opcode without
  being run (`pickletools.genops`), which checks each declared length against the bytes present
  and each memo index against the opcodes seen, so the unpickler never allocates what the file
  does not hold. It is then unpickled with an allow-list of globals: containers and torch's tensor
  rebuilders, mapped to functions here that only record a tensor's layout. Any other global
  (`posix.system`, `builtins.exec`, a model class, ...) is refused with its name; nothing else
  can call code.
* A tensor is a view (offset, size, stride) of a storage; each view is checked to lie inside
  its storage before numpy looks at the bytes, so a lying stride cannot read past the buffer.
* Sizes the file declares (legacy element counts, zip member sizes, the total of all tensors) are
  checked against the file's size before anything is read or allocated.

Every failure is a `CheckpointError` (a ValueError) with a one-line message naming the file.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from jaxattr._files import one_line, open_regular_file

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the legacy stream's first pickle

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

# A state_dict's pickle is a few bytes per tensor; larger ones are not state_dicts.
MAX_PICKLE_BYTES = 1 << 28
# The arrays a checkpoint yields may exceed its storages' bytes only where tensors share a storage
# (tied weights); more than this factor is a file built to exhaust memory.
_MAX_EXPANSION = 4
# torch stores zip members uncompressed; a deflated one may expand to at most this factor of the
# archive's size (floats hardly compress), beyond which it is a zip bomb.
_MAX_ZIP_RATIO = 4
_SLACK = 1 << 20  # bytes allowed beyond the ratios, for tiny files
_MAX_NDIM = 32
# A state_dict nests a few levels (a training checkpoint's optimizer state about six).
MAX_NESTING = 100


class CheckpointError(ValueError):
    pass


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------- pickles, checked


class _Bounded:
    """A read-only view of a file that never reads (or lets `pickletools` allocate) past `limit`."""

    def __init__(self, f: BinaryIO, limit: int):
        self._f, self._end = f, f.tell() + limit

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(self._end - self._f.tell(), 0)
        return self._f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline(min(max(self._end - self._f.tell(), 0), 1 << 16))


_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _read_pickle(f: BinaryIO, limit: int, source: str, what: str) -> bytes:
    """The bytes of the pickle at `f`'s position (which then moves past it), after checking every
    opcode's argument is present and every memo index is one the pickle could have filled."""
    start = f.tell()
    try:
        opcodes = pickletools.genops(_Bounded(f, min(limit, MAX_PICKLE_BYTES)))
        for count, (opcode, arg, _) in enumerate(opcodes):
            if opcode.name in _MEMO_PUTS and not 0 <= arg <= count:
                raise CheckpointError(
                    f"{source}: the {what} pickle uses memo index {arg} after {count} opcodes"
                )
    except CheckpointError:
        raise
    except Exception as e:  # pickletools' complaint about a short or malformed pickle
        reason = one_line(e)
        raise CheckpointError(f"{source}: the {what} pickle is truncated or malformed ({reason})") from None
    end = f.tell()
    f.seek(start)
    return f.read(end - start)


class _DataUnpickler(pickle.Unpickler):
    """Plain data only (numbers, strings, containers): every global and persistent id refused."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        raise CheckpointError(
            f"{self.source}: refused: the checkpoint references the Python global {module}.{name}; "
            "only state_dicts (tensors in dicts and lists) are loaded, and no code is run"
        )

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: refused: unexpected persistent id {_short(pid)}")


class _StorageType(NamedTuple):
    name: str
    dtype: np.dtype


class _StorageRef(NamedTuple):
    key: str
    dtype: np.dtype


class _TensorRecord(NamedTuple):
    """A tensor as pickled: a strided view of a storage, read once all storages are known.

    A NamedTuple, so a pickle's BUILD opcode cannot change it after it was checked."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _StorageRef):
        raise TypeError(f"a tensor's storage must be a storage record, got {_short(storage)}")
    size, stride = tuple(size), tuple(stride)
    if not (_is_int(offset) and all(map(_is_int, size)) and all(map(_is_int, stride))):
        got = f"{offset}, {_short(size)}, {_short(stride)}"
        raise TypeError(f"a tensor's offset, size and stride must be integers, got {got}")
    if len(size) > _MAX_NDIM:
        raise ValueError(f"a tensor has {len(size)} dimensions, more than {_MAX_NDIM}")
    if len(size) != len(stride):
        raise ValueError(f"a tensor's size {_short(size)} and stride {_short(stride)} do not match")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise ValueError(f"negative offset, size or stride: {offset}, {_short(size)}, {_short(stride)}")
    return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    if not isinstance(data, _TensorRecord):
        raise TypeError(f"a parameter must hold a tensor, got {_short(data)}")
    return data


class _Global:
    """An allow-listed global as the unpickler sees it: called (if it has a function), never
    changed. A pickle's BUILD opcode sets attributes on what it builds; on a plain function or
    class of this module that would outlive the load, here it fails."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function=None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "function", function)

    def __call__(self, *args):
        if self.function is None:
            raise TypeError(f"{self.name} cannot be called in a checkpoint")
        return self.function(*args)

    def __setattr__(self, *_):
        raise TypeError(f"a checkpoint cannot modify {self.name}")

    def __setstate__(self, _):
        raise TypeError(f"a checkpoint cannot modify {self.name}")


def _encode(text, encoding="latin1"):
    # How protocol-2 pickles spell a bytes object (torch's legacy stream holds some).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin1")


_REBUILD_TENSOR = _Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor)
_REBUILD_PARAMETER = _Global("torch._utils._rebuild_parameter", _rebuild_parameter)
_TENSOR_TYPES = (_Global("torch.Tensor"), _Global("torch.nn.parameter.Parameter"))  # types, never called


def _rebuild_from_type(func, new_type, args, state):
    # torch._tensor._rebuild_from_type_v2(func, type, args, state): only plain tensors here.
    if func not in (_REBUILD_TENSOR, _REBUILD_PARAMETER) or new_type not in _TENSOR_TYPES:
        raise TypeError("_rebuild_from_type_v2 may only rebuild plain tensors and parameters")
    return func(*args)


# Builtin types (immutable) as they are; functions wrapped so that they stay as they are.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _Global("_codecs.encode", _encode),
    ("torch", "Tensor"): _TENSOR_TYPES[0],
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPES[1],
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_tensor"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_parameter"): _REBUILD_PARAMETER,
    ("torch._utils", "_rebuild_parameter_with_state"): _REBUILD_PARAMETER,
    ("torch._tensor", "_rebuild_from_type_v2"): _Global("_rebuild_from_type_v2", _rebuild_from_type),
}


class _StateDictUnpickler(_DataUnpickler):
    """Tensors in containers: the allow-listed globals above, storages as persistent ids."""

    def __init__(self, data: bytes, source: str):
        super().__init__(data, source)
        self.storages: dict[str, _StorageRef] = {}
        self.declared_numel: dict[str, int] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        return super().find_class(module, name)

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata (legacy stream)])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            return super().persistent_load(pid)
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(
                f"{self.source}: refused: storage type {_short(storage_type)} in {_short(pid)}"
            )
        if not isinstance(key, (str, int)) or not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{self.source}: refused: malformed storage record {_short(pid)}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: storage views (torch < 1.0 checkpoints) are not supported")
        key = str(key)
        known = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype))
        if known.dtype != storage_type.dtype:
            raise CheckpointError(f"{self.source}: storage {key} is declared with two dtypes")
        self.declared_numel[key] = numel
        return known


def _unpickle(unpickler: _DataUnpickler) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # a rebuilder's TypeError, pickle's own errors, a BUILD on a record, ...
        reason = f"{type(e).__name__}: {one_line(e)}"
        raise CheckpointError(f"{unpickler.source}: malformed pickle ({reason})") from None


# ------------------------------------------------------------------------ tensors, checked


def _children(obj: Any) -> Any:
    """The values inside a container the materialised checkpoint keeps (dict, list, tuple)."""
    if isinstance(obj, dict):
        return obj.values()
    return obj if type(obj) in (list, tuple) else ()


def _records(obj: Any, depth: int = 0) -> list[_TensorRecord]:
    if isinstance(obj, _TensorRecord):
        return [obj]
    if isinstance(obj, (_StorageRef, _StorageType)):
        raise CheckpointError("it holds a bare storage where a tensor or value belongs")
    children = _children(obj)
    if children and depth >= MAX_NESTING:
        raise CheckpointError(f"its containers nest more than {MAX_NESTING} deep; not a state_dict")
    return [record for value in children for record in _records(value, depth + 1)]


def _check_views(
    records: list[_TensorRecord], storages: dict[str, np.ndarray], source: str, file_size: int
) -> None:
    for record in records:
        key, dtype = record.storage
        buffer = storages[key]
        if len(buffer) % dtype.itemsize:
            raise CheckpointError(
                f"{source}: storage {key} holds {len(buffer)} bytes, not a whole number of {dtype}"
            )
        if record.numel == 0:
            continue
        last = record.offset + sum((n - 1) * s for n, s in zip(record.size, record.stride))
        elements = len(buffer) // dtype.itemsize
        if last >= elements:
            raise CheckpointError(
                f"{source}: a tensor of size {_short(record.size)}, stride {_short(record.stride)} at offset "
                f"{record.offset} reaches element {last} of storage {key}, which has {elements}"
            )
    total = sum(record.numel * record.storage.dtype.itemsize for record in records)
    if total > _MAX_EXPANSION * file_size + _SLACK:
        raise CheckpointError(
            f"{source}: its tensors would take {total} bytes from a {file_size}-byte file; refused"
        )


def _materialise_record(record: _TensorRecord, storages: dict[str, np.ndarray]) -> np.ndarray:
    key, dtype = record.storage
    if record.numel == 0:
        return np.empty(record.size, dtype)
    flat = storages[key].view(dtype)
    strides = [s * dtype.itemsize for s in record.stride]  # checked by _check_views to stay inside `flat`
    view = np.lib.stride_tricks.as_strided(flat[record.offset :], shape=record.size, strides=strides)
    return np.array(view)


def _materialise(obj: Any, storages: dict) -> Any:
    if isinstance(obj, _TensorRecord):
        return _materialise_record(obj, storages)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, storages)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_materialise(v, storages) for v in obj)
    return obj


def _finish(obj: Any, unpickler: _StateDictUnpickler, storages: dict[str, np.ndarray], file_size: int) -> Any:
    try:
        records = _records(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{unpickler.source}: {e}") from None
    missing = sorted({r.storage.key for r in records} - set(storages))
    if missing:
        raise CheckpointError(f"{unpickler.source}: storage {missing[0]} is referenced but not in the file")
    _check_views(records, storages, unpickler.source, file_size)
    return _materialise(obj, storages)


# ------------------------------------------------------------------------------- layouts


def _load_zip(f: BinaryIO, source: str, file_size: int) -> Any:
    with zipfile.ZipFile(f) as archive:
        infos = archive.infolist()
        pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{source} is a zip archive with {len(pickles)} data.pkl members; not a torch checkpoint"
            )
        root = pickles[0].filename[: -len("data.pkl")]
        if sum(i.file_size for i in infos) > _MAX_ZIP_RATIO * file_size + _SLACK:
            raise CheckpointError(
                f"{source}: its zip members declare more bytes than the file could hold; refused"
            )

        def read(name: str) -> bytes:
            return archive.read(name)

        names = {i.filename for i in infos}
        if root + "byteorder" in names and read(root + "byteorder") != b"little":
            raise CheckpointError(f"{source} was saved on a big-endian machine; not supported")
        data = _read_pickle(io.BytesIO(read(pickles[0].filename)), MAX_PICKLE_BYTES, source, "data.pkl")
        unpickler = _StateDictUnpickler(data, source)
        obj = _unpickle(unpickler)
        storages = {}
        for key in unpickler.storages:
            if f"{root}data/{key}" in names:
                storages[key] = np.frombuffer(read(f"{root}data/{key}"), np.uint8)
        return _finish(obj, unpickler, storages, file_size)


def _load_legacy(f: BinaryIO, source: str, file_size: int) -> Any:
    def data_pickle(what: str) -> Any:
        return _unpickle(_DataUnpickler(_read_pickle(f, file_size - f.tell(), source, what), source))

    if data_pickle("magic number") != _LEGACY_MAGIC:
        raise CheckpointError(f"{source} is not a torch checkpoint (bad magic number)")
    if not _is_int(data_pickle("protocol version")):
        raise CheckpointError(f"{source}: malformed protocol version")
    sys_info = data_pickle("system info")
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{source}: malformed system info")
    if not sys_info.get("little_endian", True):
        raise CheckpointError(f"{source} was saved on a big-endian machine; not supported")
    unpickler = _StateDictUnpickler(_read_pickle(f, file_size - f.tell(), source, "object"), source)
    obj = _unpickle(unpickler)
    keys = data_pickle("storage keys")
    if not (isinstance(keys, list) and all(isinstance(k, (str, int)) for k in keys)):
        raise CheckpointError(f"{source}: malformed storage key list")
    storages = {}
    for key in map(str, keys):
        if key not in unpickler.storages or key in storages:
            raise CheckpointError(f"{source}: storage key {_short(key)} is unknown or repeated")
        itemsize = unpickler.storages[key].dtype.itemsize
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{source} is truncated (storage {key})")
        (numel,) = struct.unpack("<q", header)
        left = file_size - f.tell()
        if numel < 0 or numel * itemsize > left:
            raise CheckpointError(
                f"{source}: storage {key} declares {numel} elements of {itemsize} bytes, "
                f"but {left} bytes are left: truncated or corrupt"
            )
        storages[key] = np.frombuffer(f.read(numel * itemsize), np.uint8)
    return _finish(obj, unpickler, storages, file_size)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """The object saved by torch.save at `path`, with tensors as numpy arrays.

    Raises CheckpointError (one line, naming the file) for anything but a state_dict-like
    object of tensors, containers, numbers and strings, and for any damaged file."""
    path = Path(path)
    source = str(path)
    try:
        with open_regular_file(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(512)
            f.seek(0)
            if not head:
                raise CheckpointError(f"{source} is empty; not a torch checkpoint")
            if zipfile.is_zipfile(f):
                f.seek(0)
                return _load_zip(f, source, file_size)
            f.seek(0)
            if head.startswith(b"PK\x03\x04"):
                raise CheckpointError(
                    f"{source} is a truncated or corrupt zip archive (no central directory)"
                )
            if head[257:262] == b"ustar":
                raise CheckpointError(
                    f"{source} is a tar archive (torch < 1.0's format), which is not supported; "
                    "re-save it with a current torch"
                )
            if not head.startswith(b"\x80"):  # every pickle of protocol >= 2 starts with PROTO
                raise CheckpointError(
                    f"{source} is not a torch checkpoint (neither a zip archive nor torch's legacy format)"
                )
            return _load_legacy(f, source, file_size)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read torch checkpoint {source}: {one_line(e.strerror or e)}") from None
    except Exception as e:  # OSError, zipfile.BadZipFile, zlib.error, MemoryError, ...
        reason = f"{type(e).__name__}: {one_line(e)}"
        raise CheckpointError(f"cannot read torch checkpoint {source}: {reason}") from None
