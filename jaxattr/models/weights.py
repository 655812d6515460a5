"""Parameters <-> torch state_dicts, and parameter files.

The whole torch -> Flax mapping is one naming rule, because every port names its modules and
parameters after torch's: the torch key of a Flax parameter is its path joined with '.', where
the leaf `kernel` stands for torch's `weight` transposed (OIHW -> HWIO for convolutions,
(out, in) -> (in, out) for linear layers). Everything else (BatchNorm statistics, LayerNorm,
class tokens, position embeddings, packed attention projections) keeps torch's name and layout.

Files: safetensors is read and written here without the `safetensors` package (the format is a
length-prefixed JSON header and a raw buffer), so the core needs no torch-side dependency. Its
header is checked before any data is read: length within the file (and 100 MB), a JSON object
without duplicate keys, known dtypes, shape x itemsize equal to each tensor's byte span, and the
spans tiling the data exactly (contiguous, non-overlapping), as the format requires. Torch
checkpoints are read by `_torch_checkpoint`, which runs no code from the file.

dtypes: a parameter takes its tensor if the dtypes match; float16, bfloat16 and float64 tensors
are converted to the parameter's float32 with one `WeightsDtypeWarning` per file (a one-line
`warnings.warn`; silence it with `warnings.filterwarnings("ignore", category=WeightsDtypeWarning)`),
and refused if a value does not fit float32. Integer, bool or other tensors where a float
parameter belongs are refused (WeightsError naming the key), never cast.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from jaxattr._files import file_kind, one_line, open_regular_file
from jaxattr.models._torch_checkpoint import CheckpointError, load_torch_checkpoint

FLAX_FORMAT = "jaxattr-flax"
_IGNORED_TORCH_KEYS = ("num_batches_tracked",)


class WeightsError(ValueError):
    """A parameter file does not fit the model, or cannot be found or read."""


# ----------------------------------------------------------------------------- naming rule


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def torch_key(path: tuple[str, ...]) -> str:
    """The torch state_dict key of the Flax parameter at `path`."""
    *modules, leaf = path
    return ".".join([*modules, "weight" if leaf == "kernel" else leaf])


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return value.T
    raise WeightsError(f"a kernel must be 2-D or 4-D, got shape {value.shape}")


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    template: Any,
    *,
    source: str = "state_dict",
    ignored: tuple[str, ...] = (),
    rename: Callable[[str], str] | None = None,
) -> Any:
    """Flax parameters shaped like `template` (arrays or ShapeDtypeStructs) from a torch state_dict.

    `ignored`: prefixes of keys the model does not use (e.g. training-only heads).
    `rename`: maps a checkpoint's legacy key to the current torch key (identity for current keys).
    Raises WeightsError listing every missing, unexpected or mis-shaped key."""
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise WeightsError(f"{source} is not a state_dict: key {str(bad_keys[0])[:40]!r} is not a string")
    arrays = {(rename(k) if rename else k): _as_numpy(v) for k, v in state_dict.items()}
    missing, mismatched, used, casts = [], [], set(), _Casts(source)

    def convert(path, like):
        names = _path_names(path)
        key = torch_key(names)
        if key not in arrays:
            missing.append(key)
            return np.zeros(like.shape, like.dtype)
        used.add(key)
        expected = _torch_shape(names[-1], like.shape)
        if arrays[key].shape != expected:
            mismatched.append(f"{key}: file {arrays[key].shape}, model expects {expected}")
            return np.zeros(like.shape, like.dtype)
        return np.ascontiguousarray(casts(key, _to_flax_layout(names[-1], arrays[key]), like.dtype))

    params = jax.tree_util.tree_map_with_path(convert, template)
    unexpected = [
        k for k in arrays if k not in used and not k.endswith(_IGNORED_TORCH_KEYS) and not k.startswith(ignored)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:10]))
    problems += casts.problems()
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + " | ".join(problems))
    casts.warn()
    return params


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
    """The torch state_dict (numpy arrays, torch layouts) holding `params`."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _path_names(path)
        out[torch_key(names)] = np.ascontiguousarray(_to_torch_layout(names[-1], np.asarray(value)))
    return out


