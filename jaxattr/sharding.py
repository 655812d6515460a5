"""Data parallelism over devices with JAX's own sharding: a 1-D `Mesh`, the batch split with a
`NamedSharding`, parameters replicated.

Methods treat images independently and draw per-image noise (`image_keys`), so splitting the
batch changes where each image is computed, not its result: the compiled program is the same
single-device program, partitioned by XLA. The batch is padded to a multiple of the device count
with copies of its last image (real inputs, so nothing degenerate runs) and sliced back.
Several hosts: each process splits its own images over its own devices (`jax.local_devices()`);
`jaxattr.distributed` gives each process its share of the inputs. A mesh spanning other
processes' devices would need every process to hold the whole batch, so it is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all local devices) with the axis 'batch'."""
    if isinstance(devices, (str, bytes, jax.Device)):
        raise TypeError(f"devices must be a sequence of jax.Device, e.g. jax.local_devices(), got {devices!r}")
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("need at least one device")
    named = [d for d in devices if not isinstance(d, jax.Device)]
    if named:
        raise TypeError(
            f"devices must be jax.Device objects, e.g. jax.local_devices() or jax.devices('gpu'), got {named[0]!r}"
        )
    remote = [d for d in devices if d.process_index != jax.process_index()]
    if remote:
        raise ValueError(
            f"{remote[0]} belongs to process {remote[0].process_index}: pass this process's devices "
            "(jax.local_devices()); across hosts each process explains its own images (jaxattr.distributed)"
        )
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def pad_batch(array: Any, multiple: int) -> jax.Array:
    """`array` with its leading axis padded to a multiple of `multiple` by repeating its last entry."""
    array = jnp.asarray(array)
    missing = -array.shape[0] % multiple
    return jnp.concatenate([array, jnp.repeat(array[-1:], missing, axis=0)]) if missing else array


def shard_batch(mesh: Mesh, array: Any) -> jax.Array:
    """`array` padded to a multiple of the mesh size and split along its leading axis."""
    return jax.device_put(pad_batch(array, mesh.size), NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every array leaf of `tree` (a model's parameters) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def data_parallel(
    fn: Callable[..., Any],
    model: Any,
    images: Any,
    targets: Any = None,
    *,
    per_image: Sequence[Any] = (),
    devices: Sequence[jax.Device] | None = None,
) -> Any:
    """fn(model, images, targets, *per_image) with the batch split over `devices`: a pytree whose
    leaves have a leading batch axis, equal to the single-device result. `targets` may be None, an
    int, one class per image or K classes per image (b, K); it and the `per_image` arrays (e.g. one key per image) are split
    with the images."""
    mesh = batch_mesh(devices)
    batch = jnp.shape(images)[0]
    if targets is not None and jnp.ndim(targets) >= 1:  # one class, or K classes, per image
        targets = shard_batch(mesh, targets)
    per_image = [shard_batch(mesh, array) for array in per_image]
    result = fn(replicate(mesh, model), shard_batch(mesh, images), targets, *per_image)
    return jax.tree_util.tree_map(lambda leaf: leaf[:batch], result)
