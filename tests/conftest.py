"""Parity tests run JAX at full float32 matmul/conv precision (no TF32/bf16 passes) and with torch's
TF32 off, so differences measure the ports, not the hardware's fast modes."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("JAXATTR_OFFLINE", "1")

try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:  # the torch-free part of the suite still runs
    torch = None


@pytest.fixture
def rng() -> np.random.RandomState:
    return np.random.RandomState(0)


@pytest.fixture(autouse=True)
def _isolated_jaxattr_home(tmp_path, monkeypatch):
    """Each test gets an empty weights cache unless it sets one up itself."""
    monkeypatch.setenv("JAXATTR_HOME", str(tmp_path / "jaxattr-home"))
