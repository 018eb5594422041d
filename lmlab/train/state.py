"""TrainState and its creation directly sharded: eval_shape for the layout, a jitted init for the values."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lmlab import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any   # non-trainable model collections (e.g. MoE router biases); {} for most models
  rng: jax.Array


def _init_fn(model, tx, seed: int, seq_len: int):
  def init():
    rng = jax.random.PRNGKey(seed)
    rng, init_rng = jax.random.split(rng)
    tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
    variables = dict(model.init({'params': init_rng, 'dropout': init_rng}, tokens_BL))
    variables.pop('intermediates', None)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(sharding.strip_boxes(params)),
                      model_state=variables, rng=rng)
  return init


def state_shardings(model, tx, seed: int, seq_len: int, mesh, rules):
  """NamedShardings for every leaf of the TrainState, from the parameters' logical names."""
  boxed = jax.eval_shape(_init_fn(model, tx, seed, seq_len))
  param_shardings = sharding.logical_shardings(boxed.params, mesh, rules)
  model_state_shardings = sharding.logical_shardings(boxed.model_state, mesh, rules)
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, sharding.strip_boxes(boxed.opt_state), param_shardings,
                                        transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    model_state=model_state_shardings, rng=replicated)


def create_train_state(model, tx, seed: int, seq_len: int, shardings, weights: dict | None = None) -> TrainState:
  """Parameters are born sharded: no full copy ever sits on one device.

  `weights` ({'params/...' or 'model_state/COLLECTION/...': host array}, e.g. a pretrained model's) replace the
  initial values of those leaves, each placed on its leaf's sharding; the optimizer state is initialised on the
  result. The one place pretrained weights meet shardings, for pretraining's init_from and every fine-tuning task.
  """
  init = _init_fn(model, tx, seed, seq_len)
  if not weights:
    return jax.jit(lambda: sharding.strip_boxes(init()), out_shardings=shardings)()
  abstract = abstract_state(model, tx, seed, seq_len, shardings)
  targets = {jax.tree_util.keystr(p, simple=True, separator='/'): t for p, t in
             jax.tree_util.tree_leaves_with_path({'params': abstract.params, 'model_state': abstract.model_state})}
  placed = {}
  for name, value in weights.items():
    if name not in targets:
      raise ValueError(f'pretrained tensor {name} has no place in this model; the checkpoint and the config disagree')
    if tuple(np.shape(value)) != tuple(targets[name].shape):
      raise ValueError(f'pretrained tensor {name} has shape {tuple(np.shape(value))}, the model '
                       f'{tuple(targets[name].shape)}; the checkpoint and the config disagree')
    placed[name] = _place(value, targets[name])

  def with_weights(placed):
    fresh = sharding.strip_boxes(init())  # traced: XLA drops the initial values that `placed` replaces
    trees = jax.tree_util.tree_map_with_path(
        lambda p, x: placed.get(jax.tree_util.keystr(p, simple=True, separator='/'), x),
        {'params': fresh.params, 'model_state': fresh.model_state})
    return fresh.replace(params=trees['params'], model_state=trees['model_state'], opt_state=tx.init(trees['params']))
  return jax.jit(with_weights, out_shardings=shardings, donate_argnums=0)(placed)


def _place(value, target: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array as a global array on `target`'s sharding; each process fills only its own shards."""
  value = np.asarray(value, dtype=target.dtype)
  return jax.make_array_from_callback(target.shape, target.sharding, lambda index: value[index])


def abstract_state(model, tx, seed: int, seq_len: int, shardings) -> TrainState:
  """ShapeDtypeStructs with target shardings: what a checkpoint restore fills in."""
  shapes = sharding.strip_boxes(jax.eval_shape(_init_fn(model, tx, seed, seq_len)))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
