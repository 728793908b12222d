"""SPMD over all devices: a (data, fsdp) `jax.sharding.Mesh`, FSDP shardings for the state, and
batches sharded over both axes.

Data parallelism replicates the params over "data"; FSDP shards every matrix (and its optimizer
moments) over "fsdp" along its largest dimension that the axis size divides; vectors and scalars are
replicated. The batch dimension is split over ("data", "fsdp") together, so every device sees its own
slice of the batch and XLA inserts the all-gathers and reduce-scatters of FSDP. One device is the
mesh (1, 1): the same code runs unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all); -1 for one axis takes what is left.

    Raises:
      ValueError naming mesh.data / mesh.fsdp when the sizes do not multiply to the device count.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"{name} must be a positive int or -1, got {size!r}")
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if n % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = n // data if n % data == 0 else 0
    if data * fsdp != n:
        raise ValueError(f"mesh.data x mesh.fsdp must equal the {n} devices; got "
                         f"{sizes['mesh.data']} x {sizes['mesh.fsdp']} (-1 takes what is left)")
    return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shards the largest dim of a rank >= 2 array that ``fsdp_size`` divides over "fsdp"."""
    if len(shape) < 2 or fsdp_size == 1:
        return P()
    dims = sorted((d for d in range(len(shape)) if shape[d] % fsdp_size == 0),
                  key=lambda d: shape[d], reverse=True)
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state, mesh: Mesh):
    """`NamedSharding` of every leaf of a state pytree (of arrays or ``ShapeDtypeStruct``)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, size)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dim (first) over ("data", "fsdp"), the rest unsharded."""
    return NamedSharding(mesh, BATCH_SPEC)


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of the global batch (numpy arrays) -> global `jax.Array`s."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