def _torch_shape(leaf: str, shape) -> tuple[int, ...]:
    return _to_torch_layout(leaf, np.empty(shape, np.uint8)).shape


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; avoids importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has none; exact through float32
            return value.float().numpy().astype(ml_dtypes.bfloat16)
        value = value.numpy()
    return np.asarray(value)


# ---------------------------------------------------------------------- Flax parameter trees


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    return {"/".join(_path_names(p)): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def params_from_flat(flat: Mapping[str, np.ndarray], template: Any, *, source: str) -> Any:
    """Parameters shaped like `template` from a flat {'a/b/kernel': array} mapping."""
    problems, casts = [], _Casts(source)

    def take(path, like):
        key = "/".join(_path_names(path))
        value = flat.get(key)
        if value is None or value.shape != tuple(like.shape):
            problems.append(f"{key}: {'missing' if value is None else f'shape {value.shape} != {tuple(like.shape)}'}")
            return np.zeros(like.shape, like.dtype)
        return casts(key, value, like.dtype)

    params = jax.tree_util.tree_map_with_path(take, template)
    problems += casts.problems()
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(problems[:10]))
    casts.warn()
    return params


# ---------------------------------------------------------------------------------- dtypes


class WeightsDtypeWarning(UserWarning):
    """Weights stored in another float type than the model's were converted (one line per file)."""


_FLOAT_DTYPES = (np.dtype("float16"), np.dtype(ml_dtypes.bfloat16), np.dtype("float32"), np.dtype("float64"))


