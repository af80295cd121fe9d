"""Device meshes and sharding strategies: logical axis names → mesh axes.

Every parameter carries logical axis names (`tpo_jax.layers.param`; stacked layers add a leading
`layers` axis, kept whole); activations are tagged with `constrain(x, "batch", "length", "act_embed")` at
block boundaries and with `act_heads` / `act_kv_heads` / `act_mlp` / `act_vocab` inside the blocks, so XLA
keeps the tensor-parallel split of the projections on the activations between them. A *strategy* is a rules
table mapping logical names onto the mesh axes `data`, `fsdp`, `tensor`; the same model code runs
under every strategy.

| strategy  | parameters and optimizer state                          | batch             |
|-----------|---------------------------------------------------------|-------------------|
| `dp`      | replicated                                              | over data × fsdp  |
| `fsdp`    | ZeRO-3: one dim of each array split over `fsdp`         | over data × fsdp  |
| `tp`      | Megatron: heads / MLP / vocab dims split over `tensor`  | over data × fsdp  |
| `fsdp_tp` | `tp` split plus the embed dim over `fsdp`               | over data × fsdp  |

Resolving a rules table for one array (`logical_to_mesh`): rules are tried in table order; a rule
`(name, axes)` gives its mesh axes to the first dim named `name` that is still free, unless one of
those mesh axes is already used by another dim of the array, or the dim's size is not divisible by
the product of their sizes. A name may appear several times (fallbacks). A `(name, None)` rule pins
the dim as replicated. Dims no rule claims are replicated. So a dim that does not divide evenly
(the tiny model's 2 kv heads on 8 devices, the 32007-row vocabulary on any even count) is
replicated instead of failing, and a 2-D kernel whose preferred dim does not divide falls back to
its other dim where the table lists one.

Splits are checked on the array's own dims: the fused head dims (`q_heads` = heads × head_dim) may
be cut inside a head when the head count does not divide the tensor size. That is still exact (XLA
inserts the collectives), only slower.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpo_jax.config_fields import check_field

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rule = tuple[str, "str | tuple[str, ...] | None"]
Rules = tuple[Rule, ...]

# Activation names: "batch", "length", "act_embed" (the residual stream at block boundaries), and inside
# the blocks "act_heads" / "act_kv_heads" (attention heads of q / k, v), "act_mlp" (the MLP hidden),
# "act_vocab" (logits). Param names: tpo_jax.layers; "layers" (the stacked layer axis) is never split.
_BATCH = (("batch", BATCH_AXES), ("length", None), ("act_embed", None), ("layers", None))
_TENSOR = (("mlp", "tensor"), ("q_heads", "tensor"), ("kv_heads", "tensor"), ("heads", "tensor"),
           ("qkv", "tensor"), ("vocab", "tensor"),
           ("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"))
_FSDP_MAIN = (("embed", "fsdp"), ("vit_embed", "fsdp"))
_FSDP_FALLBACK = (("mlp", "fsdp"), ("q_heads", "fsdp"), ("kv_heads", "fsdp"), ("heads", "fsdp"),
                  ("qkv", "fsdp"), ("vocab", "fsdp"))

RULES: dict[str, Rules] = {
    "dp": _BATCH,
    "fsdp": _BATCH + _FSDP_MAIN + _FSDP_FALLBACK,
    "tp": _BATCH + _TENSOR,
    "fsdp_tp": _BATCH + _TENSOR + _FSDP_MAIN + _FSDP_FALLBACK,
}


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes along (data, fsdp, tensor); one size may be -1 for "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int, prefix: str = "mesh.") -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) sizes for `num_devices` devices, or one ConfigError."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            check_field(isinstance(size, int) and (size >= 1 or size == -1), prefix + name,
                        f"must be a positive integer or -1 (the rest), got {size!r}")
        rest = [name for name, size in sizes.items() if size == -1]
        check_field(len(rest) <= 1, prefix + (rest[-1] if rest else "fsdp"),
                    f"only one mesh size may be -1, got -1 for {rest}")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if rest:
            check_field(num_devices % fixed == 0, prefix + rest[0],
                        f"-1 takes the remaining devices, but {num_devices} devices do not divide by the "
                        f"product of the other mesh sizes ({fixed})")
            sizes[rest[0]] = num_devices // fixed
        shape = "×".join(str(sizes[n]) for n in MESH_AXES)
        check_field(math.prod(sizes.values()) == num_devices, prefix.rstrip("."),
                    f"data×fsdp×tensor = {shape} = {math.prod(sizes.values())} devices, but {num_devices} "
                    f"devices are available; make the product {num_devices} or set one size to -1")
        return tuple(sizes[n] for n in MESH_AXES)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: every device of every process) with axes data, fsdp, tensor.

    Axis types are Auto, so shardings propagate from the annotated inputs and constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_cfg.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------

def _mesh_axes(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def validate_rules(rules: Rules, mesh_axes: Iterable[str] = MESH_AXES, prefix: str = "sharding.rules") -> Rules:
    """Check every rule is (logical name, mesh axis | tuple of mesh axes | None) over known mesh axes."""
    known = tuple(mesh_axes)
    for i, rule in enumerate(rules):
        check_field(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str),
                    f"{prefix}[{i}]", f"must be a pair (logical axis name, mesh axes), got {rule!r}")
        axes = rule[1]
        check_field(axes is None or isinstance(axes, (str, tuple, list)), f"{prefix}[{i}]",
                    f"mesh axes of {rule[0]!r} must be a name, a tuple of names or None, got {axes!r}")
        for axis in _mesh_axes(axes):
            check_field(axis in known, f"{prefix}[{i}]",
                        f"rule {rule[0]!r} -> {axes!r} names unknown mesh axis {axis!r}; mesh axes: {list(known)}")
    return tuple((name, axes) for name, axes in rules)


def get_rules(name: str) -> Rules:
    """The rules table of strategy `name` ("dp", "fsdp", "tp", "fsdp_tp")."""
    check_field(name in RULES, "sharding.strategy", f"unknown strategy {name!r}; known: {sorted(RULES)}")
    return RULES[name]


def logical_to_mesh(logical_spec: Sequence[str | None] | PartitionSpec, rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """The mesh `PartitionSpec` for one array with logical axis names `logical_spec` (see module doc).

    With `shape` and `mesh`, dims that do not divide by the mesh size of their axes are replicated.
    """
    logical = tuple(logical_spec)
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {logical} do not match shape {tuple(shape)}")
    sizes = dict(mesh.shape) if mesh is not None else {}
    out: list[tuple[str, ...] | None] = [None] * len(logical)
    done = [False] * len(logical)
    used: set[str] = set()
    for name, axes in rules:
        for i, dim_name in enumerate(logical):
            if done[i] or dim_name != name:
                continue
            mesh_axes = _mesh_axes(axes)
            if not mesh_axes:
                done[i] = True
                break
            if used & set(mesh_axes):
                continue
            if shape is not None and mesh is not None:
                if shape[i] % math.prod(sizes[a] for a in mesh_axes):
                    continue
            out[i], done[i] = mesh_axes, True
            used.update(mesh_axes)
            break
    return PartitionSpec(*[None if a is None else (a[0] if len(a) == 1 else a) for a in out])


def _is_variable(x) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def variable_axes(var) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an nnx Variable (None when it has none)."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key):
            return tuple(meta[key])
    return None


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
    """A pytree of `NamedSharding` matching `abstract_tree` (arrays or ShapeDtypeStructs, possibly
    inside nnx Variables): each Variable's logical axes are resolved with `rules`; leaves without
    logical axes (step counters, optimizer counts) are replicated."""
    rules = validate_rules(rules, mesh.axis_names)

    def one(x):
        if _is_variable(x):
            if not hasattr(x.get_value(), "shape"):  # e.g. optax's MaskedNode: no array inside
                return x
            axes = variable_axes(x)
            shape = tuple(x.get_value().shape)
            spec = PartitionSpec() if axes is None else logical_to_mesh(axes, rules, shape, mesh)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_tree, is_leaf=_is_variable)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_bytes(abstract_tree, shardings) -> tuple[int, int]:
    """(bytes of the shard on one device, bytes of the whole tree) for abstract arrays and their
    shardings (matching trees); nothing is allocated."""
    shapes = jax.tree.leaves(abstract_tree)
    shards = jax.tree.leaves(shardings)
    if len(shapes) != len(shards):
        raise ValueError(f"tree of {len(shapes)} arrays does not match {len(shards)} shardings")
    per_device = total = 0
    for x, s in zip(shapes, shards):
        itemsize = np.dtype(x.dtype).itemsize
        total += math.prod(x.shape) * itemsize
        per_device += math.prod(s.shard_shape(tuple(x.shape))) * itemsize
    return per_device, total


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data × fsdp; other dims replicated. A prefix for a batch dict."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_shard_for_process(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
    """(index, count): this process feeds rows index·B/count … (index+1)·B/count of the global batch B.

    Processes whose devices sit at the same data × fsdp positions (e.g. a tensor axis spanning
    hosts) get the same index and must feed the same rows.
    """
    process_index = jax.process_index() if process_index is None else process_index
    positions = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_pos = (positions // mesh.shape["tensor"]).reshape(mesh.devices.shape)  # data*fsdp index
    mine = sorted({int(p) for d, p in zip(mesh.devices.flat, batch_pos.flat) if d.process_index == process_index})
    if not mine:
        raise ValueError(f"process {process_index} has no device in the mesh")
    width = len(mine)
    if mine != list(range(mine[0], mine[0] + width)) or mine[0] % width or n_batch % width:
        raise ValueError(f"the devices of process {process_index} hold batch slices {mine} of {n_batch}, "
                         f"not one contiguous block; order the mesh devices by process")
    return mine[0] // width, n_batch // width


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the batch (numpy, leading batch dim) → global arrays split over data × fsdp.

    Every process calls it with its own rows (see `data_shard_for_process`); the global batch is the
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    _, count = data_shard_for_process(mesh)
    local_shards = mesh.shape["data"] * mesh.shape["fsdp"] // count
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_shards:
            raise ValueError(f"batch key {key!r}: leading dim of shape {value.shape} must split into the "
                             f"{local_shards} batch shards of this process (mesh data×fsdp = "
                             f"{mesh.shape['data']}×{mesh.shape['fsdp']} over {count} data shard(s))")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# ------------------------------------------------------------------------------------------------
# Activation constraints
# ------------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "tpo_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """Within this context (while tracing), `constrain` pins activations to `rules` on `mesh`."""
    token = _ACTIVE.set((mesh, validate_rules(rules, mesh.axis_names)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` context (None outside one)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def target_platform() -> str:
    """The platform the traced program is for: the active mesh's devices ("tpu" when compiling ahead of time for
    a TPU topology on a CPU host), else JAX's default backend."""
    mesh = active_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """`with_sharding_constraint` of `x` to its logical axes; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_mesh(logical, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
