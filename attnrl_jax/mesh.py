"""Device mesh and the single table that maps logical axis names to mesh axes.

Parameters and the main activations are named by logical axes ("embed", "q_heads", "batch", ...). The
rules table below is the only place that says which mesh axis each logical axis is split over, so changing
the parallelism means changing the config, not the model. A mesh axis that does not divide a dimension is
dropped for that array (it stays replicated along it): the 1.5B model has 2 KV heads, which a tensor axis of
4 cannot split. With no mesh, or a mesh of one device, every function here is a no-op.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three mesh axes; one of them may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name} must be a positive size or -1, got {s}")

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Returns the concrete axis sizes for `num_devices` devices, or raises a clear error."""
        sizes = list(self.sizes())
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by the "
                    f"fixed axes' product {known}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {num_devices} "
                "are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Topology-aware placement is unavailable for this device kind or count: use the plain order.
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES)


_warned: set[tuple[int, str, int]] = set()


def _warn_replicated_batch(rows: int, axis: str, size: int) -> None:
    """Says once per shape that a batch dimension stays replicated over a mesh axis: every device of that
    axis then computes every row (correct, but that axis's parallelism is lost for the array)."""
    if (rows, axis, size) in _warned:
        return
    _warned.add((rows, axis, size))
    log.warning(
        "a batch dimension of %d rows does not divide mesh axis %r (size %d): it is replicated over that "
        "axis, so each of its devices computes all %d rows",
        rows,
        axis,
        size,
        rows,
    )


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Logical-axis sharding for one mesh. Hashable, so it can be a static argument of `jax.jit`."""

    mesh: Mesh | None = None
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    @property
    def active(self) -> bool:
        return self.mesh is not None and self.mesh.size > 1

    def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """PartitionSpec for an array named by `axes`.

        A mesh axis is used at most once per array, and is dropped for a dimension it does not divide.
        """
        if shape is not None and len(shape) != len(axes):
            raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for i, name in enumerate(axes):
            if name is None:
                out.append(None)
                continue
            if name not in table:
                raise KeyError(f"logical axis {name!r} has no rule; known axes: {sorted(table)}")
            target = table[name]
            mesh_axes = () if target is None else (target if isinstance(target, tuple) else (target,))
            kept = []
            for ax in mesh_axes:
                size = self.mesh.shape[ax] if self.mesh is not None else 1
                if ax in used or size == 1:
                    continue
                if shape is not None and shape[i] % (size * math.prod(self.mesh.shape[a] for a in kept)):
                    if name == "batch":
                        _warn_replicated_batch(shape[i], ax, size)
                    continue
                kept.append(ax)
            used.update(kept)
            out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        return PartitionSpec(*out)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int]) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def put(self, x, axes: Sequence[str | None]) -> jax.Array:
        """A host array (the same on every process) as a device array sharded by logical `axes`. In a
        multi-process run each process transfers only the shards its own devices hold."""
        x = np.asarray(x)
        sharding = self.sharding(axes, x.shape)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """`with_sharding_constraint` by logical axes; identity without a multi-device mesh."""
        if not self.active:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes, x.shape)))

    def tree_shardings(self, axes_tree, shapes_tree):
        """Shardings for a pytree of arrays (or ShapeDtypeStructs) named by a matching tree of axes."""
        return jax.tree.map(
            lambda axes, s: self.sharding(axes, s.shape),
            axes_tree,
            shapes_tree,
            is_leaf=lambda x: isinstance(x, tuple),
        )

    def batch_parallelism(self) -> int:
        """How many ways the mesh splits a batch dimension (the product of the "batch" rule's mesh axes):
        training rows come in multiples of it."""
        if self.mesh is None:
            return 1
        target = dict(self.rules)["batch"]
        axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        return math.prod(self.mesh.shape[a] for a in axes)

    def kernel_axes(self, batch: int, q_heads: int, kv_heads: int):
        """Mesh axes (PartitionSpec entries) of a kernel call's batch and head dimensions: the batch over
        its rule's axes where they divide it, the heads over theirs only where that divides both the query
        and the key/value heads, so that every shard holds whole query-head groups with their KV head."""
        b = self.spec(("batch",), (batch,))[0]
        hq = self.spec(("act_heads",), (q_heads,))[0]
        hk = self.spec(("act_kv_heads",), (kv_heads,))[0]
        return b, (hq if hq == hk else None)

    def per_device(self, fn, in_specs, out_specs):
        """`fn` run on each device's shards (`jax.shard_map`) under an active mesh, else `fn` itself.

        For the Pallas kernels: XLA's partitioner cannot split a custom call, so without this a kernel on
        sharded activations would run on all-gathered operands, every device computing every row.
        """
        if not self.active:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