class _Casts:
    """Casts a file's tensors to the parameters' dtype: other float types are converted and
    reported once per file (a WeightsDtypeWarning); integer, bool and other tensors where a
    float parameter belongs are refused, as are values the cast would overflow."""

    def __init__(self, source: str):
        self.source = source
        self.converted: dict[str, int] = {}
        self.targets: set[str] = set()
        self.refused: list[str] = []

    def __call__(self, key: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if value.dtype == dtype:
            return value
        if value.dtype not in _FLOAT_DTYPES or dtype not in _FLOAT_DTYPES:
            self.refused.append(f"{key} is {value.dtype}, the model's parameter is {dtype}")
            return np.zeros(value.shape, dtype)
        with np.errstate(over="ignore"):
            cast = value.astype(dtype)
        if not np.array_equal(np.isfinite(cast), np.isfinite(value)):
            self.refused.append(f"{key} has {value.dtype} values beyond {dtype}'s range")
        self.converted[str(value.dtype)] = self.converted.get(str(value.dtype), 0) + 1
        self.targets.add(str(dtype))
        return cast

    def problems(self) -> list[str]:
        if not self.refused:
            return []
        return ["wrong dtypes: " + "; ".join(self.refused[:10]) + (" ..." if len(self.refused) > 10 else "")]

    def warn(self) -> None:
        if self.converted:
            counts = ", ".join(f"{n} {name}" for name, n in sorted(self.converted.items()))
            targets = "/".join(sorted(self.targets))
            message = f"{self.source}: converted {counts} tensor(s) to {targets}"
            warnings.warn(message, WeightsDtypeWarning, stacklevel=3)


# ------------------------------------------------------------------------------ safetensors

_ST_DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# The header is JSON of a few hundred bytes per tensor; the safetensors package refuses > 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


_Layout = dict[str, tuple[np.dtype, tuple[int, ...], int, int]]


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_layout(header: Any, data_size: int) -> tuple[_Layout, dict]:
    """(name -> (dtype, shape, begin, end), metadata) of a parsed header, checked as the format
    requires: known dtypes, shape x itemsize == span, and the spans tiling the data buffer in
    order (contiguous, non-overlapping, from 0 to its end)."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("__metadata__ must map strings to strings")
    layout = {}
    for name, info in header.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise ValueError(f"tensor {name!r}: expected dtype, shape and data_offsets, got {str(info)[:80]}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            known = ", ".join(_ST_DTYPES)
            raise ValueError(f"tensor {name!r} has dtype {str(dtype)[:20]!r}, not one of {known}")
        if not (isinstance(shape, list) and all(map(_is_size, shape)) and len(shape) <= 32):
            raise ValueError(f"tensor {name!r} has shape {str(shape)[:40]}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))):
            raise ValueError(f"tensor {name!r} has data_offsets {str(offsets)[:40]}, not [begin, end]")
        begin, end = offsets
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} does not take bytes {begin}..{end}")
        layout[name] = (_ST_DTYPES[dtype], tuple(shape), begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise ValueError(f"tensor {name!r} starts at byte {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_size:
        raise ValueError(f"the tensors take {position} bytes, the file holds {data_size} after the header")
    return layout, metadata


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, its header checked before any data is read.

    Raises WeightsError (one line, naming the file) for a damaged or lying file."""
    path = Path(path)
    try:
        with open_regular_file(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise ValueError(f"{file_size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_SAFETENSORS_HEADER, file_size - 8):
                raise ValueError(f"the header length {n} exceeds the file ({file_size} bytes) or 100 MB")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_reject_duplicates)
            layout, metadata = _safetensors_layout(header, file_size - 8 - n)
            data = f.read()
            if len(data) != file_size - 8 - n:
                raise ValueError("the file changed while it was read")
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {one_line(e.strerror or e)}") from None
    except (ValueError, RecursionError) as e:  # incl. JSON and UTF-8 errors
        raise WeightsError(f"{path} is not a valid safetensors file: {one_line(e)}") from None
    tensors = {
        name: np.frombuffer(data, dtype, count=math.prod(shape), offset=begin).reshape(shape).copy()
        for name, (dtype, shape, begin, _) in layout.items()
    }
    return tensors, metadata


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically (temporary file, then rename) so a crash never leaves half a file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        blob = array.tobytes()
        header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def save_params(path: str | os.PathLike, params: Any, *, model: str) -> None:
    """Save converted Flax parameters (the jaxattr cache format)."""
    write_safetensors(path, flatten_params(params), {"format": FLAX_FORMAT, "model": model})


# ------------------------------------------------------------------------------ any file


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_params_file(
    path: str | os.PathLike,
    template: Any,
    *,
    model: str,
    ignored: tuple[str, ...] = (),
    rename: Callable[[str], str] | None = None,
) -> Any:
    """Parameters for `template` from a jaxattr safetensors file, a torch-layout safetensors file,
    or a torch checkpoint (.pth/.pt/.bin, read without torch and without executing pickled code)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise WeightsError(f"weights file {path} is {file_kind(mode)}, not a regular file")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") == FLAX_FORMAT:
            if metadata.get("model") not in (None, model):
                raise WeightsError(f"{path} holds weights for {metadata.get('model')!r}, not {model!r}")
            return params_from_flat(tensors, template, source=str(path))
        return params_from_state_dict(tensors, template, source=str(path), ignored=ignored, rename=rename)
    if path.suffix in _TORCH_SUFFIXES:
        try:
            checkpoint = load_torch_checkpoint(path)
        except CheckpointError as e:
            raise WeightsError(str(e)) from e
        return params_from_state_dict(
            unwrap_state_dict(checkpoint), template, source=str(path), ignored=ignored, rename=rename
        )
    raise WeightsError(f"unsupported weights file {path}: expected .safetensors or a torch checkpoint ({', '.join(_TORCH_SUFFIXES)})")


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
    """The state_dict inside a checkpoint that nests it under 'state_dict', 'model', ..."""
    for _ in range(3):
        if isinstance(obj, Mapping) and any(isinstance(v, np.ndarray) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and k in obj), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint does not contain a state_dict (found {type(obj).__name__})")
    return obj
