"""Device mesh from config and logical-axis rules: the one place that maps names to mesh axes.

Parameters carry logical names (`embed`, `heads`, ...); activations carry `act_*` names, kept separate
so that an activation's embed axis is never sharded over the same mesh axis as its batch (MaxText's
`activation_*` convention). Rules are data; a logical name no rule covers is an error.
"""
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
BATCH_AXES = ('data', 'fsdp', 'expert')

DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('layers', None),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('expert', 'expert'),
    ('act_batch', BATCH_AXES),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_expert', 'expert'),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one `-1` entry to fill the devices; errors name the numbers that do not fit."""
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  named = ', '.join(f'mesh.{a}={s}' for a, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {named}')
  fixed = math.prod(s for s in shape if s != -1)
  if fixed <= 0 or num_devices % fixed:
    raise ValueError(f'mesh {named} (product {fixed}) does not divide the {num_devices} devices; '
                     f'choose sizes whose product divides {num_devices}')
  shape = [num_devices // fixed if s == -1 else s for s in shape]
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh {named} uses {math.prod(shape)} of the {num_devices} devices; '
                     f'make the product {num_devices} or set one axis to -1')
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(rules) -> tuple:
  """Config stores rules as [name, axis-or-list-or-None] pairs; flax wants tuples."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def check_rules_cover(tree, rules) -> None:
  """Every logical name on a partitioned parameter must have a rule (no silent replication)."""
  known = {name for name, _ in rules}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_boxed)[0]:
    if _is_boxed(leaf):
      missing = [n for n in leaf.names if n is not None and n not in known]
      if missing:
        raise ValueError(f'parameter {jax.tree_util.keystr(path)} has logical axes {missing} with no sharding '
                         'rule; add them to the rules in lmlab/sharding.py or config.sharding_rules')


def _is_boxed(x):
  return isinstance(x, nn.LogicallyPartitioned)


def strip_boxes(tree):
  """Plain values from a tree of logically-partitioned boxes, without a sharding constraint.

  (Flax's `unbox` constrains under an active mesh, which fails on abstract values)."""
  return jax.tree.map(lambda x: x.value if _is_boxed(x) else x, tree, is_leaf=_is_boxed)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (abstract) values boxed with logical names; unboxed leaves replicate."""
  check_rules_cover(boxed_tree, rules)
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a batch are split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  n = data_parallel_size(mesh)
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} is not divisible by the data-parallel size {n} '
                     f'(mesh data*fsdp*expert = {"*".join(str(mesh.shape[a]) for a in BATCH_AXES)}); '
                     f'use a multiple of {n}')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
