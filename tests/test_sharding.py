"""Data parallel explanations on 4 simulated CPU devices equal single-device ones.

XLA reads --xla_force_host_platform_device_count when JAX initialises its backend, so the check
runs in a fresh interpreter with the flag set before jax is imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxattr import sharding

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jaxattr
    from jax.sharding import PartitionSpec
    from jaxattr import sharding

    assert len(jax.devices()) == 4, jax.devices()

    def forward(params, x):
        h = jax.lax.conv_general_dilated(x, params["w"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).mean(axis=(1, 2)) @ params["d"]

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    model = jax.tree_util.Partial(forward, {"w": jax.random.normal(k1, (3, 3, 3, 8)), "d": jax.random.normal(k2, (8, 5))})
    x = jax.random.uniform(k3, (3, 16, 16, 3))  # 3 images on 4 devices: one padded row
    report = {}
    runs = {  # label: (method, options)
        "integrated_gradients": ("integrated_gradients", dict(steps=6, chunk=4)),
        "uniform_baseline": ("integrated_gradients", dict(steps=4, baseline="uniform", key=jax.random.key(1))),
        "smoothgrad": ("smoothgrad", dict(samples=3, key=jax.random.key(2))),
        "per_image_baselines": ("integrated_gradients", dict(steps=4, baselines=x[::-1])),
        "colour_baseline": ("guided_ig", dict(steps=4, baselines=jnp.array([0.2, 0.5, 0.8]))),
    }
    for name, (method, options) in runs.items():
        one = jaxattr.explain(model, x, method, targets=jnp.array([0, 3, 1]), **options)
        many = jaxattr.explain(model, x, method, targets=jnp.array([0, 3, 1]), devices=jax.devices(), **options)
        scale = float(jnp.abs(one.attributions).max())
        report[name] = {
            field: float(jnp.abs(getattr(one, field) - getattr(many, field)).max()) / (scale if field == "attributions" else 1.0)
            for field in ("attributions", "maps", "probabilities")
        }
        report[name]["shape"] = list(many.attributions.shape)

    # Inside, the method really runs split over the devices: one padded image per device.
    mesh = sharding.batch_mesh()
    inside = jaxattr.integrated_gradients(sharding.replicate(mesh, model), sharding.shard_batch(mesh, x), 0)
    report["inside"] = {"split": inside.sharding.spec == PartitionSpec("batch"), "shards": [list(s.data.shape) for s in inside.addressable_shards]}
    print("REPORT" + json.dumps(report))
    """
)


def test_data_parallel_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.split("REPORT", 1)[1])
    inside = report.pop("inside")
    assert inside["split"]
    assert inside["shards"] == [[1, 16, 16, 3]] * 4
    for name, diffs in report.items():
        assert diffs.pop("shape") == [3, 16, 16, 3], name
        # Equal up to XLA choosing other kernels for the per-device batch (observed: <= 1e-8).
        assert max(diffs.values()) <= 1e-6, (name, diffs)


def test_pad_batch_repeats_the_last_image():
    padded = np.asarray(sharding.pad_batch(np.arange(6).reshape(3, 2), 4))
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5]])
    assert sharding.pad_batch(np.zeros((4, 2)), 4).shape == (4, 2)
    with pytest.raises(ValueError, match="at least one device"):
        sharding.batch_mesh([])
