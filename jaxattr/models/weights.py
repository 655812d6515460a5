"""Parameters <-> torch state_dicts, and parameter files.

The whole torch -> Flax mapping is one naming rule, because every port names its modules and
parameters after torch's: the torch key of a Flax parameter is its path joined with '.', where
the leaf `kernel` stands for torch's `weight` transposed (OIHW -> HWIO for convolutions,
(out, in) -> (in, out) for linear layers). Everything else (BatchNorm statistics, LayerNorm,
class tokens, position embeddings, packed attention projections) keeps torch's name and layout.

Files: safetensors is read and written here without the `safetensors` package (the format is a
length-prefixed JSON header and a raw buffer), so the core needs no torch-side dependency.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np

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
    arrays = {(rename(k) if rename else k): _as_numpy(v) for k, v in state_dict.items()}
    missing, mismatched, used = [], [], set()

    def convert(path, like):
        names = _path_names(path)
        key = torch_key(names)
        if key not in arrays:
            missing.append(key)
            return np.zeros(like.shape, like.dtype)
        used.add(key)
        value = _to_flax_layout(names[-1], arrays[key])
        if value.shape != tuple(like.shape):
            mismatched.append(f"{key}: file {arrays[key].shape}, model expects {_torch_shape(names[-1], like.shape)}")
            return np.zeros(like.shape, like.dtype)
        return np.ascontiguousarray(value, dtype=like.dtype)

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
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + " | ".join(problems))
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
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


# ---------------------------------------------------------------------- Flax parameter trees


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    return {"/".join(_path_names(p)): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def params_from_flat(flat: Mapping[str, np.ndarray], template: Any, *, source: str) -> Any:
    """Parameters shaped like `template` from a flat {'a/b/kernel': array} mapping."""
    problems = []

    def take(path, like):
        key = "/".join(_path_names(path))
        value = flat.get(key)
        if value is None or value.shape != tuple(like.shape):
            problems.append(f"{key}: {'missing' if value is None else f'shape {value.shape} != {tuple(like.shape)}'}")
            return np.zeros(like.shape, like.dtype)
        return np.asarray(value, like.dtype)

    params = jax.tree_util.tree_map_with_path(take, template)
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(problems[:10]))
    return params


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


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None or end > len(data):
            raise WeightsError(f"{path}: tensor {name!r} is truncated or has unsupported dtype {info['dtype']}")
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"]).copy()
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
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
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
